"""Users: create, read, update, delete, keyset pages and profiles, in every representation."""

from __future__ import annotations

from aiohttp import web

from handlers.common import page_link, path_id, query_int
from server import users
from server.cache import CACHE, response_group
from server.config import CONFIG
from server.feed import FEED
from server.http.operations import Param, Schema, query
from server.http.reading import read_body
from server.http.render import Shape
from server.http.representation import negotiate, represent, represent_rows
from server.storage.pool import DB
from server.users import USER_BATCHER

USER = Shape("user")
USERS = Shape("users", rows="items")
PROFILE = Shape("profile")
# GET /users: a page and what asks for it.
USER_PAGE = Schema(
    "UserPage",
    {
        "type": "object",
        "required": ["items", "limit", "next"],
        "properties": {
            "items": {"type": "array", "items": users.USER},
            "limit": {"type": "integer"},
            "next": {"type": ["string", "null"]},
        },
    },
)
PAGE_QUERY: tuple[Param, ...] = (
    query("after", "return users with an id greater than this", {"type": "integer", "minimum": 0}),
    query(
        "limit",
        "page size (default users.default_limit, at most users.max_limit)",
        {"type": "integer", "minimum": 1},
    ),
)


async def create_user(request: web.Request) -> web.Response:
    media = negotiate(request)
    fields = users.validate_user_fields(await read_body(request), partial=False)
    user = await users.create_user(request.app[DB], fields["name"], fields["email"])
    await _forget(request, user["id"])  # a 404 remembered for this id must not outlive the user's creation
    # Invalidate, then tell: a client reacting to the event must not read the cached old state.
    await request.app[FEED].publish_quietly("users", "user.created", user)
    location = request.app.router["user"].url_for(user_id=str(user["id"]))
    return represent(request, user, USER, status=201, headers={"Location": str(location)}, media=media)


async def get_user(request: web.Request) -> web.Response:
    user_id = path_id(request, "user_id", "user")
    app = request.app
    return represent(request, await users.get_user(app[DB], user_id, app[USER_BATCHER]), USER, etag=True)


async def update_user(request: web.Request) -> web.Response:
    user_id = path_id(request, "user_id", "user")
    media = negotiate(request)
    changes = users.validate_user_fields(await read_body(request), partial=True)
    user = await users.update_user(request.app[DB], user_id, changes)
    await _forget(request, user_id)
    await request.app[FEED].publish_quietly("users", "user.updated", user)
    return represent(request, user, USER, media=media)


async def delete_user(request: web.Request) -> web.Response:
    user_id = path_id(request, "user_id", "user")
    await users.delete_user(request.app[DB], user_id)
    await _forget(request, user_id)
    await request.app[FEED].publish_quietly("users", "user.deleted", {"id": user_id})
    return web.Response(status=204)


async def _forget(request: web.Request, user_id: int) -> None:
    """Drop every cached response about this user, in every process, before answering."""
    await request.app[CACHE].invalidate_groups(
        response_group("user", user_id=user_id), response_group("user_profile", user_id=user_id)
    )


async def list_users(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG].users
    after = query_int(request, "after", 0, minimum=0, maximum=2**63 - 1)
    limit = query_int(request, "limit", cfg.default_limit, minimum=1, maximum=cfg.max_limit)
    items = await users.list_users(request.app[DB], after, limit)
    next_url = None
    headers = {}
    if len(items) == limit:
        next_url = page_link(request, "users", after=str(items[-1]["id"]), limit=str(limit))
        headers["Link"] = f'<{next_url}>; rel="next"'
    page = {"items": items, "limit": limit, "next": next_url}
    return await represent_rows(request, page, USERS, len(items), headers=headers)


async def get_profile(request: web.Request) -> web.Response:
    user_id = path_id(request, "user_id", "user")
    return represent(request, await users.get_profile(request.app[DB], user_id), PROFILE, etag=True)
