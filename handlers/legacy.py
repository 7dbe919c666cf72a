"""Endpoints kept for the earlier service's clients (shared/API.md)."""

from __future__ import annotations

from aiohttp import web

from server.http.operations import Schema
from server.http.render import Shape
from server.http.representation import represent
from server.http.streams import RATE_LIMIT
from server.ratelimit.policy import RATE_INFO

PROTECTED = Shape("result")
PROTECTED_SCHEMA = Schema(
    "Protected",
    {
        "type": "object",
        "required": ["message", "rate_info"],
        "properties": {
            "message": {"type": "string"},
            "rate_info": {"anyOf": [RATE_INFO, {"type": "null"}]},
        },
    },
)


async def protected(request: web.Request) -> web.Response:
    """A rate-limited resource: says so, with the caller's current rate info."""
    decision = request.get(RATE_LIMIT)
    info = decision.info() if decision is not None else None
    return represent(request, {"message": "Request successful", "rate_info": info}, PROTECTED)
