"""The cache's counters, and the snapshot /cache/stats and /metrics read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.cache.local import LocalCache


@dataclass
class Stats:
    """Counters since start, bumped by every part of the cache (one object, shared)."""

    hits_l1: int = 0
    hits_l2: int = 0
    misses_l1: int = 0
    misses_l2: int = 0
    stale_served: int = 0
    evictions: int = 0
    expired: int = 0
    loads: int = 0
    load_errors: int = 0
    negative_stored: int = 0
    lock_waits: int = 0
    lock_wait_timeouts: int = 0
    invalidations_sent: int = 0
    invalidations_received: int = 0
    degraded: int = 0  # Redis outages begun
    redis_errors: int = 0  # failed Redis commands


def snapshot(stats: Stats, local: LocalCache, *, degraded_now: bool, inflight: int) -> dict[str, Any]:
    """Counters plus L1 size, bytes and whether Redis is currently missing."""
    out: dict[str, Any] = dict(vars(stats))
    out.update(
        l1_entries=len(local.entries),
        l1_bytes=local.bytes,
        l1_max_entries=local.max_entries,
        l1_max_bytes=local.max_bytes,
        degraded_now=degraded_now,
        inflight=inflight,
    )
    return out
