"""The asyncpg pool: opened (and migrated) at start under DB, with limits on every connection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import asyncpg
from aiohttp import web

from server.config import CONFIG
from server.storage.db import Database, milliseconds
from server.storage.migrations import apply_migrations
from server.storage.retry import retry_until
from server.urls import mask_url

log = logging.getLogger("hotpath.resources")

DB = web.AppKey("hotpath.db", Database)

# Errors worth retrying at start: the server is down, starting, or briefly refusing.
# Anything else (bad password, unknown database) fails at once: waiting will not fix it.
PG_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.PostgresConnectionError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.TooManyConnectionsError,
)


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's reset query on release: hotpath keeps no per-checkout session state on
    pooled connections (no LISTEN, cursors or advisory locks outlive a checkout, and the only
    SETs are the pool's own limits, the same on every connection, or SET LOCAL), so the round
    trip per request buys nothing. An open transaction is still rolled back by asyncpg."""


SQL_SET_TEMP_FILE_LIMIT = "SELECT set_config('temp_file_limit', $1, false)"


class SessionLimits:
    """The limits PostgreSQL enforces on every pooled connection, whatever the client does.

    statement_timeout goes into the startup packet (asyncpg's server_settings): no round trip,
    and any role may set it. temp_file_limit can only be set by a superuser, or by a role
    granted SET on it (PostgreSQL 15: GRANT SET ON PARAMETER temp_file_limit TO ...); in the
    startup packet a refusal would fail every connection, so each new connection tries it in
    the pool's init hook, and after the first refusal this process stops trying and says so
    once."""

    __slots__ = ("refused", "statement_timeout", "temp_file_limit")

    def __init__(self, statement_timeout: float, temp_file_limit: int) -> None:
        self.statement_timeout = statement_timeout
        self.temp_file_limit = temp_file_limit
        self.refused = False

    def server_settings(self) -> dict[str, str]:
        return {"statement_timeout": milliseconds(self.statement_timeout)}

    async def init(self, conn: asyncpg.Connection) -> None:
        """asyncpg's pool init hook: runs once per new connection, not per checkout."""
        if self.temp_file_limit <= 0 or self.refused:
            return
        kib = max(1, self.temp_file_limit // 1024)  # the setting's unit is kB
        try:
            await conn.execute(SQL_SET_TEMP_FILE_LIMIT, f"{kib}kB")
        except asyncpg.InsufficientPrivilegeError:
            if self._first_refusal():
                log.warning(
                    "database.temp_file_limit is not applied: this role may not set temp_file_limit "
                    "(it needs superuser, or GRANT SET ON PARAMETER temp_file_limit on PostgreSQL 15+); "
                    "queries may write temporary files up to the server's own limit"
                )

    def _first_refusal(self) -> bool:
        """The pool opens its first connections concurrently: only the first refusal speaks."""
        first = not self.refused
        self.refused = True
        return first


async def create_pg_pool(app: web.Application) -> asyncpg.Pool:
    """Open the pool described by the config, retrying an unreachable server at start."""
    cfg = app[CONFIG].database
    target = f"PostgreSQL at {mask_url(cfg.url)}"
    limits = SessionLimits(cfg.statement_timeout, cfg.temp_file_limit)

    async def attempt() -> asyncpg.Pool:
        return await asyncpg.create_pool(
            cfg.url,
            min_size=cfg.min_size,
            max_size=cfg.max_size,
            command_timeout=cfg.command_timeout,
            statement_cache_size=cfg.statement_cache_size,
            max_inactive_connection_lifetime=cfg.max_inactive_lifetime,
            timeout=min(10.0, max(1.0, cfg.start_timeout)),
            reset=_no_reset,
            server_settings=limits.server_settings(),
            init=limits.init,
        )

    return await retry_until(target, attempt, PG_TRANSIENT, cfg.start_timeout)


async def pg_pool_ctx(app: web.Application) -> AsyncIterator[None]:
    """The asyncpg pool (wrapped in Database) under DB; migrations applied first when configured."""
    cfg = app[CONFIG].database
    pool = await create_pg_pool(app)
    try:
        # one checkout at start even without migrations: a connection opened now runs the
        # pool's init hook, so a refused temp_file_limit is reported at start
        async with pool.acquire() as conn:
            if cfg.migrate_on_start:
                await apply_migrations(conn)
    except BaseException:
        pool.terminate()
        raise
    app[DB] = Database(pool, cfg.acquire_timeout, cfg.max_size)
    yield
    try:
        await asyncio.wait_for(pool.close(), timeout=app[CONFIG].server.shutdown_timeout)
    except TimeoutError:
        log.warning("PostgreSQL pool did not close in time; terminating its connections")
        pool.terminate()
