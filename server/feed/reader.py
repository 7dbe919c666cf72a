"""The feed's one reader per process: a blocking XREAD on the stream, each batch handed out to
the local subscribers as it arrives."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import redis.asyncio as aioredis

from server.feed.subscribers import Subscribers
from server.storage.outage import REDIS_FAILED

log = logging.getLogger("hotpath.feed")

_READ_BLOCK_MS = 5000
_READ_COUNT = 512


class StreamReader:
    """Reads the stream from `last_id` on, on a connection of its own (a blocking XREAD would
    tie up one of a shared pool's), so a reconnect to Redis resumes exactly where it left off."""

    def __init__(self, redis: aioredis.Redis, stream_key: str, subscribers: Subscribers) -> None:
        self._redis = redis
        self._key = stream_key
        self._subscribers = subscribers
        self.last_id = "0-0"
        self.stopping = False

    async def run(self) -> None:
        """The read loop: failures are logged and retried with a growing delay, until stopping."""
        delay = 0.1
        while True:
            try:
                reply: Any = await self._redis.xread(
                    {self._key: self.last_id}, count=_READ_COUNT, block=_READ_BLOCK_MS
                )
            except REDIS_FAILED as exc:
                if self.stopping:
                    return
                log.warning("feed reader: %s: %s (retrying in %.1f s)", type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if self.stopping:
                return
            delay = 0.1
            self._hand_out(reply or ())

    def _hand_out(self, reply: Any) -> None:
        subscribers = self._subscribers
        started, cpu = time.perf_counter(), time.thread_time()
        for _key, entries in reply:
            subscribers.fan_out(entries)
            if entries:
                self.last_id = entries[-1][0].decode()
        took = time.perf_counter() - started
        if took > 0.05:  # the whole fan-out runs on this loop: worth knowing when it is long
            # CPU time well below the wall time: the process was waiting for the core
            log.info(
                "feed: handed out events to %d streams in %.0f ms (%.0f ms of CPU)",
                len(subscribers),
                took * 1000,
                (time.thread_time() - cpu) * 1000,
            )

    async def interrupt(self) -> None:
        """Close the connection under a blocking XREAD: the call ends at once (cancelling
        redis-py mid-read was seen to hang now and then in its own cleanup)."""
        try:
            await self._redis.connection_pool.disconnect(inuse_connections=True)
        except Exception as exc:
            log.warning("feed: closing the reader connection: %s", exc)

    async def aclose(self) -> None:
        await self._redis.aclose()
