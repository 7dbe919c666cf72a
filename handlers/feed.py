"""The real-time feed over server-sent events: the stream, publishing, stream tokens, and the
live page."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp_jinja2
import orjson
from aiohttp import HttpVersion11, web

from handlers.common import json_response, path_id
from server.access import ACCESS, route_opened, tokens
from server.access.guard import STREAM_COOKIE
from server.config import CONFIG
from server.errors import Unauthorized, ValidationFailed
from server.feed import FEED
from server.feed.audience import Audience, owned_by
from server.feed.core import Feed
from server.feed.events import (
    CHANNELS,
    EVENT_ID_PATTERN,
    EVENT_NAME,
    EVENT_NAME_PATTERN,
    STREAM_ID_PATTERN,
    Frame,
    encode_event,
    parse_event_id,
)
from server.feed.subscribers import Subscriber
from server.feed.task_events import FINAL, event_name, frame_data
from server.http.auth import PRINCIPAL
from server.http.operations import Param, Response, Schema, header, query
from server.http.reading import read_body
from server.http.streams import stream_headers
from server.jobs import JOBS
from server.jobs.queue import Viewer

log = logging.getLogger("hotpath.feed")

_TASKS = frozenset({"tasks"})
# The old service's /stream-real-time sent only ticker events (data: timestamp, value, status):
# its clients keep getting just those unless they ask for more. /events carries every channel.
LEGACY_CHANNELS = ("ticker",)
# Bytes a stream's socket may have waiting before events stop taking the direct path.
_DIRECT_LIMIT = 64 * 1024
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: pass each event through at once, do not buffer
    # Marks the body as final: compression layers (ours, nginx's gzip) leave it alone; a
    # compressor would hold events back until its buffer fills.
    "Content-Encoding": "identity",
}


# ---------------------------------------------------------------- shapes (the API document)

# What stream() and task_stream() send: each event as a client's parser sees it.
EVENT_STREAM = Response(
    "text/event-stream (WHATWG server-sent events): `retry:` first, then events with `id:` "
    "(a Redis stream id), `event:` (absent for ticker events, i.e. `message`) and `data:` "
    "lines (JSON, or text as published), heartbeat comments every feed.heartbeat seconds; "
    "`resync` when Last-Event-ID is older than the history, `overflow` before a too-slow "
    "client is dropped, `shutdown` when the server stops",
    content={
        "text/event-stream": {
            "type": "object",
            "required": ["data"],
            "properties": {
                "id": {"type": "string", "pattern": f"^{STREAM_ID_PATTERN}$"},
                "event": {"type": "string"},
                "data": {"type": "string", "description": "JSON (ticker: timestamp, value, status)"},
                "retry": {"type": "integer", "minimum": 0},
            },
        }
    },
    headers={
        name: {"schema": {"const": SSE_HEADERS[name]}} for name in ("Cache-Control", "X-Accel-Buffering")
    },
)
# What _channels() and _last_event_id() read.
_RESUME_ID = {"type": "string", "pattern": f"^{EVENT_ID_PATTERN}$"}
STREAM_QUERY: tuple[Param, ...] = (
    query("channels", f"comma-separated: {', '.join(CHANNELS)}"),
    query(
        "last_event_id", "resume after this id (the Last-Event-ID header wins when both are sent)", _RESUME_ID
    ),
    header("Last-Event-ID", "resume after this id (sent by EventSource when it reconnects)", _RESUME_ID),
)
# What publish() checks, and what _validate_event() takes and publish() answers.
FEED_EVENT = Schema(
    "FeedEvent",
    {
        "type": "object",
        "required": ["channel", "data"],
        "additionalProperties": False,
        "properties": {
            "channel": {"enum": list(CHANNELS)},
            "event": {"type": "string", "pattern": f"^{EVENT_NAME_PATTERN}$", "default": "message"},
            "data": {"description": "a string is sent as is (newlines allowed), anything else as JSON"},
        },
    },
)
# What issue_token() reads and answers.
FEED_TOKEN_REQUEST = Schema(
    "FeedTokenRequest",
    {
        "type": "object",
        "required": ["channels"],
        "additionalProperties": False,
        "properties": {
            "channels": {
                "type": "array",
                "items": {"enum": list(CHANNELS)},
                "minItems": 1,
                "uniqueItems": True,
                "description": "the channels the token may read; the key must be allowed to read each",
            },
            "ttl": {
                "type": "number",
                "minimum": 1,
                "description": "seconds the token lives (default auth.stream_token_ttl, at most "
                "auth.stream_token_max_ttl; never beyond the key's own expiry)",
            },
        },
    },
)
FEED_TOKEN = Schema(
    "FeedToken",
    {
        "type": "object",
        "required": ["token", "expires_at", "channels"],
        "properties": {
            "token": {"type": "string", "description": "hps_...: pass it as ?token= (EventSource) or cookie"},
            "expires_at": {"type": "string", "format": "date-time"},
            "channels": {"type": "array", "items": {"enum": list(CHANNELS)}},
        },
    },
)
TOKEN_QUERY: tuple[Param, ...] = (
    query(
        "cookie",
        f"1: also set the token as the cookie {STREAM_COOKIE} (HttpOnly, SameSite=Strict, Path=/), "
        "which streams of this site then take without ?token=",
    ),
)
FEED_PUBLISHED = Schema(
    "FeedPublished",
    {
        "type": "object",
        "required": ["id", "channel", "event"],
        "properties": {"id": {"type": "string"}, "channel": {"type": "string"}, "event": {"type": "string"}},
    },
)


def _channels(request: web.Request) -> tuple[str, ...] | None:
    """The channels the client named (?channels=), None when it named none."""
    raw = request.query.get("channels")
    if raw is None or not raw.strip():
        return None
    names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    unknown = [n for n in names if n not in CHANNELS]
    if unknown:
        raise web.HTTPBadRequest(
            text=f"unknown channel(s) {', '.join(map(repr, unknown))}; channels: {', '.join(CHANNELS)}"
        )
    return names


def _last_event_id(request: web.Request) -> str | None:
    """Last-Event-ID (what EventSource sends on reconnect) wins over ?last_event_id= (what a
    page or a command-line client puts in the URL the first time)."""
    value = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    if not value:
        return None
    value = value.strip()
    if parse_event_id(value) is None:
        raise web.HTTPBadRequest(
            text="Last-Event-ID / last_event_id must be an event id such as 1732540000000-0"
        )
    return value


async def _write(sub: Subscriber, resp: web.StreamResponse, data: bytes) -> None:
    """Most writes return at once (the transport buffers); one that has to wait for the client
    is timed by the feed's heartbeat loop (no timer per write: 10,000 streams x every event)."""
    sub.writing_since = asyncio.get_running_loop().time()
    try:
        await resp.write(data)
    finally:
        sub.writing_since = 0.0


def _subscribe(request: web.Request, feed: Feed, audience: Audience) -> Subscriber:
    """A mailbox for `audience`, tied to the caller's credential: a revocation of its key, or
    the expiry of the key or the stream token, ends the stream."""
    principal = request.get(PRINCIPAL)
    if principal is None:
        return feed.subscribe(audience)
    return feed.subscribe(audience, key_id=principal.key_id, expires_at=principal.expires_at)


def _opened(request: web.Request) -> bool:
    """The route is open by auth.open_routes: no channel is closed to anyone there."""
    return route_opened(request.app[CONFIG].auth, request.match_info.route.name or "")


async def stream(request: web.Request) -> web.StreamResponse:
    """GET /events and /stream-real-time: replay after Last-Event-ID, then live events, of the
    channels the caller may read (server/feed/audience.py)."""
    route = request.match_info.route.name
    default = LEGACY_CHANNELS if route == "stream_real_time" else CHANNELS
    feed = request.app[FEED]
    audience = feed.audience(request.get(PRINCIPAL), _channels(request), default, _opened(request))
    after = _last_event_id(request)
    cfg = request.app[CONFIG].feed
    # Subscribe first, then read the history: an event published in between is in both, and
    # the key comparison below drops the second copy. Nothing falls in the gap.
    sub = _subscribe(request, feed, audience)
    try:
        replayed: list[Frame] = []
        sent = (0, 0)
        if after is not None:
            replayed, sent = await feed.replay(after, audience)
        resp = web.StreamResponse(headers=SSE_HEADERS)
        if request.version >= HttpVersion11:
            # Chunked by our choice, not only by aiohttp's default for a body of no length: the
            # direct writer below has to know how the body is framed on the wire.
            resp.enable_chunked_encoding()
        stream_headers(request, resp)
        await resp.prepare(request)
        opening = b"retry: %d\n: hotpath feed\n\n" % cfg.retry
        transport = request.transport
        if transport is not None:
            sub.on_stall = transport.abort  # the pending write then fails with ConnectionError
        sub.sent = sent
        try:
            # prepare() only buffers the headers; this first write sends them, so from here on
            # the socket carries body bytes alone and may be written to directly.
            await _write(sub, resp, opening + b"".join(f.body for f in replayed))
            # (no isinstance test on the transport: uvloop's is not an asyncio.WriteTransport)
            if transport is not None and not resp.compression:
                sub.direct = _direct_writer(sub, transport, resp.chunked)
            await _pump(sub, resp, cfg.write_timeout)
        except (ConnectionError, TimeoutError) as exc:
            log.debug("feed stream ended: %s", type(exc).__name__)
            if request.transport is not None:
                request.transport.abort()
            resp.force_close()
        return resp
    finally:
        feed.unsubscribe(sub)


def _direct_writer(sub: Subscriber, transport: asyncio.Transport, chunked: bool) -> Callable[[Frame], bool]:
    """Subscriber.direct: one transport.write of the frame (as an HTTP/1.1 chunk, or as it is
    on an HTTP/1.0 body that ends with the connection), done by the feed's reader itself, as
    long as the socket keeps up (else False, and the frame goes through the mailbox and an
    awaited write that waits for the client, is timed, and overflows the mailbox if need be).

    Beside StreamResponse on purpose: its write() is a coroutine, and awaiting it for every
    parked stream is the task wake-up this path exists to avoid (bench/sse.py, 8,000 streams:
    p99 delivery 0.24-0.59 s this way, 1.3-1.5 s through the mailbox and write()). It relies on
    how aiohttp sends a body (checked on aiohttp 3.14.5): a chunk is its length in hex, CRLF,
    the bytes, CRLF; and write() has handed all its bytes to the transport when it returns.
    tests/feed/test_feed.py holds what goes on the wire this way to what write() alone puts there."""

    def direct(frame: Frame) -> bool:
        if transport.is_closing() or transport.get_write_buffer_size() > _DIRECT_LIMIT:
            return False
        key = frame.key
        if key is not None:
            if key <= sub.sent:
                return True  # already replayed
            sub.sent = key
        if chunked:
            wire = frame.wire
            if wire is None:
                body = frame.body
                wire = frame.wire = b"%x\r\n%b\r\n" % (len(body), body)
            transport.write(wire)
        else:
            transport.write(frame.body)
        return True

    return direct


async def _pump(sub: Subscriber, resp: web.StreamResponse, timeout: float) -> None:
    """Mailbox -> socket, everything waiting in one write, until a final frame (shutdown or
    overflow) has gone out."""
    while True:
        batch = await sub.next()
        out: list[bytes] = []
        for frame in batch:
            key = frame.key
            if key is not None:
                if key <= sub.sent:
                    continue  # already replayed
                sub.sent = key
            out.append(frame.body)
        final = sub.final
        if final is not None:
            out.append(final.body)
        if out:
            await _write(sub, resp, b"".join(out))
        if final is not None:
            sub.direct = None
            resp.force_close()  # the client reconnects (to this or another process) with its last id
            async with asyncio.timeout(timeout):
                await resp.write_eof()
            return


async def publish(request: web.Request) -> web.Response:
    """POST /events: {channel, event, data} -> {id} (the `feed:publish` scope, or feed.admin_token)."""
    body = await read_body(request)
    channel, event, data = _validate_event(body)
    event_id = await request.app[FEED].publish(channel, event, data)
    return json_response({"id": event_id, "channel": channel, "event": event}, status=201)


def _validate_event(body: Any) -> tuple[str, str, Any]:
    if not isinstance(body, dict):
        raise ValidationFailed([{"field": "body", "message": "must be an object {channel, event, data}"}])
    errors = []
    unknown = sorted(set(body) - {"channel", "event", "data"})
    for name in unknown:
        errors.append({"field": str(name), "message": "unknown field"})
    channel = body.get("channel")
    if channel not in CHANNELS:
        errors.append({"field": "channel", "message": f"must be one of {', '.join(CHANNELS)}"})
    event = body.get("event", "message")
    if not isinstance(event, str) or not EVENT_NAME.match(event):
        errors.append(
            {"field": "event", "message": "1-64 characters of A-Z a-z 0-9 _ . : - (a letter or digit first)"}
        )
    if "data" not in body:
        errors.append(
            {"field": "data", "message": "required (a string is sent as is, anything else as JSON)"}
        )
    if errors:
        raise ValidationFailed(errors)
    return str(channel), str(event), body["data"]


async def issue_token(request: web.Request) -> web.Response:
    """POST /feed/tokens: {channels, ttl?} -> 201 {token, expires_at, channels}: a signed,
    short-lived stream token for the calling key (server/access/tokens.py), for clients that
    cannot send Authorization (a browser's EventSource). ?cookie=1 also sets it as a cookie."""
    principal = request.get(PRINCIPAL)
    if principal is None or principal.key_id is None:
        raise Unauthorized(
            "a stream token is issued to an API key: send Authorization: Bearer <key>", invalid=False
        )
    auth = request.app[CONFIG].auth
    channels, ttl = _validate_token_request(
        await read_body(request), auth.stream_token_ttl, auth.stream_token_max_ttl
    )
    rights = request.app[FEED].channels
    for channel in channels:
        refusal = rights.refusal(principal, channel)
        if refusal is not None:
            raise refusal
    if principal.expires_at is not None:  # never outlives its key
        ttl = min(ttl, principal.expires_at - time.time())
    token, expires_at = tokens.issue(request.app[ACCESS].stream_secret, principal.key_id, channels, ttl)
    body = {
        "token": token,
        "expires_at": dt.datetime.fromtimestamp(expires_at, dt.UTC).isoformat(),
        "channels": channels,
    }
    resp = json_response(body, status=201, headers={"Cache-Control": "no-store"})
    if request.query.get("cookie") in ("1", "true"):
        resp.set_cookie(
            STREAM_COOKIE,
            token,
            max_age=max(0, int(expires_at - time.time())),
            path="/",
            secure=request.secure,
            httponly=True,
            samesite="Strict",
        )
    return resp


def _validate_token_request(body: Any, default_ttl: float, max_ttl: float) -> tuple[list[str], float]:
    if not isinstance(body, dict):
        raise ValidationFailed([{"field": "body", "message": "must be an object {channels, ttl}"}])
    errors = [
        {"field": str(name), "message": "unknown field"} for name in sorted(set(body) - {"channels", "ttl"})
    ]
    channels = body.get("channels")
    if (
        not isinstance(channels, list)
        or not channels
        or not all(isinstance(c, str) and c in CHANNELS for c in channels)
    ):
        errors.append(
            {"field": "channels", "message": f"a non-empty array of channels: {', '.join(CHANNELS)}"}
        )
        channels = []
    ttl = body.get("ttl", default_ttl)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 1 <= ttl <= max_ttl:
        errors.append(
            {"field": "ttl", "message": f"seconds, from 1 to {max_ttl:g} (auth.stream_token_max_ttl)"}
        )
    if errors:
        raise ValidationFailed(errors)
    return list(dict.fromkeys(channels)), float(ttl)


async def page(request: web.Request) -> web.Response:
    """GET /feed: the live page (inline script and style, no external assets); ?token= (a stream
    token) opens the private channels it names."""
    context = {"title": "Live feed", "events_url": str(request.app.router["events"].url_for())}
    resp = aiohttp_jinja2.render_template("feed.html", request, context)
    resp.headers["Cache-Control"] = "no-cache"
    # the page may carry a stream token in its URL (/feed?token=): no Referer repeats it
    resp.headers["Referrer-Policy"] = "no-referrer"
    return resp


async def task_stream(request: web.Request) -> web.StreamResponse:
    """GET /tasks/{id}/events: the task's state now, then each change of it as it happens,
    until it is completed, failed or cancelled (then the stream ends)."""
    task_id = path_id(request, "task_id", "task")
    feed = request.app[FEED]
    cfg = request.app[CONFIG].feed
    principal = request.get(PRINCIPAL)
    # The caller must be allowed the tasks channel (a stream token must name it). It can only
    # follow a task it may read (the reading below answers 404 for others), so its stream takes
    # the events of the tasks it may read alone: a key's own, every one for admin, the ones
    # made without a key for a caller without one (server/jobs/queue.py's Viewer).
    feed.audience(principal, ("tasks",), opened=_opened(request))
    audience = owned_by(principal, _TASKS, _TASKS)
    # Subscribe before reading the state: a change in between is not lost, and one older
    # than the state read (updated_at not newer) is dropped below.
    sub = _subscribe(request, feed, audience)
    try:
        # NotFound -> 404, also for another key's task
        snapshot = (await request.app[JOBS].get(task_id, Viewer.of(principal))).snapshot()
        first = orjson.loads(orjson.dumps(snapshot))  # as every later event: JSON types only
        resp = web.StreamResponse(headers=SSE_HEADERS)
        stream_headers(request, resp)
        await resp.prepare(request)
        await _write(
            sub, resp, encode_event(orjson.dumps(first).decode(), event=event_name(first), retry=cfg.retry)
        )
        seen = first["updated_at"]
        status = first["status"]
        try:
            while status not in FINAL:
                batch = await sub.next()
                out: list[bytes] = []
                for frame in batch:
                    if frame.key is None:  # heartbeat
                        out.append(frame.body)
                        continue
                    data = frame_data(frame)
                    if data is None or data.get("task_id") != task_id or data.get("updated_at", "") <= seen:
                        continue
                    seen, status = data["updated_at"], data.get("status", status)
                    out.append(frame.body)
                    if status in FINAL:
                        break
                if sub.final is not None and status not in FINAL:
                    out.append(sub.final.body)  # shutdown or overflow: the client reconnects
                if out:
                    await _write(sub, resp, b"".join(out))
                if sub.final is not None:
                    break
            async with asyncio.timeout(cfg.write_timeout):
                await resp.write_eof()
        except (ConnectionError, TimeoutError) as exc:
            log.debug("task stream ended: %s", type(exc).__name__)
            if request.transport is not None:
                request.transport.abort()
            resp.force_close()
        return resp
    finally:
        feed.unsubscribe(sub)
