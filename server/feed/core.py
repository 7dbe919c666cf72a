"""Real-time feed: events in a capped Redis Stream, one reader per process fanning them out to
local subscribers, Last-Event-ID replay, heartbeats, and a ticker published by one elected leader.

Publishing is one XADD (from any process: the stream id is the event id). Every process runs
one blocking XREAD on that stream and pushes each event, encoded once to its text/event-stream
frame, into the bounded mailbox of every local subscriber of its channel. Nothing here sees a
web.Request: handlers/feed.py turns mailboxes into HTTP responses.

Feed puts the parts together and runs their tasks: events.py (the wire format), stream.py
(publishing and replay), subscribers.py (mailboxes, fan-out, heartbeats), reader.py (the
XREAD loop), ticker.py (the leader's lease and its ticks).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Collection
from typing import Any

import redis.asyncio as aioredis

from server.config import FeedConfig
from server.feed.events import EventKey, Frame
from server.feed.reader import StreamReader
from server.feed.stream import EventStream
from server.feed.subscribers import Subscriber, Subscribers
from server.feed.ticker import Ticker

log = logging.getLogger("hotpath.feed")


class Feed:
    """The feed of one process: publish, subscribe, replay; owns the reader, heartbeat and
    ticker tasks (start() / close())."""

    def __init__(
        self, redis: aioredis.Redis, reader: aioredis.Redis, config: FeedConfig, node: str | None = None
    ) -> None:
        self._cfg = config
        self.node = node or secrets.token_hex(6)  # this process's (this app's) name in ticker events
        self._stream = EventStream(redis, config)
        self.stream_key = self._stream.key
        self._subscribers = Subscribers(config)
        self._reader = StreamReader(reader, self.stream_key, self._subscribers)
        self._ticker = Ticker(redis, self._stream, config, self.node)
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Note where the stream ends now, then start reading it (and the ticker, if on)."""
        self._reader.last_id = await self._stream.newest_id()
        self._tasks.append(asyncio.create_task(self._reader.run(), name="feed-reader"))
        self._tasks.append(asyncio.create_task(self._subscribers.heartbeat_loop(), name="feed-heartbeat"))
        if self._cfg.ticker:
            self._tasks.append(asyncio.create_task(self._ticker.run(), name="feed-ticker"))

    def shutdown(self) -> None:
        """Refuse new subscribers; every open stream gets the farewell frame (with a retry
        hint) after what it has pending, and ends."""
        self._subscribers.shutdown()

    async def close(self) -> None:
        """Stop the tasks, give up the ticker lease, close the reader's connection."""
        self.shutdown()
        self._reader.stopping = self._ticker.stopping = True
        reader = next((t for t in self._tasks if t.get_name() == "feed-reader"), None)
        others = [t for t in self._tasks if t is not reader]
        for task in others:
            task.cancel()
        # The reader sits in a blocking XREAD: closing its connection ends that call at once.
        await self._reader.interrupt()
        if reader is not None:
            done, _ = await asyncio.wait([reader], timeout=2.0)
            if not done:
                reader.cancel()
                done, _ = await asyncio.wait([reader], timeout=2.0)
                if not done:
                    log.warning("feed: the stream reader did not stop")
        if others:
            _, pending = await asyncio.wait(others, timeout=5.0)
            if pending:
                log.warning("feed: %s did not stop", ", ".join(t.get_name() for t in pending))
        self._tasks.clear()
        await self._reader.aclose()
        await self._ticker.release()

    # -- subscribers ----------------------------------------------------------------------

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    @property
    def overflows(self) -> int:
        """Subscribers dropped for falling queue_size events behind."""
        return self._subscribers.overflows

    def subscribe(self, channels: Collection[str]) -> Subscriber:
        """A new mailbox for `channels`; 503 (Unavailable) when shutting down or full."""
        return self._subscribers.add(channels)

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    # -- publishing and history -----------------------------------------------------------

    async def publish(self, channel: str, event: str, data: Any) -> str:
        """Append an event to the stream; every subscriber of `channel` in every process gets
        it. `data`: a string is sent as it is (newlines allowed), anything else as JSON.
        Returns the event id. ValueError for an unknown channel or a bad event name."""
        return await self._stream.publish(channel, event, data)

    async def publish_quietly(self, channel: str, event: str, data: Any) -> str | None:
        """publish() for side effects of a write that already succeeded: a failure is logged,
        never raised (the write must not fail because the feed could not be told)."""
        return await self._stream.publish_quietly(channel, event, data)

    async def replay(self, after: str, channels: Collection[str]) -> tuple[list[Frame], EventKey]:
        """Frames of `channels` published after the id `after`, from the stream's history,
        plus the key of the newest event accounted for. When `after` is older than the
        history (trimmed away) or unknown to this stream, the only frame is a `resync`."""
        return await self._stream.replay(after, channels)

    # -- the ticker -----------------------------------------------------------------------

    @property
    def leader(self) -> bool:
        """Whether this process publishes the ticker now."""
        return self._ticker.leader
