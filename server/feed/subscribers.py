"""The feed's subscribers: one bounded mailbox per open stream, and the registry of a process's
mailboxes by channel, which hands each event out and keeps idle and stalled streams in check."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator

import orjson

from server.config import FeedConfig
from server.errors import Unavailable
from server.feed.events import CHANNELS, HEARTBEAT, EventKey, Frame, encode_event, entry_frame

log = logging.getLogger("hotpath.feed")


class Subscriber:
    """One open stream's mailbox: at most `limit` frames wait; beyond that the subscriber is
    told it fell behind (its final frame) instead of letting memory grow."""

    __slots__ = (
        "_limit",
        "_overflow",
        "_pending",
        "_waiter",
        "channels",
        "direct",
        "final",
        "on_stall",
        "sent",
        "writing_since",
    )

    def __init__(self, channels: frozenset[str], limit: int, overflow: Frame) -> None:
        self.channels = channels
        self.final: Frame | None = None
        # loop time a write to the client started and has not finished (0: not writing), and
        # what ends the stream when that write waits longer than feed.write_timeout
        self.writing_since = 0.0
        self.on_stall: Callable[[], None] | None = None
        # newest event key the client has been given (replayed or live): older ones are dropped
        self.sent: EventKey = (0, 0)
        # Set by the stream's owner: hands a frame straight to the socket when that is safe
        # (False: not now). While the stream's task is parked with nothing queued, an event
        # then costs no task wake-up: with 10,000 streams that is most of the fan-out time.
        self.direct: Callable[[Frame], bool] | None = None
        self._pending: deque[Frame] = deque()
        self._limit = limit
        self._waiter: asyncio.Future[None] | None = None
        self._overflow = overflow

    def push(self, frame: Frame) -> bool:
        """Queue `frame`; True when this push overflowed the mailbox (the stream now ends)."""
        if self.final is not None:
            return False
        direct = self.direct
        if direct is not None and self._waiter is not None and not self._pending and direct(frame):
            return False
        overflowed = len(self._pending) >= self._limit
        if overflowed:
            self._pending.clear()
            self.final = self._overflow
        else:
            self._pending.append(frame)
        self._wake()
        return overflowed

    def ping(self, frame: Frame) -> None:
        """A heartbeat: only useful on an idle stream, never a reason to overflow; straight to
        the socket, as an event is, when the stream's task is parked."""
        if self.final is None and not self._pending:
            direct = self.direct
            if direct is not None and self._waiter is not None and direct(frame):
                return
            self._pending.append(frame)
            self._wake()

    def finish(self, frame: Frame) -> None:
        """End the stream after what is pending, with `frame` last."""
        if self.final is None:
            self.final = frame
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def next(self) -> list[Frame]:
        """Every frame waiting (at least one, unless the stream is finishing)."""
        while not self._pending and self.final is None:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        batch = list(self._pending)
        self._pending.clear()
        return batch


def _notice(event: str, reason: str, retry: int) -> Frame:
    """A stream's last frame: why it ends, and when to reconnect."""
    return Frame(None, encode_event(orjson.dumps({"reason": reason}).decode(), event=event, retry=retry))


class Subscribers:
    """The mailboxes of one process's open streams, by channel (iterating gives every one)."""

    def __init__(self, config: FeedConfig) -> None:
        self._cfg = config
        self._all: set[Subscriber] = set()
        self._by_channel: dict[str, set[Subscriber]] = {c: set() for c in CHANNELS}
        self.closing = False
        self.overflows = 0  # subscribers dropped for falling queue_size events behind
        self._overflow = _notice("overflow", "client too slow: events were dropped; reconnect", config.retry)
        self._farewell = _notice("shutdown", "server shutting down; reconnect", config.retry)

    def __len__(self) -> int:
        return len(self._all)

    def __iter__(self) -> Iterator[Subscriber]:
        return iter(self._all)

    def add(self, channels: Collection[str]) -> Subscriber:
        """A new mailbox for `channels`; 503 (Unavailable) when shutting down or full."""
        if self.closing:
            raise Unavailable("the server is shutting down; reconnect", retry_after=1)
        if len(self._all) >= self._cfg.max_subscribers:
            raise Unavailable(
                f"this process already serves {self._cfg.max_subscribers} streams (feed.max_subscribers)",
                retry_after=max(1, self._cfg.retry // 1000),
            )
        sub = Subscriber(frozenset(channels), self._cfg.queue_size, self._overflow)
        self._all.add(sub)
        for channel in sub.channels:
            self._by_channel[channel].add(sub)
        return sub

    def discard(self, sub: Subscriber) -> None:
        self._all.discard(sub)
        for channel in sub.channels:
            self._by_channel[channel].discard(sub)

    def shutdown(self) -> None:
        """Refuse new subscribers; every open stream gets the farewell frame (with a retry
        hint) after what it has pending, and ends."""
        self.closing = True
        for sub in self._all:
            sub.finish(self._farewell)

    def fan_out(self, entries: Iterable[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Each stream entry, encoded once, into the mailbox of every subscriber of its channel."""
        for raw_id, fields in entries:
            subs = self._by_channel.get(fields.get(b"c", b"").decode())
            if not subs:
                continue
            frame = entry_frame(raw_id, fields)
            if frame is None:
                continue
            for sub in subs:
                if sub.push(frame):
                    self.overflows += 1
                    log.info("feed: a subscriber fell %d events behind; dropping it", self._cfg.queue_size)

    async def heartbeat_loop(self) -> None:
        """One loop for all streams instead of timers per stream or per write: idle streams
        get a comment line (a write to a vanished client then fails, which releases it), and
        a stream whose write has waited longer than write_timeout is ended."""
        cfg = self._cfg
        loop = asyncio.get_running_loop()
        step = min(cfg.heartbeat, cfg.write_timeout / 2)
        next_ping = loop.time() + cfg.heartbeat
        while True:
            await asyncio.sleep(step)
            now = loop.time()
            ping = now >= next_ping
            if ping:
                next_ping = now + cfg.heartbeat
            for sub in self._all:
                since = sub.writing_since
                if since and now - since > cfg.write_timeout and sub.on_stall is not None:
                    sub.on_stall()
                elif ping:
                    sub.ping(HEARTBEAT)
