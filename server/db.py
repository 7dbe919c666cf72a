"""Database: the asyncpg pool plus the acquire timeout every checkout must respect."""

from __future__ import annotations

from typing import Any

import asyncpg


class Database:
    """Thin handle over an asyncpg pool.

    asyncpg's Pool.fetch*/execute acquire without a timeout, so a starved pool would make
    requests wait forever; every checkout here is bounded by `acquire_timeout` instead
    (TimeoutError, which the error middleware answers with 503 + Retry-After).
    """

    __slots__ = ("acquire_timeout", "pool")

    def __init__(self, pool: asyncpg.Pool, acquire_timeout: float) -> None:
        self.pool = pool
        self.acquire_timeout = acquire_timeout

    def acquire(self) -> Any:
        """`async with db.acquire() as conn:` for several statements or a transaction."""
        return self.pool.acquire(timeout=self.acquire_timeout)

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
            return await conn.fetchrow(query, *args)

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
            return await conn.fetch(query, *args)  # type: ignore[no-any-return]

    async def fetchval(self, query: str, *args: Any) -> Any:
        async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
            return await conn.fetchval(query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
            return await conn.execute(query, *args)  # type: ignore[no-any-return]
