"""The API contract (GET /openapi.json, GET /docs) and the operator's view (GET /metrics)."""

from __future__ import annotations

import aiohttp_jinja2
from aiohttp import web

from server.http.openapi import DOCUMENT
from server.runtime.metrics import METRICS

_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


async def openapi(request: web.Request) -> web.Response:
    """The document server/routes.py derived from its route table at start-up (bytes kept)."""
    return web.Response(body=request.app[DOCUMENT].body, content_type="application/json")


async def docs(request: web.Request) -> web.Response:
    """The API reference as one self-contained HTML page rendered from the same document."""
    return aiohttp_jinja2.render_template(
        "docs.html",
        request,
        {"spec": request.app[DOCUMENT].spec, "title": "hotpath API", "methods": _METHODS},
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text of every worker (the route table asks the `metrics` scope, or metrics.token)."""
    collected = request.app[METRICS]
    if collected is None:
        raise web.HTTPNotFound(text="metrics are disabled (metrics.enabled = false)")
    return web.Response(body=await collected.render(), headers={"Content-Type": PROMETHEUS_TEXT})
