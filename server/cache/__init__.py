"""Two-layer cache: in-process LRU over Redis, single flight, invalidation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

from aiohttp import web

from server.cache.core import Cache
from server.config import CONFIG
from server.runtime import metrics
from server.storage.redis_client import REDIS

CACHE = web.AppKey("hotpath.cache", Cache)


async def cache_ctx(app: web.Application) -> AsyncIterator[None]:
    """The two-layer cache under CACHE, subscribed to invalidations."""
    cache = Cache(app[REDIS], app[CONFIG].cache)
    await cache.start()
    app[CACHE] = cache
    metrics.register(app, partial(_cache_families, cache))
    yield
    await cache.close()


_CACHE_EVENTS = (
    "loads", "load_errors", "evictions", "expired", "stale_served", "lock_waits", "lock_wait_timeouts",
    "invalidations_sent", "invalidations_received", "degraded", "redis_errors",
)  # fmt: skip


def _cache_families(cache: Cache) -> list[metrics.Family]:
    snap = cache.snapshot()
    return [
        metrics.Family(
            "hotpath_cache_lookups",
            "counter",
            "Cache lookups by layer and result",
            ("layer", "result"),
            {
                ("l1", "hit"): snap["hits_l1"],
                ("l1", "miss"): snap["misses_l1"],
                ("l2", "hit"): snap["hits_l2"],
                ("l2", "miss"): snap["misses_l2"],
            },
        ),
        metrics.Family(
            "hotpath_cache_events",
            "counter",
            "Cache loader runs, evictions, stale answers, invalidations and Redis trouble",
            ("event",),
            {(name,): float(snap[name]) for name in _CACHE_EVENTS},
        ),
        metrics.Family(
            "hotpath_cache_l1",
            "gauge",
            "In-process cache size",
            ("unit",),
            {("entries",): snap["l1_entries"], ("bytes",): snap["l1_bytes"]},
        ),
    ]
