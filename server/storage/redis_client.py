"""The shared Redis client: a blocking pool under REDIS, checked with PING at start."""

from __future__ import annotations

from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from aiohttp import web

from server.config import CONFIG
from server.storage.outage import REDIS_DOWN
from server.storage.retry import retry_until
from server.urls import mask_url

REDIS = web.AppKey("hotpath.redis", aioredis.Redis)


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
        await retry_until(f"Redis at {mask_url(cfg.url)}", client.ping, REDIS_DOWN, cfg.start_timeout)
    except BaseException:
        await client.aclose()
        raise
    app[REDIS] = client
    yield
    await client.aclose()
