"""Liveness (/health, no I/O) and readiness (/ready, checks PostgreSQL and Redis)."""

from __future__ import annotations

import os

from aiohttp import web

from handlers.common import json_response
from server.config import CONFIG
from server.errors import Unavailable
from server.health import check_readiness
from server.http.operations import Schema
from server.storage.pool import DB
from server.storage.redis_client import REDIS

_HEALTH_BODY = b'{"status":"ok"}'
HEALTH = Schema(
    "Health", {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}
)
READY = Schema(
    "Ready",
    {
        "type": "object",
        "required": ["status", "checks"],
        "properties": {
            "status": {"const": "ready"},
            "pid": {"type": "integer", "description": "the answering worker process"},
            "checks": {"type": "object"},
        },
    },
)


async def health(request: web.Request) -> web.Response:
    return web.Response(body=_HEALTH_BODY, content_type="application/json")


async def ready(request: web.Request) -> web.Response:
    app = request.app
    checks = await check_readiness(app[DB], app[REDIS], app[CONFIG].health.check_timeout)
    down = [name for name, result in checks.items() if not result["ok"]]
    if down:
        raise Unavailable(f"not ready: {', '.join(down)} down", extra={"checks": checks})
    return json_response({"status": "ready", "pid": os.getpid(), "checks": checks})
