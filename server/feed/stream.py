"""The feed's Redis Stream: appending an event (from any process: the stream id is the event id),
reading the history back after a Last-Event-ID, and where the stream ends now."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from typing import Any

import orjson
import redis.asyncio as aioredis
import redis.exceptions as redis_exc

from server.config import FeedConfig
from server.feed.audience import Audience
from server.feed.events import (
    CHANNELS,
    EVENT_NAME,
    EventKey,
    Frame,
    encode_event,
    entry_frame,
    parse_event_id,
)

log = logging.getLogger("hotpath.feed")


def _payload(data: Any) -> str:
    """What goes in the data: lines: a string as it is, anything else as JSON."""
    if isinstance(data, str):
        return data
    return orjson.dumps(data).decode()


class EventStream:
    """The capped stream every process publishes to and reads from."""

    def __init__(self, redis: aioredis.Redis, config: FeedConfig) -> None:
        self._redis = redis
        self._history = config.history
        self.key = f"{config.key_prefix}events"

    async def newest_id(self) -> str:
        """The id of the newest event: a reader starting there sees only what comes next."""
        try:
            newest: Any = await self._redis.xrevrange(self.key, count=1)
        except redis_exc.ResponseError as exc:  # the key is not a stream: the reader logs it
            log.warning("feed: cannot read %s: %s", self.key, exc)
            return f"{int(time.time() * 1000)}-0"
        # no stream yet: everything it will ever hold is new
        return newest[0][0].decode() if newest else "0-0"

    async def publish(self, channel: str, event: str, data: Any, owner: int | None = None) -> str:
        """Append an event to the stream; every subscriber of `channel` in every process gets
        it (on an owner-routed channel, only those of `owner`). `data`: a string is sent as it
        is (newlines allowed), anything else as JSON; `owner` goes in a field of its own, never
        in what clients see. Returns the event id. ValueError for an unknown channel or a bad
        event name."""
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}; channels: {', '.join(CHANNELS)}")
        if not EVENT_NAME.match(event):
            raise ValueError(f"bad event name {event!r}: 1-64 of A-Z a-z 0-9 _ . : -")
        fields: dict[Any, Any] = {"c": channel, "e": event, "d": _payload(data).encode("utf-8", "replace")}
        if owner is not None:
            fields["o"] = str(int(owner))
        entry_id: Any = await self._redis.xadd(self.key, fields, maxlen=self._history, approximate=True)
        return str(entry_id.decode())

    async def publish_quietly(
        self, channel: str, event: str, data: Any, owner: int | None = None
    ) -> str | None:
        """publish() for side effects of a write that already succeeded: a failure is logged,
        never raised (the write must not fail because the feed could not be told)."""
        try:
            return await self.publish(channel, event, data, owner)
        except Exception as exc:  # CancelledError is not an Exception and passes
            log.warning("feed: could not publish %s/%s: %s: %s", channel, event, type(exc).__name__, exc)
            return None

    async def replay(self, after: str, audience: Audience | Collection[str]) -> tuple[list[Frame], EventKey]:
        """Frames for `audience` (or of some channels) published after the id `after`, from the
        stream's history, plus the key of the newest event accounted for. When `after` is older
        than the history (trimmed away) or unknown to this stream, the only frame is a `resync`."""
        if not isinstance(audience, Audience):
            audience = Audience(frozenset(audience))
        after_key = parse_event_id(after)
        if after_key is None:
            raise ValueError(f"not an event id: {after!r}")
        pipe = self._redis.pipeline(transaction=True)  # one snapshot: the info and the range agree
        pipe.xinfo_stream(self.key)
        pipe.xrange(self.key, min=f"({after_key[0]}-{after_key[1]}", max="+")
        info, entries = await pipe.execute(raise_on_error=False)
        if isinstance(info, redis_exc.ResponseError):  # no stream at all: its history is gone
            return [_resync(after, "0-0", "no history is kept")], (0, 0)
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
            return [_resync(after, newest, "the id is not from this feed")], newest_key
        if trimmed and (first_key is None or after_key < first_key):
            return [_resync(after, newest, "events after that id were trimmed")], newest_key
        admits = audience.admits
        frames: list[Frame] = []
        last = after_key
        for raw_id, fields in entries:
            frame = entry_frame(raw_id, fields)
            if frame is None or frame.key is None:
                continue
            last = frame.key
            if admits(fields.get(b"c", b"").decode(), fields.get(b"o")):
                frames.append(frame)
        return frames, max(last, after_key)


def _resync(after: str, newest: str, reason: str) -> Frame:
    data = orjson.dumps({"reason": reason, "last_event_id": after, "resume_from": newest}).decode()
    return Frame(parse_event_id(newest), encode_event(data, event_id=newest, event="resync"))
