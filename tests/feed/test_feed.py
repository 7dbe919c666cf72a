"""The real-time feed: wire format, fan-out across app instances sharing Redis, replay,
resync, channels, slow consumers, the subscriber cap, heartbeats, shutdown, the ticker leader,
users events. Everything against the real Redis; nothing waits by sleeping."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
import redis.exceptions as redis_exc
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from handlers.feed import _direct_writer
from server.app import create_app
from server.config import Config
from server.errors import Unavailable
from server.feed import FEED
from server.feed.core import Feed
from server.feed.events import HEARTBEAT, Frame, encode_event, parse_event_id
from server.feed.subscribers import Subscriber
from tests.helpers import PYTHON, ROOT, free_port, replace, until, wait_ready

TOKEN = "test-admin-token"


def feed_cfg(cfg: Config, **values: Any) -> Config:
    base: dict[str, Any] = {"ticker": False, "admin_token": TOKEN}
    base.update(values)
    return replace(cfg, feed=base)


class SSE:
    """A text/event-stream parser over a client response (WHATWG rules, enough for tests)."""

    def __init__(self, resp: Any) -> None:
        self.resp = resp
        self.retry: int | None = None

    async def next(self, timeout: float = 5.0, comments: bool = False) -> dict[str, Any] | None:
        """The next event as {id, event, data} (or {comment} when asked), None at the end."""
        event: dict[str, Any] = {}
        data: list[str] = []
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.resp.content.readline()
                if not raw:
                    return None
                line = raw.decode("utf-8").rstrip("\n").rstrip("\r")
                if line == "":
                    if data:
                        event["data"] = "\n".join(data)
                        event.setdefault("event", "message")
                        return event
                    event = {}
                    continue
                if line.startswith(":"):
                    if comments:
                        return {"comment": line[1:].strip()}
                    continue
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data":
                    data.append(value)
                elif name in ("id", "event"):
                    event[name] = value
                elif name == "retry":
                    self.retry = int(value)
                    event["retry"] = int(value)

    async def until(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            ev = await self.next(timeout=max(0.01, deadline - time.monotonic()))
            assert ev is not None, "stream ended"
            if pred(ev):
                return ev


async def open_stream(client: Any, path: str = "/events", **kw: Any) -> tuple[Any, SSE]:
    resp = await client.get(path, **kw)
    assert resp.status == 200, await resp.text()
    return resp, SSE(resp)


async def subscribed(client: Any, n: int = 1) -> None:
    feed = client.server.app[FEED]
    await until(lambda: feed.subscriber_count >= n, what=f"{n} subscriber(s)")


def on_uvloop(config: Config, check: Callable[[Any], Awaitable[None]]) -> None:
    """Run `check(client)` against the app on uvloop, the loop run.py serves with. pytest's
    loop is the stock one, and the two differ where the feed cares: uvloop's transport is no
    asyncio.WriteTransport, and it writes and buffers in its own way."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        async with TestClient(TestServer(create_app(config))) as client:
            await check(client)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


async def raw_stream(client: Any, request: bytes, rcvbuf: int | None = None) -> tuple[Any, Any]:
    """A bare socket (optionally with a small receive buffer) that has sent `request`."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (client.host, client.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=rcvbuf or 2**16)
    writer.write(request)
    await writer.drain()
    return reader, writer


# -- wire format ---------------------------------------------------------------------------


def test_encode_event_splits_lines_and_names_fields() -> None:
    frame = encode_event("one\r\ntwo\rthree\nfour", event_id="5-1", event="user.created", retry=1500)
    assert frame == (
        b"id: 5-1\nevent: user.created\nretry: 1500\ndata: one\ndata: two\ndata: three\ndata: four\n\n"
    )
    # the default type is left out (plain onmessage handlers see it); leading spaces survive
    assert encode_event(" x", event="message") == b"data:  x\n\n"
    assert encode_event("") == b"data: \n\n"
    assert encode_event("héllo ✓").decode("utf-8") == "data: héllo ✓\n\n"


def test_event_ids_order_numerically() -> None:
    assert parse_event_id("10-0") > parse_event_id("9-5")  # type: ignore[operator]
    assert parse_event_id("7") == (7, 0)
    assert parse_event_id("7-x") is None
    assert parse_event_id("") is None


async def test_stream_headers_retry_and_published_event(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(feed_cfg(cfg, retry=1234)))
    resp, sse = await open_stream(client, headers={"Accept-Encoding": "gzip, br"})
    assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Accel-Buffering"] == "no"
    assert resp.headers["Content-Encoding"] == "identity"
    assert "X-Request-ID" in resp.headers
    await subscribed(client)
    posted = await client.post(
        "/events",
        json={"channel": "users", "event": "note", "data": "first line\nsecond line ✓"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert posted.status == 201
    event_id = (await posted.json())["id"]
    ev = await sse.next()
    assert sse.retry == 1234
    assert ev == {"id": event_id, "event": "note", "data": "first line\nsecond line ✓"}
    # JSON data stays on one data: line
    await client.app[FEED].publish("tasks", "task.progress", {"task_id": "t1", "progress": 0.5})
    ev = await sse.next()
    assert ev is not None and ev["event"] == "task.progress"
    assert orjson.loads(ev["data"]) == {"task_id": "t1", "progress": 0.5}
    resp.close()


async def test_publish_requires_the_admin_token(aiohttp_client: Any, cfg: Config) -> None:
    """feed.admin_token is an alias of a key with the feed:publish scope (the route not open)."""
    cfg = replace(cfg, auth={"open_routes": ()})
    client = await aiohttp_client(create_app(feed_cfg(cfg)))
    body = {"channel": "users", "event": "x", "data": 1}
    resp = await client.post("/events", json=body)
    assert resp.status == 401
    assert resp.headers["Content-Type"] == "application/problem+json"
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    resp = await client.post("/events", json=body, headers={"Authorization": "Bearer nope"})
    assert resp.status == 401
    assert resp.headers["Content-Type"] == "application/problem+json"
    bad = {"channel": "nope", "event": "bad name\n", "extra": 1}
    resp = await client.post("/events", json=bad, headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 422
    fields = {e["field"] for e in (await resp.json())["errors"]}
    assert fields == {"channel", "event", "data", "extra"}
    auth_json = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    resp = await client.post("/events", data=b"{", headers=auth_json)
    assert resp.status == 400

    closed = await aiohttp_client(create_app(feed_cfg(cfg, admin_token="")))
    resp = await closed.post("/events", json=body, headers={"Authorization": "Bearer anything"})
    assert resp.status == 401


# -- fan-out and channels --------------------------------------------------------------------


async def test_two_instances_sharing_redis_both_deliver(aiohttp_client: Any, cfg: Config) -> None:
    config = feed_cfg(cfg)
    one = await aiohttp_client(create_app(config))
    two = await aiohttp_client(create_app(config))
    resp1, sse1 = await open_stream(one)
    resp2, sse2 = await open_stream(two)
    await subscribed(one)
    await subscribed(two)
    event_id = await one.app[FEED].publish("users", "user.created", {"id": 7})
    for sse in (sse1, sse2):
        ev = await sse.next()
        assert ev == {"id": event_id, "event": "user.created", "data": '{"id":7}'}
    resp1.close()
    resp2.close()


async def test_channel_filter_and_unknown_channel(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(feed_cfg(cfg)))
    resp = await client.get("/events?channels=users,bogus")
    assert resp.status == 400
    assert resp.headers["Content-Type"] == "application/problem+json"
    assert "bogus" in (await resp.json())["detail"]
    resp = await client.get("/events", headers={"Last-Event-ID": "yesterday"})
    assert resp.status == 400
    resp = await client.head("/events")  # a stream never ends: no HEAD that would hang
    assert resp.status == 405

    users_resp, users = await open_stream(client, "/events?channels=users")
    legacy_resp, legacy = await open_stream(client, "/stream-real-time")  # default: ticker only
    await subscribed(client, 2)
    feed = client.app[FEED]
    await feed.publish("tasks", "task.progress", {"n": 1})
    await feed.publish("ticker", "message", {"timestamp": "t", "value": 1, "status": "active"})
    user_id = await feed.publish("users", "user.updated", {"n": 2})
    ev = await users.next()
    assert ev is not None and ev["id"] == user_id  # the tasks and ticker events were not sent
    ev = await legacy.next()
    assert ev is not None and ev["event"] == "message" and orjson.loads(ev["data"])["value"] == 1
    users_resp.close()
    legacy_resp.close()


# -- replay and resync -----------------------------------------------------------------------


async def test_last_event_id_replay_has_no_gaps_or_duplicates(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(feed_cfg(cfg, history=10_000)))
    feed: Feed = client.app[FEED]
    published: list[str] = []
    stop = asyncio.Event()

    async def publisher(name: str) -> None:
        n = 0
        while not stop.is_set():
            published.append(await feed.publish("tasks", "task.progress", {"by": name, "n": n}))
            n += 1
            await asyncio.sleep(0)

    resp, sse = await open_stream(client, "/events?channels=tasks")
    await subscribed(client)
    publishers = [asyncio.create_task(publisher(p)) for p in ("a", "b", "c")]
    received: list[str] = []
    try:
        # Four sessions, each cut off mid-stream and resumed while publishing goes on:
        # by header twice, then by query parameter (a fresh EventSource after a refusal).
        for session in range(4):
            for _ in range(40):
                ev = await sse.next()
                assert ev is not None
                received.append(ev["id"])
            resp.close()
            await until(lambda: feed.subscriber_count == 0, what="the cut stream to be released")
            if session < 2:
                resp, sse = await open_stream(
                    client, "/events?channels=tasks", headers={"Last-Event-ID": received[-1]}
                )
            else:
                resp, sse = await open_stream(client, f"/events?channels=tasks&last_event_id={received[-1]}")
        stop.set()
        await asyncio.gather(*publishers)
        last = max(published, key=parse_event_id)
        while received[-1] != last:
            ev = await sse.next()
            assert ev is not None
            received.append(ev["id"])
    finally:
        stop.set()
        await asyncio.gather(*publishers, return_exceptions=True)
        resp.close()
    expected = sorted(published, key=parse_event_id)
    assert received == expected[: len(received)]
    assert len(received) == len(expected)
    assert len(set(received)) == len(received)


async def test_reader_resumes_after_losing_redis(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(feed_cfg(cfg)))
    feed: Feed = client.app[FEED]
    resp, sse = await open_stream(client, "/events?channels=users")
    await subscribed(client)
    before = await feed.publish("users", "user.created", {"n": 1})
    assert (await sse.next() or {}).get("id") == before
    # Kill exactly this feed's reader connection (by its client name), then publish at once:
    # the reader reconnects and resumes from the last id it saw, so nothing is lost.
    r = aioredis.from_url(cfg.redis.url)
    try:
        clients = await r.client_list()
        mine = [c["id"] for c in clients if c.get("name") == f"hotpath-feed-reader-{feed.node}"]
        assert len(mine) == 1
        await r.client_kill_filter(_id=mine[0])
    finally:
        await r.aclose()
    during = [await feed.publish("users", "user.updated", {"n": n}) for n in range(3)]
    got = [(await sse.next(timeout=10) or {}).get("id") for _ in range(3)]
    assert got == during
    resp.close()


async def test_resync_when_the_id_is_older_than_history(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(feed_cfg(cfg, history=5)))
    feed: Feed = client.app[FEED]
    first = await feed.publish("users", "user.created", {"n": 0})
    # MAXLEN ~ trims whole stream nodes (100 entries each): publish well past one node
    ids = [await feed.publish("users", "user.created", {"n": n}) for n in range(1, 300)]
    resp, sse = await open_stream(client, "/events?channels=users", headers={"Last-Event-ID": first})
    ev = await sse.next()
    assert ev is not None and ev["event"] == "resync"
    assert ev["id"] == ids[-1]  # the client resumes from the newest event once it has resynced
    body = orjson.loads(ev["data"])
    assert body["last_event_id"] == first and body["resume_from"] == ids[-1]
    live = await feed.publish("users", "user.deleted", {"id": 1})
    ev = await sse.next()
    assert ev is not None and ev["id"] == live
    resp.close()

    # an id this feed never gave out (from the future, or from another deployment)
    resp, sse = await open_stream(client, "/events?last_event_id=99999999999999-0")
    ev = await sse.next()
    assert ev is not None and ev["event"] == "resync"
    resp.close()

    # ids still in the history replay normally
    resp, sse = await open_stream(client, "/events?channels=users", headers={"Last-Event-ID": ids[-3]})
    assert [(await sse.next() or {}).get("id") for _ in range(3)] == [ids[-2], ids[-1], live]
    resp.close()


# -- flow control, limits, liveness ----------------------------------------------------------


async def check_slow_consumer(client: Any) -> None:
    feed: Feed = client.server.app[FEED]
    reader, writer = await raw_stream(
        client, b"GET /events?channels=tasks HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", rcvbuf=4096
    )
    await subscribed(client)
    # The client reads nothing: the socket buffers fill, the events stop going straight to the
    # socket, the server's writes wait, the mailbox fills, and the feed gives up on this one.
    blob = "x" * 16384
    deadline = time.monotonic() + 30
    n = 0
    while not feed.overflows:
        assert time.monotonic() < deadline, "the slow consumer never overflowed"
        await feed.publish("tasks", "task.progress", {"n": n, "blob": blob})
        n += 1
        await asyncio.sleep(0)  # let the reader hand the event out
    # Now read everything the server sent: it ends with the overflow event, then EOF.
    data = await asyncio.wait_for(reader.read(-1), timeout=30)
    writer.close()
    await until(lambda: feed.subscriber_count == 0, what="the slow consumer to be released")
    text = data.decode()
    assert text.startswith("HTTP/1.1 200")
    # one frame, written in one piece, so no chunk boundary inside it
    before, farewell, after = text.partition("event: overflow\nretry: 3000\ndata: ")
    assert farewell, "no overflow event"
    assert "task.progress" in before and "task.progress" not in after  # it was the last event
    assert "too slow" in after


async def test_slow_consumer_gets_a_final_event_then_is_dropped(aiohttp_client: Any, cfg: Config) -> None:
    await check_slow_consumer(
        await aiohttp_client(create_app(feed_cfg(cfg, queue_size=4, write_timeout=30.0)))
    )


def test_slow_consumer_gets_a_final_event_then_is_dropped_on_uvloop(cfg: Config) -> None:
    on_uvloop(feed_cfg(cfg, queue_size=4, write_timeout=30.0), check_slow_consumer)


async def check_stalled_write(client: Any) -> None:
    feed: Feed = client.server.app[FEED]
    _reader, writer = await raw_stream(
        client, b"GET /events?channels=tasks HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", rcvbuf=4096
    )
    await subscribed(client)
    blob = "x" * 16384
    deadline = time.monotonic() + 30
    n = 0
    while feed.subscriber_count:
        assert time.monotonic() < deadline, "the stalled stream was never ended"
        await feed.publish("tasks", "task.progress", {"n": n, "blob": blob})
        n += 1
        await asyncio.sleep(0.001)
    assert feed.overflows == 0
    writer.close()


# a mailbox big enough never to overflow: what ends these streams is the write timeout
STALL = {"queue_size": 100_000, "write_timeout": 0.2, "heartbeat": 60.0}


async def test_a_stalled_write_ends_the_stream(aiohttp_client: Any, cfg: Config) -> None:
    await check_stalled_write(await aiohttp_client(create_app(feed_cfg(cfg, **STALL))))


def test_a_stalled_write_ends_the_stream_on_uvloop(cfg: Config) -> None:
    on_uvloop(feed_cfg(cfg, **STALL), check_stalled_write)


async def check_direct_path(client: Any) -> None:
    """An event for a stream whose task is parked goes straight to its socket: the feed's
    reader writes it, the stream's task does not wake (with 10,000 streams, one wake-up each
    was most of the fan-out time). Heartbeats too; a vanished client is still released."""
    feed: Feed = client.server.app[FEED]
    resp, sse = await open_stream(client, "/events?channels=users")
    await subscribed(client)
    (sub,) = feed._subscribers
    # (private state on purpose: what is tested is which task did the writing)
    await until(lambda: sub.direct is not None and sub._waiter is not None, what="the stream to park")
    parked = sub._waiter
    ids = [await feed.publish("users", "user.created", {"n": n}) for n in range(3)]
    assert [(await sse.next() or {}).get("id") for _ in ids] == ids
    assert await sse.next(comments=True) == {"comment": "heartbeat"}
    assert sub._waiter is parked, "the stream's task woke up for events it did not need to write"
    resp.close()
    await until(lambda: feed.subscriber_count == 0, what="the closed stream to be released")


async def test_events_go_straight_to_a_parked_stream(aiohttp_client: Any, cfg: Config) -> None:
    await check_direct_path(await aiohttp_client(create_app(feed_cfg(cfg, heartbeat=0.05))))


def test_events_go_straight_to_a_parked_stream_on_uvloop(cfg: Config) -> None:
    on_uvloop(feed_cfg(cfg, heartbeat=0.05), check_direct_path)


async def check_framing(client: Any) -> None:
    """What the direct writes put on the wire: an HTTP/1.1 chunk per event, and on HTTP/1.0
    (no chunked coding; the body ends with the connection) the bare frame."""
    feed: Feed = client.server.app[FEED]
    opening = b"retry: 3000\n: hotpath feed\n\n"
    for version, chunked in ((b"1.1", True), (b"1.0", False)):
        reader, writer = await raw_stream(
            client, b"GET /events?channels=users HTTP/%b\r\nHost: 127.0.0.1\r\n\r\n" % version
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/%b 200" % version)
        assert (b"Transfer-Encoding: chunked" in head) is chunked
        start = b"%x\r\n%b\r\n" % (len(opening), opening) if chunked else opening
        assert await asyncio.wait_for(reader.readexactly(len(start)), 5) == start
        await subscribed(client)
        event_id = await feed.publish("users", "note", "one\ntwo")
        frame = b"id: %b\nevent: note\ndata: one\ndata: two\n\n" % event_id.encode()
        want = b"%x\r\n%b\r\n" % (len(frame), frame) if chunked else frame
        assert await asyncio.wait_for(reader.readexactly(len(want)), 5) == want
        writer.close()

        async def released() -> bool:  # an event written once the server has seen the close ends it
            await feed.publish("users", "note", "after the close")
            return feed.subscriber_count == 0

        await until(released, what="the closed stream to be released")


async def test_event_framing_on_http_1_1_and_1_0(aiohttp_client: Any, cfg: Config) -> None:
    await check_framing(await aiohttp_client(create_app(feed_cfg(cfg))))


def test_event_framing_on_http_1_1_and_1_0_on_uvloop(cfg: Config) -> None:
    on_uvloop(feed_cfg(cfg), check_framing)


# The direct path writes frames to request.transport itself, beside StreamResponse.write (which
# is a coroutine: awaiting it per stream is the task wake-up the direct path exists to avoid).
# That leans on how aiohttp frames and sends a body (checked on aiohttp 3.14.5): a chunk is
# "<hex length>\r\n<bytes>\r\n", and StreamResponse.write() hands its bytes to the transport at
# once, keeping none back. The oracle: a stream mixing direct writes with StreamResponse.write()
# puts on the wire exactly the bytes of one written through StreamResponse.write() alone.
ORACLE_FRAMES = [
    Frame((1, 0), b"id: 1-0\ndata: one\n\n"),
    HEARTBEAT,
    Frame((2, 0), b"data: " + b"x" * 5000 + b"\n\n"),
]


def oracle_app() -> web.Application:
    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        if request.version >= aiohttp.HttpVersion11:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"retry: 3000\n\n")
        sub = Subscriber(frozenset({"users"}), 10, HEARTBEAT)
        direct = _direct_writer(sub, request.transport, resp.chunked) if request.path == "/direct" else None
        for n, frame in enumerate([*ORACLE_FRAMES, *ORACLE_FRAMES]):
            if direct is not None and n % 2 == 0:  # direct, public, direct, ...
                assert direct(frame) or (frame.key is not None and frame.key <= sub.sent)
            elif frame.key is None or frame.key > sub.sent:
                await resp.write(frame.body)
                sub.sent = frame.key or sub.sent
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/public", stream)
    app.router.add_get("/direct", stream)
    return app


async def check_direct_writes_match_stream_response(client: Any) -> None:
    for version in (b"1.1", b"1.0"):
        bodies = []
        for path in (b"/public", b"/direct"):
            reader, writer = await raw_stream(
                client, b"GET %b HTTP/%b\r\nHost: x\r\nConnection: close\r\n\r\n" % (path, version)
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/%b 200" % version)
            bodies.append(await asyncio.wait_for(reader.read(), 5))
            writer.close()
        public, direct = bodies
        assert direct == public, version
        if version == b"1.1":
            assert (
                public.endswith(b"0\r\n\r\n") and public.count(b"x" * 5000) == 1
            )  # the replayed one dropped


async def test_direct_writes_put_on_the_wire_what_stream_response_would(aiohttp_client: Any) -> None:
    await check_direct_writes_match_stream_response(await aiohttp_client(oracle_app()))


def test_direct_writes_put_on_the_wire_what_stream_response_would_on_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        async with TestClient(TestServer(oracle_app())) as client:
            await check_direct_writes_match_stream_response(client)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


async def test_subscriber_cap_answers_503_with_retry_after(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(feed_cfg(cfg, max_subscribers=1)))
    resp, _ = await open_stream(client)
    await subscribed(client)
    refused = await client.get("/events")
    assert refused.status == 503
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert int(refused.headers["Retry-After"]) >= 1
    resp.close()
    await until(lambda: client.app[FEED].subscriber_count == 0, what="release")
    again, _ = await open_stream(client)
    again.close()


async def test_heartbeats_and_dead_connections_released(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(feed_cfg(cfg, heartbeat=0.05)))
    resp, sse = await open_stream(client)
    seen = await sse.next(comments=True)
    assert seen == {"comment": "hotpath feed"}
    seen = await sse.next(comments=True)
    assert seen == {"comment": "heartbeat"}
    # a client that vanishes without a word is found by the next heartbeat write
    resp.close()
    await until(lambda: client.app[FEED].subscriber_count == 0, what="the dead stream to be released")


async def test_shutdown_sends_a_farewell_and_ends_streams(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(feed_cfg(cfg, retry=777)))
    _resp, sse = await open_stream(client)
    await subscribed(client)
    pending = await client.app[FEED].publish("users", "user.created", {"id": 1})
    await sse.until(lambda ev: ev.get("id") == pending)
    await client.app.shutdown()  # what run_app / the runner calls on SIGTERM
    ev = await sse.next()
    assert ev is not None and ev["event"] == "shutdown" and ev["retry"] == 777
    assert await sse.next() is None  # and the stream ends
    with pytest.raises(Unavailable):  # no new streams while shutting down (503 with Retry-After)
        client.app[FEED].subscribe(["users"])


# -- built-in sources ------------------------------------------------------------------------


async def test_ticker_has_one_leader_and_another_takes_over(aiohttp_client: Any, cfg: Config) -> None:
    config = replace(cfg, feed={"ticker": True, "ticker_interval": 0.05})
    one = await aiohttp_client(create_app(config))
    two = await aiohttp_client(create_app(config))
    resp, sse = await open_stream(two, "/stream-real-time")
    ticks = [orjson.loads((await sse.next() or {})["data"]) for _ in range(12)]
    assert {"timestamp", "value", "status"} <= set(ticks[0])
    leaders = {t["leader"] for t in ticks}
    assert len(leaders) == 1  # one publisher for the whole deployment
    values = [t["value"] for t in ticks]
    assert values == list(range(values[0], values[0] + 12))  # once per interval, no doubles
    feeds = {one.app[FEED].node: one, two.app[FEED].node: two}
    assert set(feeds) > leaders
    leader = feeds[leaders.pop()]
    follower = one if leader is two else two
    assert not follower.app[FEED].leader
    if leader is two:
        resp.close()
        resp, sse = await open_stream(one, "/stream-real-time")
    await leader.close()  # the leader goes away; the other process takes the lease
    ev = await sse.until(lambda ev: orjson.loads(ev["data"])["leader"] == follower.app[FEED].node)
    assert orjson.loads(ev["data"])["value"] > values[-1]
    resp.close()


async def test_close_ends_a_ticker_whose_cancellation_became_a_redis_error(
    aiohttp_client: Any, cfg: Config
) -> None:
    """redis-py cancelled in the middle of a command may raise a connection error instead of
    CancelledError; the ticker must still stop when the feed closes, not loop on forever."""
    client = await aiohttp_client(create_app(replace(cfg, feed={"ticker": True, "ticker_interval": 0.05})))
    feed = client.app[FEED]
    inside = asyncio.Event()
    lease = feed._ticker.lease

    async def lease_that_turns_cancellation_into_an_error(**kw: Any) -> Any:
        inside.set()
        try:
            await asyncio.sleep(3600)  # a command that is still waiting when close() cancels
        except asyncio.CancelledError:
            raise redis_exc.ConnectionError("Connection closed by server.") from None
        return await lease(**kw)

    feed._ticker.lease = lease_that_turns_cancellation_into_an_error  # type: ignore[assignment]
    await asyncio.wait_for(inside.wait(), 10)
    await asyncio.wait_for(feed.close(), 10)  # hung forever before the loop looked at its flag
    assert all(task.done() for task in asyncio.all_tasks() if task.get_name() == "feed-ticker")


@pytest.mark.slow
async def test_ticker_survives_its_leader_being_killed(aiohttp_client: Any, cfg: Config) -> None:
    # The leader is a real run.py process; SIGKILL gives it no chance to release its lease.
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": cfg.database.url,
        "REDIS_URL": cfg.redis.url,
        "HOTPATH_FEED_TICKER_INTERVAL": "0.1",
    }
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "run.py", "--port", str(port), cwd=ROOT, env=env, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        async with aiohttp.ClientSession() as session:
            # ready, and so already leading: nobody else holds the lease
            await wait_ready(session, f"http://127.0.0.1:{port}", proc, timeout=60)
        follower = await aiohttp_client(create_app(replace(cfg, feed={"ticker_interval": 0.1})))
        resp, sse = await open_stream(follower, "/stream-real-time")
        # wait for the other process's ticks (it started first, so it leads)
        ev = await sse.until(lambda ev: orjson.loads(ev["data"])["leader"] != follower.app[FEED].node, 60)
        last = orjson.loads(ev["data"])["value"]
        assert not follower.app[FEED].leader
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        killed_at = time.monotonic()
        ev = await sse.until(lambda ev: orjson.loads(ev["data"])["leader"] == follower.app[FEED].node, 10)
        # the lease (3 intervals, at least 0.5 s) ran out, then the follower took it
        assert time.monotonic() - killed_at < 5
        assert orjson.loads(ev["data"])["value"] > last
        resp.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_users_writes_publish_events(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(feed_cfg(cfg)))
    resp, sse = await open_stream(client, "/events?channels=users")
    await subscribed(client)
    created = await client.post("/users", json={"name": "Ada", "email": "ada@example.com"})
    assert created.status == 201
    user = await created.json()
    ev = await sse.next()
    assert ev is not None and ev["event"] == "user.created"
    assert orjson.loads(ev["data"])["email"] == "ada@example.com"
    patched = await client.patch(f"/users/{user['id']}", json={"name": "Ada L."})
    assert patched.status == 200
    ev = await sse.next()
    assert ev is not None and ev["event"] == "user.updated"
    assert orjson.loads(ev["data"])["name"] == "Ada L."
    deleted = await client.delete(f"/users/{user['id']}")
    assert deleted.status == 204
    ev = await sse.next()
    assert ev is not None and ev["event"] == "user.deleted"
    assert orjson.loads(ev["data"]) == {"id": user["id"]}
    resp.close()


async def test_a_failing_publish_does_not_fail_the_write(
    aiohttp_client: Any, cfg: Config, caplog: pytest.LogCaptureFixture
) -> None:
    config = feed_cfg(cfg, key_prefix="hotpath:broken-feed:")
    # A real Redis error: the stream key holds a string, so every XADD fails with WRONGTYPE.
    r = aioredis.from_url(cfg.redis.url)
    await r.set("hotpath:broken-feed:events", "not a stream")
    await r.aclose()
    client = await aiohttp_client(create_app(config))
    created = await client.post("/users", json={"name": "Bob", "email": "bob@example.com"})
    assert created.status == 201
    user_id = (await created.json())["id"]
    assert (await client.patch(f"/users/{user_id}", json={"name": "Rob"})).status == 200
    assert (await client.delete(f"/users/{user_id}")).status == 204
    failures = [r for r in caplog.records if "could not publish users/user." in r.getMessage()]
    assert len(failures) == 3


async def test_feed_page_is_self_contained(client: Any) -> None:
    resp = await client.get("/feed")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    html = await resp.text()
    assert "EventSource" in html
    assert '"/events"' in html
    assert "http://" not in html and "https://" not in html and "src=" not in html
