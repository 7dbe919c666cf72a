"""The product catalogue from memory, in every representation, pages rendered once per version."""

from __future__ import annotations

from aiohttp import web

from handlers.common import negotiate, page_link, query_int, render_options, send_kept, send_kept_now
from server import render
from server.keys import CATALOGUE, CONFIG
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
        return send_kept_now(request, media, body) or await send_kept(request, media, body)
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
