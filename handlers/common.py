"""Request parameters (path ids, bounded query integers, page links) and plain JSON responses,
shared by every handler. Reading bodies is server/http/reading.py; representations are
server/http/representation.py."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web
from yarl import URL

from server.errors import NotFound, ValidationFailed

JSON_TYPE = "application/json"
PG_BIGINT_MAX = 2**63 - 1


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """orjson straight into the body: no str round trip, datetimes as ISO 8601."""
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON_TYPE, headers=headers)


def page_link(request: web.Request, route: str, **query: str) -> str:
    """A link to another page of a listing that keeps ?format= and ?pretty=."""
    keep = {k: request.query[k] for k in ("format", "pretty") if k in request.query}
    url: URL = request.app.router[route].url_for().with_query({**query, **keep})
    return str(url)


def path_id(request: web.Request, name: str, what: str) -> int:
    """A numeric id from the path: the route (routing.number) already restricts it to at most
    19 ASCII digits, so int() cannot fail; ids beyond PostgreSQL's bigint cannot exist, so they
    are a 404, not a driver error."""
    raw = request.match_info[name]
    value = int(raw)
    if value > PG_BIGINT_MAX:
        raise NotFound(f"{what} {raw} does not exist")
    return value


def query_int(
    request: web.Request, name: str, default: int, *, minimum: int, maximum: int | None = None
) -> int:
    """An integer query parameter within bounds (values above `maximum` are capped)."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationFailed([{"field": name, "message": "must be an integer"}]) from None
    if value < minimum:
        raise ValidationFailed([{"field": name, "message": f"must be >= {minimum}"}])
    if maximum is not None and value > maximum:
        return maximum
    return value
