"""Readiness checks of the backing services, each bounded by a short timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from server.storage.db import Database


async def _timed(probe: Callable[[], Awaitable[Any]], timeout: float) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        await asyncio.wait_for(probe(), timeout)
    except TimeoutError:
        return {"ok": False, "error": f"no answer within {timeout:g} s"}
    except Exception as exc:  # any failure means "not ready"; the name is enough for an operator
        return {"ok": False, "error": type(exc).__name__}
    return {"ok": True, "latency_ms": round((time.perf_counter() - start) * 1000, 3)}


async def check_readiness(db: Database, redis: aioredis.Redis, timeout: float) -> dict[str, dict[str, Any]]:
    """Probe PostgreSQL (SELECT 1) and Redis (PING) concurrently; one result per service."""

    async def pg() -> None:
        async with db.acquire() as conn:
            await conn.fetchval("SELECT 1", timeout=timeout)

    postgres, redis_result = await asyncio.gather(_timed(pg, timeout), _timed(redis.ping, timeout))
    return {"postgres": postgres, "redis": redis_result}
