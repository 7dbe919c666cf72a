"""The product catalogue from memory, in every representation, pages rendered once per version."""

from __future__ import annotations

from aiohttp import web

from handlers.common import negotiate, negotiated_response, not_modified, page_link, query_int, render_options
from server import render
from server.keys import CATALOGUE, CONFIG, ETAGS
from server.products import Catalogue
from server.render import Shape

PRODUCTS = Shape("products", rows="items")


async def list_products(request: web.Request) -> web.Response:
    media = negotiate(request)
    catalogue = request.app[CATALOGUE]
    if not request.query_string:
        # the common case, a bare GET /products: one dict lookup for the rendered bytes
        key: tuple[object, ...] = (media,)
        body = catalogue.cached_page(key)
        if body is None:
            limit = request.app[CONFIG].products.default_limit
            body = catalogue.cache_page(key, _render_page(request, catalogue, media, 1, limit))
        return _validated(request, media, body)
    cfg = request.app[CONFIG].products
    page = query_int(request, "page", 1, minimum=1, maximum=10**9)
    limit = query_int(request, "limit", cfg.default_limit, minimum=1, maximum=cfg.max_limit)
    key = (media, page, limit, request.query.get("pretty"), request.query.get("format"))
    body = catalogue.cached_page(key)
    if body is None:
        body = catalogue.cache_page(key, _render_page(request, catalogue, media, page, limit))
    return _validated(request, media, body)


def _validated(request: web.Request, media: str, body: bytes) -> web.Response:
    """The page with its ETag (hashed once per rendered page), or 304 when the client has it."""
    etag = request.app[ETAGS].of(body)
    if "If-None-Match" in request.headers:
        unchanged = not_modified(request, media, etag)
        if unchanged is not None:
            return unchanged
    return negotiated_response(media, body, headers={"ETag": etag})


def _render_page(request: web.Request, catalogue: Catalogue, media: str, page: int, limit: int) -> bytes:
    data = catalogue.page(page, limit)
    more = page * limit < data["total"]
    data["next"] = page_link(request, "products", page=str(page + 1), limit=str(limit)) if more else None
    return render.render(media, data, PRODUCTS, render_options(request, media))
