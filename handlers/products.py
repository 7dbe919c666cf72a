"""The product catalogue from memory, in every representation, pages rendered once per version."""

from __future__ import annotations

from aiohttp import web

from handlers.common import negotiate, negotiated_response, page_link, query_int, render_options
from server import render
from server.keys import CATALOGUE, CONFIG
from server.render import Shape

PRODUCTS = Shape("products", rows="items")


async def list_products(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG].products
    media = negotiate(request)
    page = query_int(request, "page", 1, minimum=1, maximum=10**9)
    limit = query_int(request, "limit", cfg.default_limit, minimum=1, maximum=cfg.max_limit)
    query = request.query
    opts = render_options(request, media)
    catalogue = request.app[CATALOGUE]
    key = (page, limit, media, opts.pretty, query.get("format"))

    def build() -> bytes:
        data = catalogue.page(page, limit)
        more = page * limit < data["total"]
        data["next"] = page_link(request, "products", page=str(page + 1), limit=str(limit)) if more else None
        return render.render(media, data, PRODUCTS, opts)

    return negotiated_response(media, catalogue.rendered(key, build))
