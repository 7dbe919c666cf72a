"""server/http/routing.py: DigitsResource matches exactly what aiohttp's regex DynamicResource does."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.web_urldispatcher import DynamicResource

from server.http.routing import DigitsResource, number, register
from server.routes import ROUTES

SHAPES = [
    "/users/" + number("user_id", 19),
    "/users/" + number("user_id", 19) + "/profile",
    "/stream-json/" + number("record_count", 12),
    "/tasks/" + number("task_id", 19) + "/events",
    "/a/b/" + number("n", 1),
]
PATHS = [
    "/users/1",
    "/users/0042",  # a leading zero: another spelling of 42, matched by neither
    "/users/0",
    "/users/00",
    "/users/10",
    "/users/",
    "/users",
    "/users/1/",
    "/users/1/profile",
    "/users//profile",
    "/users/profile",
    "/users/x/profile",
    "/users/12/profilex",
    "/users/12/profile/",
    "/users/1 ",
    "/users/-1",
    "/users/+1",
    "/users/1.0",
    "/users/１２",  # fullwidth digits: Unicode Nd, which \d would match; [0-9] does not
    "/users/١٢٣",  # Arabic-Indic digits
    "/users/١",
    "/users/²",  # superscript two: a digit but not decimal (Nd), matched by neither
    "/users/1\n",
    "/users/%31",
    "/stream-json/" + "9" * 12,
    "/stream-json/" + "9" * 13,
    "/stream-json/",
    "/tasks/1/events",
    "/tasks/" + "1" * 19 + "/events",
    "/tasks/" + "1" * 20 + "/events",
    "/users/" + "9" * 19,
    "/users/" + "9" * 20,
    "/users/1" + "0" * 5000,
    "/tasks/1/event",
    "/tasks/events",
    "/a/b/7",
    "/a/b/0",
    "/a/b/77",
    "/a/b/",
    "/",
    "",
]


@pytest.mark.parametrize("shape", SHAPES)
def test_digits_resource_matches_like_the_regex(shape: str) -> None:
    fast, regex = DigitsResource(shape), DynamicResource(shape)
    for path in PATHS:
        assert fast._match(path) == regex._match(path), (shape, path)


def test_every_digit_route_is_a_digits_resource() -> None:
    """The route table's id routes all take the fast matcher; the rest stay aiohttp's."""
    router = web.UrlDispatcher()
    for route in ROUTES:
        register(router, route)
    resources = {r.canonical: r for r in router.resources()}
    assert type(resources["/users/{user_id}"]) is DigitsResource
    assert type(resources["/task-status/{task_id}"]) is DigitsResource
    assert type(resources["/users"]) is not DigitsResource
    digit_paths = [r.path for r in ROUTES if "[0-9]" in r.path]
    assert digit_paths and all(DigitsResource.fits(p) for p in digit_paths)


def test_other_shapes_are_refused() -> None:
    refused = ["/users", r"/{tail:[\s\S]*}", r"/a/{x:\d{3}}", r"/a/{x:\d+}", "/" + number("x", 3)]
    for path in [*refused, "/a/" + number("x", 2) + number("y", 2)]:
        assert not DigitsResource.fits(path)
        with pytest.raises(ValueError):
            DigitsResource(path)


async def test_routes_resolve_and_build_urls(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    """Method routing, HEAD, 405 and url_for behave as with aiohttp's own resources."""

    async def show(request: web.Request) -> web.Response:
        return web.json_response({"id": request.match_info["item_id"], "method": request.method})

    app = web.Application()
    item = "/items/" + number("item_id", 19)
    register(app.router, web.get(item, show, name="item"))
    register(app.router, web.delete(item, show, name="item_delete"))
    register(
        app.router, web.get("/items/" + number("item_id", 3) + "/parts", show, name="parts", allow_head=False)
    )
    client = await aiohttp_client(app)
    assert str(app.router["item"].url_for(item_id="7")) == "/items/7"
    resp = await client.get("/items/12")
    assert resp.status == 200 and await resp.json() == {"id": "12", "method": "GET"}
    assert (await client.head("/items/12")).status == 200
    assert (await (await client.delete("/items/12")).json())["method"] == "DELETE"
    assert (await client.get("/items/1234/parts")).status == 404
    assert (await client.get("/items/x")).status == 404
    resp = await client.head("/items/12/parts")
    assert resp.status == 405 and resp.headers["Allow"] == "GET"
    resp = await client.post("/items/12")
    assert resp.status == 405 and set(resp.headers["Allow"].split(",")) == {"GET", "HEAD", "DELETE"}
