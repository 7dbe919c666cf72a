"""The API contract (GET /openapi.json, GET /docs) and the operator's view (GET /metrics)."""

from __future__ import annotations

import ipaddress

import aiohttp_jinja2
from aiohttp import web

from server.config import CONFIG
from server.http.auth import bearer_token, token_matches
from server.http.openapi import DOCUMENT
from server.runtime.metrics import METRICS

_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
# A request that came through a proxy (nginx) is not a local operator, whatever its peer.
_FORWARDED = ("X-Forwarded-For", "Forwarded", "X-Real-IP")


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


def _may_read_metrics(request: web.Request, token: str) -> bool:
    if token:
        return token_matches(bearer_token(request.headers.get("Authorization")), token)
    if any(h in request.headers for h in _FORWARDED) or request.remote is None:
        return False
    try:
        return ipaddress.ip_address(request.remote).is_loopback
    except ValueError:  # a Unix socket peer: local by construction
        return True


async def metrics(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG].metrics
    collected = request.app[METRICS]
    if collected is None:
        raise web.HTTPNotFound(text="metrics are disabled (metrics.enabled = false)")
    if not _may_read_metrics(request, cfg.token):
        if cfg.token:
            raise web.HTTPUnauthorized(
                text="metrics need Authorization: Bearer <metrics.token>",
                headers={"WWW-Authenticate": "Bearer"},
            )
        raise web.HTTPForbidden(text="metrics are served to direct loopback clients only (set metrics.token)")
    return web.Response(body=await collected.render(), headers={"Content-Type": PROMETHEUS_TEXT})
