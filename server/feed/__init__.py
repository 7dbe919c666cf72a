"""The real-time feed: Redis Stream fan-out to subscribers, task events."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from functools import partial

import redis.asyncio as aioredis
from aiohttp import web

from server.access import ACCESS
from server.config import CONFIG
from server.feed.core import Feed
from server.runtime import metrics
from server.storage.redis_client import REDIS

FEED = web.AppKey("hotpath.feed", Feed)


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
    access = app.get(ACCESS)
    if access is not None:
        # a revoked key's streams end at once; one that lapses unannounced (a rotated key after
        # its overlap) at the next heartbeat step. Only while the key table is known complete:
        # otherwise a key made elsewhere since would look gone.
        access.on_revoke(feed.revoked)
        feed.key_gone = lambda key_id: access.live and not access.is_active(key_id)
    metrics.register(app, partial(_feed_families, feed))
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


def _feed_families(feed: Feed) -> list[metrics.Family]:
    return [
        metrics.Family(
            "hotpath_feed_subscribers", "gauge", "Open event streams", (), {(): feed.subscriber_count}
        ),
        metrics.Family(
            "hotpath_feed_overflows",
            "counter",
            "Streams dropped for falling behind",
            (),
            {(): feed.overflows},
        ),
    ]
