"""GET /expensive-calculation/{value} (cached per value) and GET /cache/stats."""

from __future__ import annotations

from aiohttp import web

from handlers.common import json_response
from server.cache import CACHE
from server.calculation import expensive_calculation
from server.config import CONFIG
from server.errors import ValidationFailed
from server.http.operations import Schema

# expensive() says where its answer came from (the cache middleware adds "bypass").
X_CACHE = {
    "X-Cache": {
        "schema": {"type": "string", "enum": ["hit-l1", "hit-l2", "miss", "bypass"]},
        "description": "where the answer came from: this process's memory, Redis, or computed now",
    }
}
# What stats() answers: Cache.snapshot().
CACHE_STATS = Schema(
    "CacheStats", {"type": "object", "additionalProperties": {"type": ["integer", "boolean"]}}
)


async def expensive(request: web.Request) -> web.Response:
    limit = request.app[CONFIG].cache.expensive_max
    raw = request.match_info["value"]
    value = int(raw)
    if value > limit:
        raise ValidationFailed([{"field": "value", "message": f"must be <= {limit}"}])
    hit = await expensive_calculation.fetch(request.app[CACHE], value)
    return json_response(hit.value, headers={"X-Cache": hit.source, "ETag": f'"{hit.etag}"'})


async def stats(request: web.Request) -> web.Response:
    return json_response(request.app[CACHE].snapshot(), headers={"Cache-Control": "no-store"})
