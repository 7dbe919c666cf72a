"""The feed's events on the wire: channels, event names and ids, text/event-stream frames."""

from __future__ import annotations

import re

from server.config import FEED_CHANNELS

CHANNELS: tuple[str, ...] = FEED_CHANNELS
# An event name goes on an `event:` line: no newlines, nothing a client could trip on.
EVENT_NAME_PATTERN = "[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"
EVENT_NAME = re.compile(EVENT_NAME_PATTERN + r"\Z")
# Redis stream ids: "<ms>-<seq>" (a bare "<ms>" means "<ms>-0").
_PART = "[0-9]{1,19}"  # ASCII only: \d takes any Nd digit
_EVENT_ID = re.compile(f"({_PART})(?:-({_PART}))?\\Z")
EVENT_ID_PATTERN = f"{_PART}(-{_PART})?"  # what parse_event_id() takes
STREAM_ID_PATTERN = f"{_PART}-{_PART}"  # what XADD gives and every event carries
# WHATWG: a line ends at CRLF, LF or CR; each line of the data becomes its own data: field.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")

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


def entry_frame(raw_id: bytes, fields: dict[bytes, bytes]) -> Frame | None:
    """The frame of one stream entry (None when the entry is not a well-formed event)."""
    event_id = raw_id.decode()
    try:
        event = fields[b"e"].decode()
        data = fields[b"d"].decode("utf-8", "replace")
    except (KeyError, UnicodeDecodeError):
        return None
    if not EVENT_NAME.match(event):
        return None
    return Frame(parse_event_id(event_id), encode_event(data, event_id=event_id, event=event))
