"""Real-time feed: events in a capped Redis Stream, one reader per process fanning them out to
local subscribers, Last-Event-ID replay, heartbeats, and a ticker published by one elected leader.

Publishing is one XADD (from any process: the stream id is the event id). Every process runs
one blocking XREAD on that stream and pushes each event, encoded once to its text/event-stream
frame, into the bounded mailbox of every local subscriber of its channel. Nothing here sees a
web.Request: handlers/feed.py turns mailboxes into HTTP responses.

Feed puts the parts together and runs their tasks: events.py (the wire format), stream.py
(publishing and replay), subscribers.py (mailboxes, fan-out, heartbeats, streams ended with
their credential), audience.py (who may read which channel, and whose task events), reader.py
(the XREAD loop), ticker.py (the leader's lease and its ticks).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Collection
from typing import Any

import redis.asyncio as aioredis

from server.config import FeedConfig
from server.feed.audience import Audience, Channels
from server.feed.events import CHANNELS, EventKey, Frame
from server.feed.reader import StreamReader
from server.feed.stream import EventStream
from server.feed.subscribers import Subscriber, Subscribers
from server.feed.ticker import Ticker
from server.http.auth import Principal

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
        self.channels = Channels(config.private_channels)
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

    def subscribe(
        self,
        audience: Audience | Collection[str],
        *,
        key_id: int | None = None,
        expires_at: float | None = None,
    ) -> Subscriber:
        """A new mailbox for `audience` (see audience()), or every event of some channels; 503
        (Unavailable) when shutting down or full. A stream opened with an API key names it
        (`key_id`: revoked() ends the stream); `expires_at` (epoch seconds) ends it with an
        `expired` frame when its credential (a key's expiry, a stream token's) runs out."""
        return self._subscribers.add(audience, key_id=key_id, expires_at=expires_at)

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    def audience(
        self,
        principal: Principal | None,
        asked: Collection[str] | None,
        default: Collection[str] = CHANNELS,
        opened: bool = False,
    ) -> Audience:
        """What a caller (None: anonymous) receives: the channels it `asked` for, each of which
        it must be allowed to read (else ChannelForbidden, a 403), or `default` narrowed to what
        it may read; a key's own events on owner-routed channels (tasks). `opened`: the route is
        open (auth.open_routes), so everything is, as before keys (server/feed/audience.py)."""
        return self.channels.audience(principal, asked, default, opened)

    def revoked(self, key_id: int) -> None:
        """Access.on_revoke: every local stream of the key `key_id` ends now."""
        self._subscribers.revoked(key_id)

    @property
    def key_gone(self) -> Callable[[int], bool] | None:
        return self._subscribers.key_gone

    @key_gone.setter
    def key_gone(self, check: Callable[[int], bool] | None) -> None:
        """Whether a key is no longer valid: looked at for the keys with streams open, every
        heartbeat step (a key can stop being valid without a revocation: a rotation's overlap)."""
        self._subscribers.key_gone = check

    # -- publishing and history -----------------------------------------------------------

    async def publish(self, channel: str, event: str, data: Any, owner: int | None = None) -> str:
        """Append an event to the stream; every subscriber of `channel` in every process gets
        it, or, on an owner-routed channel (tasks, while private), the subscribers of `owner`
        (the key family the event belongs to) and `admin` ones. `owner` is kept beside the
        event, never in the data clients see. `data`: a string is sent as it is (newlines
        allowed), anything else as JSON. Returns the event id. ValueError for an unknown
        channel or a bad event name."""
        return await self._stream.publish(channel, event, data, owner)

    async def publish_quietly(
        self, channel: str, event: str, data: Any, owner: int | None = None
    ) -> str | None:
        """publish() for side effects of a write that already succeeded: a failure is logged,
        never raised (the write must not fail because the feed could not be told)."""
        return await self._stream.publish_quietly(channel, event, data, owner)

    async def replay(self, after: str, audience: Audience | Collection[str]) -> tuple[list[Frame], EventKey]:
        """What `audience` (or every event of some channels) would have received after the id
        `after`, from the stream's history, plus the key of the newest event accounted for.
        When `after` is older than the history (trimmed away) or unknown to this stream, the
        only frame is a `resync`."""
        return await self._stream.replay(after, audience)

    # -- the ticker -----------------------------------------------------------------------

    @property
    def leader(self) -> bool:
        """Whether this process publishes the ticker now."""
        return self._ticker.leader
