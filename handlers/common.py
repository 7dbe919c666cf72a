"""Request parsing and response helpers shared by every handler."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp_jinja2
import orjson
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from server import render
from server.errors import NotAcceptable, NotFound, ValidationFailed
from server.keys import NEGOTIATOR
from server.render import BY_MEDIA, BY_NAME, OFFERS, RenderOptions, Shape

JSON_TYPE = "application/json"
PG_BIGINT_MAX = 2**63 - 1
_TRUE = frozenset({"1", "true", "yes", "on"})
# Built once: the headers of a negotiated response depend only on its media type.
_NEGOTIATED_HEADERS: dict[str, CIMultiDict[str]] = {
    media: CIMultiDict({"Content-Type": fmt.content_type, "Vary": "Accept"})
    for media, fmt in BY_MEDIA.items()
}
_BODY_TYPES = ", ".join(render.BODY_TYPES)


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """orjson straight into the body: no str round trip, datetimes as ISO 8601."""
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON_TYPE, headers=headers)


def negotiate(request: web.Request) -> str:
    """The media type to answer with: ?format= if given (400 when unknown), else the best
    match for Accept (406 when nothing we have is acceptable)."""
    if request.query_string:
        name = request.query.get("format")
        if name is not None:
            fmt = BY_NAME.get(name.lower())
            if fmt is None:
                raise web.HTTPBadRequest(text=f"unknown format {name!r}; use one of {', '.join(BY_NAME)}")
            return fmt.media_type
    media = request.app[NEGOTIATOR].choose(request.headers.get("Accept"))
    if media is None:
        raise NotAcceptable(list(OFFERS))
    return media


def render_options(request: web.Request, media: str) -> RenderOptions:
    pretty = request.query.get("pretty", "").lower() in _TRUE if request.query_string else False
    templates = aiohttp_jinja2.get_env(request.app) if media == render.HTML else None
    return RenderOptions(pretty=pretty, templates=templates)


def negotiated_response(
    media: str, body: bytes, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    out = _NEGOTIATED_HEADERS[media].copy()  # Response keeps (and may change) the mapping it gets
    if headers:
        out.update(headers)
    return web.Response(body=body, status=status, headers=out)


def represent(
    request: web.Request,
    data: Any,
    shape: Shape,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    media: str | None = None,
) -> web.Response:
    """`data` in the representation the client prefers, with Vary: Accept. Handlers that
    change state pass `media` from negotiate() called first, so a 406 never follows a write."""
    if media is None:
        media = negotiate(request)
    body = render.render(media, data, shape, render_options(request, media))
    return negotiated_response(media, body, status, headers)


def page_link(request: web.Request, route: str, **query: str) -> str:
    """A link to another page of a listing that keeps ?format= and ?pretty=."""
    keep = {k: request.query[k] for k in ("format", "pretty") if k in request.query}
    url: URL = request.app.router[route].url_for().with_query({**query, **keep})
    return str(url)


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


async def read_body(request: web.Request) -> Any:
    """The decoded request body: JSON (also when no Content-Type is sent), msgpack or YAML.

    415 for any other type, 400 when absent or malformed, 413 (raised by aiohttp) when
    longer than server.client_max_size.
    """
    media = request.content_type if "Content-Type" in request.headers else JSON_TYPE
    if media not in render.PARSERS and not media.endswith("+json"):
        accept_header = "Accept-Patch" if request.method == "PATCH" else "Accept-Post"
        raise web.HTTPUnsupportedMediaType(
            text=f"send the body as one of {_BODY_TYPES}, not {media}", headers={accept_header: _BODY_TYPES}
        )
    body = await request.read()
    if not body.strip():
        raise web.HTTPBadRequest(text="a request body is required")
    try:
        return render.parse_body(media, body)
    except render.BodyError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
