"""Database: the asyncpg pool behind a fair gate, every checkout bounded by a timeout."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from server.errors import Unavailable

# Parameterised so the statement stays constant (and cached); `true`: for this transaction only.
SQL_LOCAL_TIMEOUT = "SELECT set_config('statement_timeout', $1, true)"


def milliseconds(seconds: float) -> str:
    """A duration setting of PostgreSQL in ms; rounded up so a tiny limit never becomes 0 (none)."""
    return str(math.ceil(seconds * 1000)) if seconds > 0 else "0"


async def local_statement_timeout(conn: asyncpg.Connection, seconds: float) -> None:
    """Give the transaction open on `conn` a statement_timeout of its own (the pool's applies
    again after it): for work that is meant to take long, such as exports and imports. The
    caller passes the same `seconds` as asyncpg's timeout of those statements, whose default
    (database.command_timeout) would otherwise cut them short on the client's side."""
    await conn.execute(SQL_LOCAL_TIMEOUT, milliseconds(seconds))


class Database:
    """Thin handle over an asyncpg pool.

    Two things the bare pool does not give us:
    - Fairness. asyncpg hands out connections through an asyncio.Queue; a request that
      arrives just as a connection is released takes it before the waiter that was woken
      for it, and the woken waiter goes to the back of the line. Under load that starves
      a few requests for seconds (measured: p50 1.8 ms, p99 950 ms at 64 connections).
      A FIFO semaphore sized to the pool lets exactly `max_size` requests at the pool,
      so its queue never has waiters to overtake, and the rest wait in arrival order.
    - A bound. Pool.fetch*/execute acquire without a timeout; here every checkout waits at
      most `acquire_timeout` (TimeoutError, answered with 503 + Retry-After).
    """

    __slots__ = ("_gate", "acquire_timeout", "pool", "timeouts", "waiting")

    def __init__(self, pool: asyncpg.Pool, acquire_timeout: float, max_size: int) -> None:
        self.pool = pool
        self.acquire_timeout = acquire_timeout
        self._gate = asyncio.Semaphore(max_size)
        self.waiting = 0  # checkouts queued at the gate now (a metric)
        self.timeouts = 0  # checkouts that gave up after acquire_timeout (a metric)

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        """`async with db.acquire() as conn:` for several statements or a transaction."""
        gate = self._gate
        try:
            async with asyncio.timeout(self.acquire_timeout):
                if gate.locked():
                    self.waiting += 1
                    try:
                        await gate.acquire()
                    finally:
                        self.waiting -= 1
                else:
                    await gate.acquire()
                try:
                    conn = await self.pool.acquire()
                except OSError as exc:
                    # A new connection failed below asyncpg's own errors (the server's Unix
                    # socket is gone while it restarts, say): the database is unavailable.
                    gate.release()
                    raise Unavailable("the database is unavailable, retry shortly") from exc
                except BaseException:
                    gate.release()
                    raise
        except TimeoutError:
            self.timeouts += 1
            raise
        try:
            yield conn
        finally:
            try:
                await self.pool.release(conn)
            finally:
                gate.release()

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        async with self.acquire() as conn:
            return await conn.fetchrow(query, *args)

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with self.acquire() as conn:
            return await conn.fetch(query, *args)  # type: ignore[no-any-return]

    async def fetchval(self, query: str, *args: Any) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchval(query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        async with self.acquire() as conn:
            return await conn.execute(query, *args)  # type: ignore[no-any-return]
