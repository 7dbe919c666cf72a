"""Two-layer cache: in-process LRU over Redis, single flight, invalidation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

import redis.asyncio as aioredis
from aiohttp import web

from server.cache.core import Cache, CacheSettings
from server.config import CONFIG
from server.runtime import metrics
from server.storage.redis_client import REDIS

CACHE = web.AppKey("hotpath.cache", Cache)


def cache_settings(app: web.Application, client: aioredis.Redis) -> CacheSettings:
    """The [cache] section for Cache; the channel is per Redis database, so separate
    deployments (and test runs) sharing one Redis server never hear each other."""
    c = app[CONFIG].cache
    db = client.connection_pool.connection_kwargs.get("db", 0)
    return CacheSettings(
        max_entries=c.max_entries,
        max_bytes=c.max_bytes,
        default_ttl=c.default_ttl,
        jitter=c.jitter,
        negative_ttl=c.negative_ttl,
        lock_ttl=c.lock_ttl,
        lock_wait=c.lock_wait,
        lock_poll=c.lock_poll,
        retry_interval=c.retry_interval,
        invalidate_wait=c.invalidate_wait,
        channel=f"{c.channel}:{db}",
    )


async def cache_ctx(app: web.Application) -> AsyncIterator[None]:
    """The two-layer cache under CACHE, subscribed to invalidations."""
    client = app[REDIS]
    cache = Cache(client, cache_settings(app, client))
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
