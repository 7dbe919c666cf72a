"""The feed's subscribers: one bounded mailbox per open stream, and the registry of a process's
mailboxes by channel (and, for owner-routed channels, by owner), which hands each event out,
keeps idle and stalled streams in check, and ends the streams whose credential ends."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator

import orjson

from server.config import FeedConfig
from server.errors import Unavailable
from server.feed.audience import NOBODY, Audience
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
        "audience",
        "channels",
        "direct",
        "expiry",
        "final",
        "key_id",
        "on_stall",
        "sent",
        "writing_since",
    )

    def __init__(
        self, channels: frozenset[str], limit: int, overflow: Frame, audience: Audience | None = None
    ) -> None:
        self.channels = channels
        self.audience = audience if audience is not None else Audience(channels)
        # the API key the stream was opened with (its revocation ends the stream), and the
        # timer that ends it when its credential expires
        self.key_id: int | None = None
        self.expiry: asyncio.TimerHandle | None = None
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
    """The mailboxes of one process's open streams, by channel (iterating gives every one).

    An event goes to the subscribers of its channel, and, on an owner-routed channel, to the
    subscribers of its owner: two dict lookups per event whoever subscribes, never a test per
    subscriber."""

    def __init__(self, config: FeedConfig) -> None:
        self._cfg = config
        self._all: set[Subscriber] = set()
        # subscribers of every event of a channel
        self._by_channel: dict[str, set[Subscriber]] = {c: set() for c in CHANNELS}
        # owner-routed channels: channel -> the owner as the stream field holds it -> subscribers
        self._by_owner: dict[str, dict[bytes, set[Subscriber]]] = {c: {} for c in CHANNELS}
        self._by_key: dict[int, set[Subscriber]] = {}  # streams opened with each API key
        # whether a key is no longer valid (set by whoever knows the keys: server/feed/__init__.py)
        self.key_gone: Callable[[int], bool] | None = None
        self.closing = False
        self.overflows = 0  # subscribers dropped for falling queue_size events behind
        self._overflow = _notice("overflow", "client too slow: events were dropped; reconnect", config.retry)
        self._farewell = _notice("shutdown", "server shutting down; reconnect", config.retry)
        self._expired = _notice(
            "expired",
            "the credential of this stream expired; reconnect with a new stream token",
            config.retry,
        )
        self._revoked = _notice("revoked", "the key of this stream was revoked", config.retry)

    def __len__(self) -> int:
        return len(self._all)

    def __iter__(self) -> Iterator[Subscriber]:
        return iter(self._all)

    def add(
        self,
        audience: Audience | Collection[str],
        *,
        key_id: int | None = None,
        expires_at: float | None = None,
    ) -> Subscriber:
        """A new mailbox for `audience` (or every event of some channels); 503 (Unavailable)
        when shutting down or full. `key_id`: the key it was opened with (see revoked());
        `expires_at` (epoch seconds): when its credential ends, which ends the stream."""
        if self.closing:
            raise Unavailable("the server is shutting down; reconnect", retry_after=1)
        if len(self._all) >= self._cfg.max_subscribers:
            raise Unavailable(
                f"this process already serves {self._cfg.max_subscribers} streams (feed.max_subscribers)",
                retry_after=max(1, self._cfg.retry // 1000),
            )
        if not isinstance(audience, Audience):
            audience = Audience(frozenset(audience))
        sub = Subscriber(audience.channels, self._cfg.queue_size, self._overflow, audience)
        self._all.add(sub)
        for channel in sub.channels:
            if channel in audience.routed:
                self._by_owner[channel].setdefault(audience.owner, set()).add(sub)
            else:
                self._by_channel[channel].add(sub)
        if key_id is not None:
            sub.key_id = key_id
            self._by_key.setdefault(key_id, set()).add(sub)
        if expires_at is not None:
            loop = asyncio.get_running_loop()
            when = loop.time() + max(0.0, expires_at - time.time())
            sub.expiry = loop.call_at(when, sub.finish, self._expired)
        return sub

    def discard(self, sub: Subscriber) -> None:
        if sub not in self._all:
            return
        self._all.discard(sub)
        audience = sub.audience
        for channel in sub.channels:
            if channel in audience.routed:
                owners = self._by_owner[channel]
                group = owners.get(audience.owner)
                if group is not None:
                    group.discard(sub)
                    if not group:
                        del owners[audience.owner]
            else:
                self._by_channel[channel].discard(sub)
        if sub.key_id is not None:
            group = self._by_key.get(sub.key_id)
            if group is not None:
                group.discard(sub)
                if not group:
                    del self._by_key[sub.key_id]
        if sub.expiry is not None:
            sub.expiry.cancel()
            sub.expiry = None

    def revoked(self, key_id: int, lapsed: bool = False) -> None:
        """The key `key_id` is no longer valid: every stream opened with it (or with a stream
        token issued to it) gets the `revoked` frame (`expired` when it `lapsed`: a rotated
        key's overlap ran out) after what it has pending, and ends."""
        frame = self._expired if lapsed else self._revoked
        for sub in self._by_key.get(key_id, ()):
            sub.finish(frame)

    def shutdown(self) -> None:
        """Refuse new subscribers; every open stream gets the farewell frame (with a retry
        hint) after what it has pending, and ends."""
        self.closing = True
        for sub in self._all:
            sub.finish(self._farewell)

    def fan_out(self, entries: Iterable[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Each stream entry, encoded once, into the mailbox of every subscriber of its channel
        (and, on an owner-routed channel, of its owner)."""
        by_channel, by_owner = self._by_channel, self._by_owner
        for raw_id, fields in entries:
            channel = fields.get(b"c", b"").decode()
            subs = by_channel.get(channel)
            owners = by_owner.get(channel)
            mine = owners.get(fields.get(b"o", NOBODY)) if owners else None
            if not subs and not mine:
                continue
            frame = entry_frame(raw_id, fields)
            if frame is None:
                continue
            for group in (subs, mine):
                if group:
                    for sub in group:
                        if sub.push(frame):
                            self.overflows += 1
                            log.info(
                                "feed: a subscriber fell %d events behind; dropping it", self._cfg.queue_size
                            )

    async def heartbeat_loop(self) -> None:
        """One loop for all streams instead of timers per stream or per write: idle streams
        get a comment line (a write to a vanished client then fails, which releases it), and
        a stream whose write has waited longer than write_timeout is ended. The keys with
        streams open are looked at too (once per key, not per stream): one that stopped being
        valid without a revocation heard (a rotated key at the end of its overlap) ends them."""
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
            gone = self.key_gone
            if gone is not None:
                for key_id in [k for k in self._by_key if gone(k)]:
                    self.revoked(key_id, lapsed=True)
