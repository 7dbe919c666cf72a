"""Cleanup contexts: each opens one resource at start, stores it under its key, closes it at exit."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import aiohttp
import asyncpg
import redis.asyncio as aioredis
import redis.exceptions as redis_exc
from aiohttp import web

from server.batching import KeyBatcher
from server.cache import Cache, CacheSettings, response_group
from server.config import ConfigError, mask_url
from server.db import Database
from server.errors import StartupError
from server.fanout import Guard, GuardedResolver
from server.keys import (
    CACHE,
    CATALOGUE,
    CONFIG,
    DB,
    FETCH_GUARD,
    HTTP_CLIENT,
    RATE_LIMITER,
    REDIS,
    USER_BATCHER,
)
from server.migrations import apply_migrations
from server.products import Catalogue
from server.ratelimit import ClientIdentity, RateLimiter, RedisWindows, build_policies
from server.resp import RespConnection
from server.users import get_users_by_ids

log = logging.getLogger("hotpath.resources")

T = TypeVar("T")

# Errors worth retrying at start: the server is down, starting, or briefly refusing.
# Anything else (bad password, unknown database) fails at once: waiting will not fix it.
_PG_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.PostgresConnectionError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.TooManyConnectionsError,
)
_REDIS_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    redis_exc.ConnectionError,
    redis_exc.TimeoutError,
    redis_exc.BusyLoadingError,
)


async def retry_until(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    transient: tuple[type[BaseException], ...],
    timeout: float,
) -> T:
    """Call `attempt` until it succeeds, backing off 0.1 s → 2 s, for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.1
    warned = False
    while True:
        try:
            return await attempt()
        except transient as exc:
            remaining = deadline - time.monotonic()
            reason = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
            if remaining <= 0:
                raise StartupError(f"cannot reach {what}: {reason} (gave up after {timeout:g} s)") from None
            if not warned:
                log.warning("waiting for %s: %s (retrying for up to %g s)", what, reason, timeout)
                warned = True
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 2.0)
        except Exception as exc:
            raise StartupError(f"cannot use {what}: {type(exc).__name__}: {exc}") from None


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's reset query on release: hotpath keeps no session state on pooled
    connections (no SET, LISTEN, cursors or advisory locks outlive a checkout), so the
    round trip per request buys nothing. An open transaction is still rolled back by asyncpg."""


async def create_pg_pool(app: web.Application) -> asyncpg.Pool:
    """Open the pool described by the config, retrying an unreachable server at start."""
    cfg = app[CONFIG].database
    target = f"PostgreSQL at {mask_url(cfg.url)}"

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
        )

    return await retry_until(target, attempt, _PG_TRANSIENT, cfg.start_timeout)


async def pg_pool_ctx(app: web.Application) -> AsyncIterator[None]:
    """The asyncpg pool (wrapped in Database) under DB; migrations applied first when configured."""
    cfg = app[CONFIG].database
    pool = await create_pg_pool(app)
    try:
        if cfg.migrate_on_start:
            async with pool.acquire() as conn:
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


async def user_batcher_ctx(app: web.Application) -> AsyncIterator[None]:
    """Coalesces concurrent reads of users by id (database.batch_reads); closed before the pool."""
    cfg = app[CONFIG].database
    if not cfg.batch_reads:
        app[USER_BATCHER] = None
        yield
        return
    db = app[DB]
    batcher: KeyBatcher[int, dict[str, Any]] = KeyBatcher(partial(get_users_by_ids, db), cfg.batch_max)
    app[USER_BATCHER] = batcher
    yield
    await batcher.close()


async def catalogue_ctx(app: web.Application) -> AsyncIterator[None]:
    """The product catalogue in memory, kept fresh by LISTEN/NOTIFY."""
    cfg = app[CONFIG]
    catalogue = Catalogue(app[DB], cfg.database.url, render_cache_size=cfg.products.render_cache_size)
    await catalogue.start()
    app[CATALOGUE] = catalogue
    yield
    await catalogue.close()


def create_redis(app: web.Application) -> aioredis.Redis:
    """A Redis client over a blocking pool: a burst waits for a connection instead of failing."""
    cfg = app[CONFIG].redis
    pool = aioredis.BlockingConnectionPool.from_url(
        cfg.url,
        max_connections=cfg.max_connections,
        timeout=cfg.socket_timeout,
        socket_timeout=cfg.socket_timeout,
        socket_connect_timeout=cfg.connect_timeout,
        health_check_interval=30,
    )
    return aioredis.Redis.from_pool(pool)


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    """The shared Redis client under REDIS, checked with PING (retried) before serving."""
    cfg = app[CONFIG].redis
    client = create_redis(app)
    try:
        await retry_until(f"Redis at {mask_url(cfg.url)}", client.ping, _REDIS_TRANSIENT, cfg.start_timeout)
    except BaseException:
        await client.aclose()
        raise
    app[REDIS] = client
    yield
    await client.aclose()


async def ratelimit_ctx(app: web.Application) -> AsyncIterator[None]:
    """The rate limiter under RATE_LIMITER: policies per route name, checks coalesced per loop pass."""
    cfg = app[CONFIG].ratelimit
    route_names = sorted({r.name for r in app.router.routes() if r.name})
    try:
        policies = build_policies(route_names, cfg.policies, cfg.default, cfg.exempt) if cfg.enabled else {}
    except ValueError as exc:
        raise ConfigError("ratelimit.policies", str(exc)) from None
    limiter = RateLimiter(
        RedisWindows(
            RespConnection(app[CONFIG].redis.url, timeout=app[CONFIG].redis.socket_timeout), cfg.max_batch
        ),
        policies,
        ClientIdentity(cfg.trusted_proxies, cfg.key_header, cfg.ipv6_prefix),
        fail_mode=cfg.fail_mode,
        processes=cfg.processes,
        retry_interval=cfg.retry_interval,
    )
    app[RATE_LIMITER] = limiter
    yield
    await limiter.close()


async def http_client_ctx(app: web.Application) -> AsyncIterator[None]:
    """The one shared ClientSession, its connector behind the SSRF-guarding resolver."""
    cfg = app[CONFIG].fetch
    guard = Guard(cfg.allow)
    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(guard),
        limit=cfg.connections,
        limit_per_host=cfg.per_host,
        ttl_dns_cache=cfg.dns_cache_ttl,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": cfg.user_agent, "Accept-Encoding": "gzip, deflate"},
        auto_decompress=False,  # fanout decompresses itself, bounded (zip-bomb safe)
        trust_env=False,  # never route through a proxy named by the environment
    )
    app[FETCH_GUARD] = guard
    app[HTTP_CLIENT] = session
    yield
    await session.close()


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
    """The two-layer cache under CACHE, subscribed to invalidations; product responses are
    dropped whenever the catalogue reloads."""
    client = app[REDIS]
    cache = Cache(client, cache_settings(app, client))
    await cache.start()
    app[CACHE] = cache
    app[CATALOGUE].on_change.append(lambda: cache.invalidate_group_soon(response_group("products")))
    yield
    await cache.close()
