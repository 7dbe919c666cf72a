"""The product catalogue from memory, in every representation, pages rendered once per version."""

from __future__ import annotations

from functools import partial

from aiohttp import hdrs, web

from handlers.common import page_link, query_int
from server.config import CONFIG
from server.http import render
from server.http.layers import Quick
from server.http.operations import Param, query
from server.http.render import Shape
from server.http.representation import negotiate, render_options, send_kept, send_kept_now
from server.products import CATALOGUE, Catalogue

PRODUCTS = Shape("products", rows="items")
PAGE_QUERY: tuple[Param, ...] = (
    query("page", "1-based page number", {"type": "integer", "minimum": 1}),
    query(
        "limit",
        "page size (default products.default_limit, at most products.max_limit)",
        {"type": "integer", "minimum": 1},
    ),
)


def quick_for(route: str, app: web.Application) -> Quick:
    """The kept-answer path of list_products, as the outermost layer's quick answer
    (server/http/layers.py; server/routes.py declares it for the route)."""
    return partial(_kept_answer, app)  # positional: a keyword partial costs ~0.3 µs a call


def _kept_answer(app: web.Application, request: web.Request) -> web.Response | None:
    """The common case, a bare unconditional GET /products: the answer last sent for the same
    Accept and Accept-Encoding (negotiated, rendered, compressed, ETag'd) for this catalogue
    version, or None."""
    headers = request.headers
    if request.query_string or hdrs.IF_NONE_MATCH in headers:
        return None
    ready = app[CATALOGUE].answers.get((headers.get(hdrs.ACCEPT), headers.get(hdrs.ACCEPT_ENCODING)))
    if ready is None:
        return None
    body, kept_headers = ready
    return web.Response(body=body, headers=kept_headers)


async def list_products(request: web.Request) -> web.Response:
    catalogue = request.app[CATALOGUE]
    headers = request.headers
    if not request.query_string:
        kept = _kept_answer(request.app, request)
        if kept is not None:
            return kept
        accept, accept_encoding = headers.get(hdrs.ACCEPT), headers.get(hdrs.ACCEPT_ENCODING)
        conditional = hdrs.IF_NONE_MATCH in headers
        media = negotiate(request)
        version = catalogue.version
        key: tuple[object, ...] = (media,)
        body = catalogue.cached_page(key)
        if body is None:
            limit = request.app[CONFIG].products.default_limit
            body = catalogue.cache_page(key, _render_page(request, catalogue, media, 1, limit))
        resp = send_kept_now(request, media, body) or await send_kept(request, media, body)
        if not conditional and isinstance(resp.body, bytes):
            catalogue.keep_answer(version, accept, accept_encoding, (resp.body, resp.headers.copy()))
        return resp
    media = negotiate(request)
    cfg = request.app[CONFIG].products
    page = query_int(request, "page", 1, minimum=1, maximum=10**9)
    limit = query_int(request, "limit", cfg.default_limit, minimum=1, maximum=cfg.max_limit)
    key = (media, page, limit, request.query.get("pretty"), request.query.get("format"))
    body = catalogue.cached_page(key)
    if body is None:
        body = catalogue.cache_page(key, _render_page(request, catalogue, media, page, limit))
    return send_kept_now(request, media, body) or await send_kept(request, media, body)


def _render_page(request: web.Request, catalogue: Catalogue, media: str, page: int, limit: int) -> bytes:
    data = catalogue.page(page, limit)
    more = page * limit < data["total"]
    data["next"] = page_link(request, "products", page=str(page + 1), limit=str(limit)) if more else None
    return render.render(media, data, PRODUCTS, render_options(request, media))
