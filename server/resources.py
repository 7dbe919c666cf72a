"""Cleanup contexts: each opens one resource at start, stores it under its key, closes it at exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import aiohttp
import asyncpg
import redis.asyncio as aioredis
import redis.exceptions as redis_exc
from aiohttp import web

from server.cache.core import Cache, CacheSettings, response_group
from server.config import ConfigError
from server.errors import StartupError
from server.feed.core import Feed
from server.feed.task_events import publish_task
from server.fetch.client import Guard, GuardedResolver
from server.http.parser_process import ParserProcess
from server.keys import (
    CACHE,
    CATALOGUE,
    CONFIG,
    DB,
    FEED,
    FETCH_GUARD,
    HTTP_CLIENT,
    METRICS,
    PARSER_PROCESS,
    RATE_LIMITER,
    REDIS,
    USER_BATCHER,
)
from server.products import Catalogue
from server.ratelimit.limiter import ClientIdentity, RateLimiter, RedisWindows, build_policies
from server.ratelimit.resp import RespConnection
from server.runtime.metrics import Family
from server.storage.batching import KeyBatcher
from server.storage.db import Database, milliseconds
from server.storage.migrations import apply_migrations
from server.urls import mask_url
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

    return await retry_until(target, attempt, _PG_TRANSIENT, cfg.start_timeout)


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


async def parser_process_ctx(app: web.Application) -> AsyncIterator[None]:
    """The parser process: started by the first body too costly to parse on the loop, ended
    here."""
    parser = ParserProcess(timeout=app[CONFIG].server.parser_timeout)
    app[PARSER_PROCESS] = parser
    yield
    await parser.close()


async def metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    """Feature gauges for /metrics, and the periodic snapshot other workers' /metrics read."""
    metrics = app[METRICS]
    if metrics is None:
        yield
        return
    metrics.sources.append(partial(_pool_families, app[DB]))
    metrics.sources.append(partial(_ratelimit_families, app[RATE_LIMITER]))
    # Opened after this context: looked up at each snapshot.
    metrics.sources.append(partial(_feed_families, app))
    metrics.sources.append(partial(_cache_families, app))
    metrics.global_sources.append(partial(_job_families, app))
    interval = app[CONFIG].metrics.flush_interval

    async def flush_forever() -> None:
        while True:
            await asyncio.sleep(interval)
            metrics.fold()  # also where no other worker reads snapshots: the pending lists stay short
            try:
                metrics.write_snapshot()
            except OSError as exc:  # a full or vanished directory must not stop serving
                log.warning("metrics snapshot not written: %s", exc)

    flusher = asyncio.create_task(flush_forever(), name="hotpath-metrics-flush")
    yield
    flusher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await flusher
    with contextlib.suppress(OSError):
        metrics.write_snapshot()  # the final totals stay in the sum after this worker exits


def _pool_families(db: Database) -> list[Family]:
    pool = db.pool
    return [
        Family(
            "hotpath_db_pool_connections",
            "gauge",
            "PostgreSQL pool connections, by state",
            ("state",),
            {("open",): pool.get_size(), ("idle",): pool.get_idle_size(), ("max",): pool.get_max_size()},
        ),
        Family("hotpath_db_pool_waiting", "gauge", "Requests waiting for a connection", (), {(): db.waiting}),
        Family("hotpath_db_pool_timeouts", "counter", "Checkouts that gave up (503)", (), {(): db.timeouts}),
    ]


def _feed_families(app: web.Application) -> list[Family]:
    feed = app.get(FEED)
    if feed is None:
        return []
    return [
        Family("hotpath_feed_subscribers", "gauge", "Open event streams", (), {(): feed.subscriber_count}),
        Family(
            "hotpath_feed_overflows",
            "counter",
            "Streams dropped for falling behind",
            (),
            {(): feed.overflows},
        ),
    ]


_CACHE_EVENTS = (
    "loads", "load_errors", "evictions", "expired", "stale_served", "lock_waits", "lock_wait_timeouts",
    "invalidations_sent", "invalidations_received", "degraded", "redis_errors",
)  # fmt: skip


def _cache_families(app: web.Application) -> list[Family]:
    cache = app.get(CACHE)
    if cache is None:
        return []
    snap = cache.snapshot()
    return [
        Family(
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
        Family(
            "hotpath_cache_events",
            "counter",
            "Cache loader runs, evictions, stale answers, invalidations and Redis trouble",
            ("event",),
            {(name,): float(snap[name]) for name in _CACHE_EVENTS},
        ),
        Family(
            "hotpath_cache_l1",
            "gauge",
            "In-process cache size",
            ("unit",),
            {("entries",): snap["l1_entries"], ("bytes",): snap["l1_bytes"]},
        ),
    ]


async def _job_families(app: web.Application) -> list[Family]:
    """Jobs by state, from PostgreSQL: one deployment-wide count, read by the answering worker."""
    from server.keys import JOBS

    if app.get(JOBS) is None:
        return []
    try:
        rows = await app[DB].fetch("SELECT state, count(*) AS n FROM jobs GROUP BY state")
    except Exception as exc:  # a scrape while the database is away still shows everything else
        log.warning("metrics: job counts unavailable: %s", exc)
        return []
    counts: dict[tuple[str, ...], float] = {
        ("queued",): 0.0,
        ("processing",): 0.0,
        ("completed",): 0.0,
        ("failed",): 0.0,
        ("cancelled",): 0.0,
    }
    counts.update({(r["state"],): float(r["n"]) for r in rows})
    return [
        Family("hotpath_jobs", "gauge", "Background jobs by state (whole deployment)", ("state",), counts)
    ]


def _ratelimit_families(limiter: RateLimiter) -> list[Family]:
    return [
        Family(
            "hotpath_ratelimit_degraded",
            "counter",
            "Rate-limit checks answered without Redis, by what happened",
            ("mode",),
            {(name,): float(n) for name, n in limiter.stats.items()},
        )
    ]


async def feed_ctx(app: web.Application) -> AsyncIterator[None]:
    """The real-time feed under FEED: its stream reader holds a Redis connection of its own
    (a blocking XREAD would tie up one of the shared pool's), opened after the shared client."""
    cfg = app[CONFIG]
    node = secrets.token_hex(6)  # this feed's name: in ticker events and in CLIENT LIST
    pool = aioredis.ConnectionPool.from_url(
        cfg.redis.url,
        max_connections=1,
        client_name=f"hotpath-feed-reader-{node}",
        # the reader blocks up to 5 s per XREAD: its timeout must outlast that
        socket_timeout=5.0 + cfg.redis.socket_timeout,
        socket_connect_timeout=cfg.redis.connect_timeout,
    )
    reader = aioredis.Redis.from_pool(pool)
    feed = Feed(app[REDIS], reader, cfg.feed, node=node)
    try:
        await feed.start()
    except BaseException:
        await feed.close()
        raise
    app[FEED] = feed
    yield
    await feed.close()


async def feed_shutdown(app: web.Application) -> None:
    """on_shutdown: every open event stream gets its farewell and ends, so the server's
    graceful wait is not spent on streams that would never finish by themselves."""
    feed = app.get(FEED)
    if feed is not None:
        feed.shutdown()


async def task_publisher_ctx(app: web.Application) -> AsyncIterator[None]:
    """`run.py worker`: a publish-only feed (no reader, no ticker, no subscribers) on the shared
    Redis client, so job progress from worker-only processes reaches every stream too."""
    if not app[CONFIG].redis.url:  # embedded mode: the worker has no Redis of its own
        yield
        return
    app[FEED] = Feed(app[REDIS], app[REDIS], app[CONFIG].feed)
    yield


async def jobs_ctx(app: web.Application) -> AsyncIterator[None]:
    """The job engine under JOBS (enqueue, status, cancel) and, when jobs.concurrency > 0, this
    process's job runner under JOB_RUNNER. Last in cleanup_ctx: at shutdown running jobs finish
    (up to jobs.shutdown_timeout) while the pool and every other resource are still open."""
    from server.jobs.kinds import KINDS
    from server.jobs.runner import Engine, Runner
    from server.keys import JOB_RUNNER, JOBS

    config = app[CONFIG]
    engine = Engine(app[DB], config.jobs)
    feed = app.get(FEED)
    if feed is not None:  # every state and progress change goes out on the feed's `tasks` channel
        engine.listeners.append(partial(publish_task, feed))
    app[JOBS] = engine
    runner = Runner(engine, KINDS, config, config.database.url) if config.jobs.concurrency > 0 else None
    app[JOB_RUNNER] = runner
    if runner is not None:
        await runner.start()
    yield
    if runner is not None:
        await runner.close()


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
    on_change = app[CATALOGUE].on_change

    def drop_products() -> None:
        cache.invalidate_group_soon(response_group("products"))

    on_change.append(drop_products)
    yield
    # The catalogue closes after the cache and may still reload until then (once its LISTEN
    # connection is up, late in a short-lived app): the callback would start an invalidation
    # in a closed cache, whose Redis connection nobody closes.
    on_change.remove(drop_products)
    await cache.close()
