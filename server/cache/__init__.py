"""Two-layer cache: a bounded in-process LRU (L1) in front of Redis (L2), shared by every process.

The package holds one role per module:

| module          | holds                                                                  |
|-----------------|------------------------------------------------------------------------|
| entry.py        | keys, the Entry and Hit of one value, its stored (msgpack) bytes       |
| local.py        | L1: the in-process LRU, bounded by entries and bytes, groups of keys   |
| shared.py       | L2: entries and loader locks in Redis, and the Redis outage            |
| invalidation.py | pub/sub invalidation with acknowledgements, the subscription loop      |
| stats.py        | the counters and their snapshot                                        |
| core.py         | Cache: get_or_load (L1, L2, single flight, loader lock, refresh)       |
| decorator.py    | `cached` for service functions, the groups of cached responses         |

Here: the CACHE app key, its cleanup context and its /metrics families.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

from aiohttp import web

from server.cache.core import Cache
from server.cache.decorator import cached, response_group
from server.cache.entry import Entry, Hit, make_key
from server.config import CONFIG
from server.runtime import metrics
from server.storage.redis_client import REDIS

__all__ = ["CACHE", "Cache", "Entry", "Hit", "cache_ctx", "cached", "make_key", "response_group"]

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
