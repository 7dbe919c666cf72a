"""Request parsing and response helpers shared by every handler."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from server.errors import NotFound, ValidationFailed

JSON_TYPE = "application/json"
PG_BIGINT_MAX = 2**63 - 1


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """orjson straight into the body: no str round trip, datetimes as ISO 8601."""
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON_TYPE, headers=headers)


def path_id(request: web.Request, name: str, what: str) -> int:
    """A numeric id from the path (the route already restricts it to digits).

    Ids beyond PostgreSQL's bigint cannot exist, so they are a 404, not a driver error.
    """
    value = int(request.match_info[name])
    if value > PG_BIGINT_MAX:
        raise NotFound(f"{what} {request.match_info[name]} does not exist")
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


async def read_json(request: web.Request) -> Any:
    """The parsed JSON body. 415 for a non-JSON content type, 400 when absent or malformed,
    413 (raised by aiohttp) when longer than server.client_max_size."""
    ctype = request.content_type
    if request.headers.get("Content-Type") and not (ctype == JSON_TYPE or ctype.endswith("+json")):
        raise web.HTTPUnsupportedMediaType(text=f"send the body as {JSON_TYPE}, not {ctype}")
    body = await request.read()
    if not body.strip():
        raise web.HTTPBadRequest(text="a JSON body is required")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise web.HTTPBadRequest(text=f"the body is not valid JSON: {exc}") from None
