"""Real-time feed: events in a capped Redis Stream, one reader per process fanning them out to
local subscribers, Last-Event-ID replay, heartbeats, and a ticker published by one elected leader.

Publishing is one XADD (from any process: the stream id is the event id). Every process runs
one blocking XREAD on that stream and pushes each event, encoded once to its text/event-stream
frame, into the bounded mailbox of every local subscriber of its channel. Nothing here sees a
web.Request: handlers/feed.py turns mailboxes into HTTP responses.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from typing import Any

import orjson
import redis.asyncio as aioredis
import redis.exceptions as redis_exc

from server.config import FeedConfig
from server.errors import Unavailable

log = logging.getLogger("hotpath.feed")

CHANNELS: tuple[str, ...] = ("ticker", "users", "tasks")
# An event name goes on an `event:` line: no newlines, nothing a client could trip on.
EVENT_NAME_PATTERN = "[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"
EVENT_NAME = re.compile(EVENT_NAME_PATTERN + r"\Z")
# Redis stream ids: "<ms>-<seq>" (a bare "<ms>" means "<ms>-0"), each part at most 19 digits.
_PART = "[0-9]{1,19}"  # ASCII only: \d takes any Nd digit
_EVENT_ID = re.compile(f"({_PART})(?:-({_PART}))?\\Z")
EVENT_ID_PATTERN = f"{_PART}(-{_PART})?"  # what parse_event_id() takes
STREAM_ID_PATTERN = f"{_PART}-{_PART}"  # what XADD gives and every event carries
# WHATWG: a line ends at CRLF, LF or CR; each line of the data becomes its own data: field.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_READ_BLOCK_MS = 5000
_READ_COUNT = 512
# Anything Redis can answer or fail with; the background loops log it, back off and go on.
_REDIS_ERRORS = (redis_exc.RedisError, OSError, TimeoutError)

# Lease for the ticker: renew it when we hold it, take it when nobody does. Returns the next
# tick number while we lead, 0 otherwise (so a tick is only numbered by the current leader).
_LEASE_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
elseif not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  return 0
end
return redis.call('INCR', KEYS[2])
"""
_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

EventKey = tuple[int, int]


def parse_event_id(text: str) -> EventKey | None:
    """The ordered (ms, seq) pair of a stream id, or None when `text` is not one."""
    m = _EVENT_ID.match(text)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2) or 0)


def encode_event(
    data: str, *, event_id: str | None = None, event: str | None = None, retry: int | None = None
) -> bytes:
    """One text/event-stream frame (WHATWG HTML, server-sent events), UTF-8.

    `event` "message" (the default type) is left out, so plain `onmessage` handlers see it.
    Multi-line data becomes several data: lines, which the client joins with LF again.
    """
    parts: list[str] = []
    if event_id is not None:
        parts.append(f"id: {event_id}\n")
    if event is not None and event != "message":
        parts.append(f"event: {event}\n")
    if retry is not None:
        parts.append(f"retry: {retry}\n")
    for line in _LINE_BREAK.split(data):
        parts.append(f"data: {line}\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8", "replace")


def _payload(data: Any) -> str:
    """What goes in the data: lines: a string as it is, anything else as JSON."""
    if isinstance(data, str):
        return data
    return orjson.dumps(data).decode()


class Frame:
    """An encoded frame; `key` orders stream events (None for heartbeats and farewells)."""

    __slots__ = ("body", "key", "wire")

    def __init__(self, key: EventKey | None, body: bytes) -> None:
        self.key = key
        self.body = body
        # the body as the transport layer sends it (an HTTP/1.1 chunk), made once per event by
        # whoever first needs it and shared by every stream
        self.wire: bytes | None = None


HEARTBEAT = Frame(None, b": heartbeat\n\n")


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


class Feed:
    """The feed of one process: publish, subscribe, replay; owns the reader, heartbeat and
    ticker tasks (start() / close())."""

    def __init__(
        self, redis: aioredis.Redis, reader: aioredis.Redis, config: FeedConfig, node: str | None = None
    ) -> None:
        self._redis = redis
        self._reader = reader
        self._cfg = config
        self.node = node or secrets.token_hex(6)  # this process's (this app's) name in ticker events
        self.stream_key = f"{config.key_prefix}events"
        self._lock_key = f"{config.key_prefix}ticker:leader"
        self._seq_key = f"{config.key_prefix}ticker:seq"
        self._by_channel: dict[str, set[Subscriber]] = {c: set() for c in CHANNELS}
        self._subscribers: set[Subscriber] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_id = "0-0"
        self.closing = False
        self._stopping = False
        self.leader = False
        self.overflows = 0  # subscribers dropped for falling queue_size events behind
        self._lease = redis.register_script(_LEASE_SCRIPT)
        self._release = redis.register_script(_RELEASE_SCRIPT)
        self._overflow = Frame(
            None,
            encode_event(
                orjson.dumps({"reason": "client too slow: events were dropped; reconnect"}).decode(),
                event="overflow",
                retry=config.retry,
            ),
        )
        self._farewell = Frame(
            None,
            encode_event(
                orjson.dumps({"reason": "server shutting down; reconnect"}).decode(),
                event="shutdown",
                retry=config.retry,
            ),
        )

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Note where the stream ends now, then start reading it (and the ticker, if on)."""
        try:
            newest: Any = await self._redis.xrevrange(self.stream_key, count=1)
            # no stream yet: everything it will ever hold is new
            self._last_id = newest[0][0].decode() if newest else "0-0"
        except redis_exc.ResponseError as exc:  # the key is not a stream: the reader logs it
            log.warning("feed: cannot read %s: %s", self.stream_key, exc)
            self._last_id = f"{int(time.time() * 1000)}-0"
        self._tasks.append(asyncio.create_task(self._read_loop(), name="feed-reader"))
        self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="feed-heartbeat"))
        if self._cfg.ticker:
            self._tasks.append(asyncio.create_task(self._ticker_loop(), name="feed-ticker"))

    def shutdown(self) -> None:
        """Refuse new subscribers; every open stream gets the farewell frame (with a retry
        hint) after what it has pending, and ends."""
        self.closing = True
        for sub in self._subscribers:
            sub.finish(self._farewell)

    async def close(self) -> None:
        """Stop the tasks, give up the ticker lease, close the reader's connection."""
        self.shutdown()
        self._stopping = True
        reader = next((t for t in self._tasks if t.get_name() == "feed-reader"), None)
        others = [t for t in self._tasks if t is not reader]
        for task in others:
            task.cancel()
        # The reader sits in a blocking XREAD: closing its connection ends that call at once.
        # (Cancelling redis-py mid-read was seen to hang now and then in its own cleanup.)
        try:
            await self._reader.connection_pool.disconnect(inuse_connections=True)
        except Exception as exc:
            log.warning("feed: closing the reader connection: %s", exc)
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
        if self.leader:
            self.leader = False
            try:
                await self._release(keys=[self._lock_key], args=[self.node])
            except _REDIS_ERRORS as exc:
                log.warning("could not release the ticker lease: %s", exc)

    # -- subscribers ----------------------------------------------------------------------

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def subscribe(self, channels: Collection[str]) -> Subscriber:
        """A new mailbox for `channels`; 503 (Unavailable) when shutting down or full."""
        if self.closing:
            raise Unavailable("the server is shutting down; reconnect", retry_after=1)
        if len(self._subscribers) >= self._cfg.max_subscribers:
            raise Unavailable(
                f"this process already serves {self._cfg.max_subscribers} streams (feed.max_subscribers)",
                retry_after=max(1, self._cfg.retry // 1000),
            )
        sub = Subscriber(frozenset(channels), self._cfg.queue_size, self._overflow)
        self._subscribers.add(sub)
        for channel in sub.channels:
            self._by_channel[channel].add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)
        for channel in sub.channels:
            self._by_channel[channel].discard(sub)

    # -- publishing and history -----------------------------------------------------------

    async def publish(self, channel: str, event: str, data: Any) -> str:
        """Append an event to the stream; every subscriber of `channel` in every process gets
        it. `data`: a string is sent as it is (newlines allowed), anything else as JSON.
        Returns the event id. ValueError for an unknown channel or a bad event name."""
        if channel not in self._by_channel:
            raise ValueError(f"unknown channel {channel!r}; channels: {', '.join(CHANNELS)}")
        if not EVENT_NAME.match(event):
            raise ValueError(f"bad event name {event!r}: 1-64 of A-Z a-z 0-9 _ . : -")
        fields: dict[Any, Any] = {"c": channel, "e": event, "d": _payload(data).encode("utf-8", "replace")}
        entry_id: Any = await self._redis.xadd(
            self.stream_key, fields, maxlen=self._cfg.history, approximate=True
        )
        return str(entry_id.decode())

    async def publish_quietly(self, channel: str, event: str, data: Any) -> str | None:
        """publish() for side effects of a write that already succeeded: a failure is logged,
        never raised (the write must not fail because the feed could not be told)."""
        try:
            return await self.publish(channel, event, data)
        except Exception as exc:  # CancelledError is not an Exception and passes
            log.warning("feed: could not publish %s/%s: %s: %s", channel, event, type(exc).__name__, exc)
            return None

    async def replay(self, after: str, channels: Collection[str]) -> tuple[list[Frame], EventKey]:
        """Frames of `channels` published after the id `after`, from the stream's history,
        plus the key of the newest event accounted for. When `after` is older than the
        history (trimmed away) or unknown to this stream, the only frame is a `resync`."""
        after_key = parse_event_id(after)
        if after_key is None:
            raise ValueError(f"not an event id: {after!r}")
        pipe = self._redis.pipeline(transaction=True)  # one snapshot: the info and the range agree
        pipe.xinfo_stream(self.stream_key)
        pipe.xrange(self.stream_key, min=f"({after_key[0]}-{after_key[1]}", max="+")
        info, entries = await pipe.execute(raise_on_error=False)
        if isinstance(info, redis_exc.ResponseError):  # no stream at all: its history is gone
            return [self._resync(after, "0-0", "no history is kept")], (0, 0)
        if isinstance(info, Exception):
            raise info
        if isinstance(entries, Exception):
            raise entries
        newest = info["last-generated-id"].decode()
        newest_key = parse_event_id(newest) or (0, 0)
        first = info.get("first-entry")
        first_key = parse_event_id(first[0].decode()) if first else None
        trimmed = int(info.get("entries-added", 0)) > int(info["length"])
        if after_key > newest_key:
            return [self._resync(after, newest, "the id is not from this feed")], newest_key
        if trimmed and (first_key is None or after_key < first_key):
            return [self._resync(after, newest, "events after that id were trimmed")], newest_key
        wanted = set(channels)
        frames: list[Frame] = []
        last = after_key
        for raw_id, fields in entries:
            frame = self._frame(raw_id, fields)
            if frame is None or frame.key is None:
                continue
            last = frame.key
            if fields.get(b"c", b"").decode() in wanted:
                frames.append(frame)
        return frames, max(last, after_key)

    def _resync(self, after: str, newest: str, reason: str) -> Frame:
        data = orjson.dumps({"reason": reason, "last_event_id": after, "resume_from": newest}).decode()
        return Frame(parse_event_id(newest), encode_event(data, event_id=newest, event="resync"))

    @staticmethod
    def _frame(raw_id: bytes, fields: dict[bytes, bytes]) -> Frame | None:
        event_id = raw_id.decode()
        try:
            event = fields[b"e"].decode()
            data = fields[b"d"].decode("utf-8", "replace")
        except (KeyError, UnicodeDecodeError):
            return None
        if not EVENT_NAME.match(event):
            return None
        return Frame(parse_event_id(event_id), encode_event(data, event_id=event_id, event=event))

    # -- background tasks -----------------------------------------------------------------

    def _dispatch(self, entries: Iterable[tuple[bytes, dict[bytes, bytes]]]) -> None:
        for raw_id, fields in entries:
            self._last_id = raw_id.decode()
            subs = self._by_channel.get(fields.get(b"c", b"").decode())
            if not subs:
                continue
            frame = self._frame(raw_id, fields)
            if frame is None:
                continue
            for sub in subs:
                if sub.push(frame):
                    self.overflows += 1
                    log.info("feed: a subscriber fell %d events behind; dropping it", self._cfg.queue_size)

    async def _read_loop(self) -> None:
        """The process's one reader: blocking XREAD from the last id seen, so a reconnect to
        Redis resumes exactly where it left off."""
        delay = 0.1
        while True:
            try:
                reply: Any = await self._reader.xread(
                    {self.stream_key: self._last_id}, count=_READ_COUNT, block=_READ_BLOCK_MS
                )
            except _REDIS_ERRORS as exc:
                if self._stopping:
                    return
                log.warning("feed reader: %s: %s (retrying in %.1f s)", type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if self._stopping:
                return
            delay = 0.1
            started, cpu = time.perf_counter(), time.thread_time()
            for _key, entries in reply or ():
                self._dispatch(entries)
            took = time.perf_counter() - started
            if took > 0.05:  # the whole fan-out runs on this loop: worth knowing when it is long
                # CPU time well below the wall time: the process was waiting for the core
                log.info(
                    "feed: handed out events to %d streams in %.0f ms (%.0f ms of CPU)",
                    len(self._subscribers),
                    took * 1000,
                    (time.thread_time() - cpu) * 1000,
                )

    async def _heartbeat_loop(self) -> None:
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
            for sub in self._subscribers:
                since = sub.writing_since
                if since and now - since > cfg.write_timeout and sub.on_stall is not None:
                    sub.on_stall()
                elif ping:
                    sub.ping(HEARTBEAT)

    def _stopped(self) -> bool:
        return self._stopping

    async def _ticker_loop(self) -> None:
        """Every ticker_interval: hold (or try to take) the deployment-wide lease; the holder
        publishes the tick. A leader that dies stops renewing and another takes over when the
        lease runs out (3 intervals, at least 0.5 s)."""
        interval = self._cfg.ticker_interval
        lease_ms = int(max(3 * interval, 0.5) * 1000)
        loop = asyncio.get_running_loop()
        due = loop.time()
        # The flag, not only cancellation, ends the loop: redis-py cancelled mid-command may
        # raise a connection error instead of CancelledError, which the loop would survive and
        # close() would wait for forever (seen as a test teardown hanging now and then).
        while not self._stopped():
            try:
                value = int(
                    await self._lease(keys=[self._lock_key, self._seq_key], args=[self.node, lease_ms])
                )
                if bool(value) != self.leader:
                    log.info("feed ticker: %s", "leading" if value else "following")
                self.leader = bool(value)
                if value:
                    await self.publish("ticker", "message", self._tick(value))
            except _REDIS_ERRORS as exc:
                if self._stopped():
                    return
                log.warning("feed ticker: %s: %s", type(exc).__name__, exc)
            due += interval
            now = loop.time()
            if due < now:  # fell behind (a stall): skip the missed ticks rather than burst
                due = now + interval
            await asyncio.sleep(due - now)

    def _tick(self, value: int) -> dict[str, Any]:
        """The ticker event's data: the fields the old /stream-real-time clients read."""
        return {
            "timestamp": dt.datetime.now(dt.UTC).isoformat(),
            "value": value,
            "status": "active",
            "leader": self.node,
        }
