"""Private feed channels (issue 20): who receives which channel, tasks events routed to their
owner's key, stream tokens (POST /feed/tokens) and the streams that end with their credential.

The shipped access defaults (auth.open_routes = [], users and tasks private), real PostgreSQL and
Redis; keys are made through the key store as `run.py keys create` makes them. Nothing sleeps:
every wait is for an event, or polls to a deadline."""

from __future__ import annotations

import asyncio
import secrets
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from server.access import ACCESS
from server.access.apikeys import KeyRecord
from server.access.guard import STREAM_COOKIE
from server.app import create_app, create_worker_app
from server.config import Config
from server.feed import FEED
from server.feed.task_events import publish_task
from tests.feed.test_feed import SSE, feed_cfg, subscribed
from tests.feed.test_task_events import NOTE, events_until_end
from tests.helpers import bearer, new_key, replace, until
from tests.jobs.test_jobs import FAST, truncate_jobs


@pytest.fixture
def pcfg(cfg: Config) -> Config:
    """Every route guarded as shipped (the suite opens them all), users and tasks private; a
    stream of this test's own (other test runs may share the Redis database, and publish)."""
    return replace(
        feed_cfg(cfg),
        auth={"open_routes": ()},
        feed={"private_channels": ("users", "tasks"), "key_prefix": f"hotpath:test:{secrets.token_hex(6)}:"},
    )


async def make_key(client: Any, *scopes: str, expires_at: datetime | None = None) -> tuple[KeyRecord, str]:
    """A new key with `scopes`, known to the app at once (as POST /admin/keys makes one)."""
    return await new_key(client.app, scopes, f"test {' '.join(scopes)}", expires_at=expires_at)


async def stream(client: Any, path: str = "/events", **kw: Any) -> SSE:
    resp = await client.get(path, **kw)
    assert resp.status == 200, await resp.text()
    return SSE(resp)


async def refused(client: Any, path: str, status: int, **kw: Any) -> dict[str, Any]:
    resp = await client.get(path, **kw)
    assert resp.status == status, await resp.text()
    assert resp.headers["Content-Type"] == "application/problem+json"
    problem: dict[str, Any] = await resp.json()
    return problem


async def token_for(client: Any, key: str, channels: list[str], **extra: Any) -> str:
    resp = await client.post("/feed/tokens", json={"channels": channels, **extra}, headers=bearer(key))
    assert resp.status == 201, await resp.text()
    token: str = (await resp.json())["token"]
    return token


async def ending(sse: SSE, timeout: float = 5.0) -> dict[str, Any]:
    """The stream's last event: it must be followed by the end of the stream."""
    last: dict[str, Any] | None = None
    while (event := await sse.next(timeout=timeout)) is not None:
        last = event
    assert last is not None, "the stream ended without a word"
    return last


# ---------------------------------------------------------------- who sees which channel


async def test_anonymous_sees_the_ticker_but_not_users_or_tasks(aiohttp_client: Any, pcfg: Config) -> None:
    client = await aiohttp_client(create_app(pcfg))
    feed = client.app[FEED]
    sse = await stream(client)  # the default channels, narrowed to the public one
    legacy = await stream(client, "/stream-real-time")
    await subscribed(client, 2)
    await feed.publish("users", "user.created", {"id": 1, "email": "ada@example.com"})
    await feed.publish("tasks", "task.created", {"task_id": 1}, owner=1)
    await feed.publish("tasks", "task.created", {"task_id": 2})
    tick = await feed.publish("ticker", "message", {"value": 1})
    assert await sse.next() == {"id": tick, "event": "message", "data": '{"value":1}'}
    assert (await legacy.next() or {}).get("id") == tick
    # the history replays by the same rules
    first = await stream(client, headers={"Last-Event-ID": "0-1"})
    assert (await first.next() or {}).get("id") == tick

    for path in (
        "/events?channels=users",
        "/events?channels=ticker,tasks",
        "/stream-real-time?channels=users",
    ):
        problem = await refused(client, path, 403)
        assert problem["channel"] in ("users", "tasks") and problem["channel"] in problem["detail"]


async def test_a_key_with_users_read_receives_user_created(aiohttp_client: Any, pcfg: Config) -> None:
    client = await aiohttp_client(create_app(pcfg))
    _, reader = await make_key(client, "users:read")
    _, writer = await make_key(client, "users:write")
    _, jobs_only = await make_key(client, "jobs")
    sse = await stream(client, "/events?channels=users", headers=bearer(reader))
    everything = await stream(client, headers=bearer(jobs_only))  # default: narrowed, no users
    await subscribed(client, 2)
    created = await client.post(
        "/users", json={"name": "Ada", "email": "ada@example.com"}, headers=bearer(writer)
    )
    assert created.status == 201, await created.text()
    event = await sse.until(lambda e: e["event"] == "user.created")
    assert orjson.loads(event["data"])["email"] == "ada@example.com"

    tick = await client.app[FEED].publish("ticker", "message", {"value": 2})
    assert (await everything.next() or {}).get("id") == tick  # the user event never reached it
    problem = await refused(client, "/events?channels=users", 403, headers=bearer(jobs_only))
    assert problem["channel"] == "users" and "users:read" in problem["scope"]


async def test_two_keys_each_receive_only_their_own_tasks(aiohttp_client: Any, pcfg: Config) -> None:
    client = await aiohttp_client(create_app(pcfg))
    feed = client.app[FEED]
    alice, alice_key = await make_key(client, "jobs")
    bob, bob_key = await make_key(client, "jobs")
    _, admin_key = await make_key(client, "admin")
    a = await stream(client, "/events?channels=tasks", headers=bearer(alice_key))
    b = await stream(client, "/events?channels=tasks", headers=bearer(bob_key))
    admin = await stream(client, "/events?channels=tasks", headers=bearer(admin_key))
    await subscribed(client, 3)

    snapshot = {"task_id": 1, "status": "queued", "attempts": 0, "owner": alice.owner}
    await publish_task(feed, snapshot, alice.owner)  # as the job engine's listener does
    first = await feed.publish("tasks", "task.progress", {"task_id": 2}, owner=bob.owner)
    nobody = await feed.publish("tasks", "task.progress", {"task_id": 3})  # made without a key
    last = await feed.publish("tasks", "task.completed", {"task_id": 1}, owner=alice.owner)

    got_a = [await a.next(), await a.next()]
    assert [e["event"] for e in got_a if e] == ["task.created", "task.completed"]
    assert [orjson.loads(e["data"])["task_id"] for e in got_a if e] == [1, 1]
    assert orjson.loads(got_a[0]["data"] if got_a[0] else "{}") == {
        "task_id": 1,
        "status": "queued",
        "attempts": 0,
    }
    assert (await b.next() or {}).get("id") == first
    assert [(await admin.next() or {}).get("event") for _ in range(4)] == [
        "task.created",
        "task.progress",
        "task.progress",
        "task.completed",
    ]
    # nothing else reached bob: the next thing he gets is his own next event
    mine = await feed.publish("tasks", "task.completed", {"task_id": 2}, owner=bob.owner)
    assert (await b.next() or {}).get("id") == mine

    # a reconnect replays by the same rules: alice's own events after the id she names
    replay = await stream(
        client, "/events?channels=tasks", headers={**bearer(alice_key), "Last-Event-ID": first}
    )
    assert (await replay.next() or {}).get("id") == last
    assert nobody  # only admin saw it (above)

    # anonymous callers never get tasks, nor does a key without jobs
    _, reader = await make_key(client, "users:read")
    assert (await refused(client, "/events?channels=tasks", 403))["channel"] == "tasks"
    assert (await refused(client, "/events?channels=tasks", 403, headers=bearer(reader)))[
        "channel"
    ] == "tasks"


# ---------------------------------------------------------------- stream tokens


async def test_a_stream_token_grants_only_its_channels(aiohttp_client: Any, pcfg: Config) -> None:
    client = await aiohttp_client(create_app(pcfg))
    feed = client.app[FEED]
    _, key = await make_key(client, "users:read", "jobs")
    resp = await client.post("/feed/tokens", json={"channels": ["users"], "ttl": 60}, headers=bearer(key))
    assert resp.status == 201
    assert resp.headers["Cache-Control"] == "no-store"
    body = await resp.json()
    assert body["channels"] == ["users"] and body["token"].startswith("hps_")
    left = datetime.fromisoformat(body["expires_at"]) - datetime.now(UTC)
    assert timedelta(seconds=58) < left <= timedelta(seconds=60)
    token = body["token"]

    sse = await stream(client, f"/events?token={token}")  # the default channels: the token's
    await subscribed(client)
    await feed.publish("ticker", "message", {"value": 1})
    await feed.publish("tasks", "task.created", {"task_id": 1})
    user = await feed.publish("users", "user.created", {"id": 1})
    assert (await sse.next() or {}).get("id") == user
    for channels in ("ticker", "tasks", "users,tasks"):
        problem = await refused(client, f"/events?channels={channels}&token={token}", 403)
        assert problem["channel"] in ("ticker", "tasks") and "stream token" in problem["detail"]
    assert (await refused(client, f"/stream-real-time?token={token}", 403))["channel"] == "ticker"
    assert (await refused(client, f"/tasks/1/events?token={token}", 403))["channel"] == "tasks"

    # the same token as a cookie, set by ?cookie=1 for the pages of this site
    resp = await client.post("/feed/tokens?cookie=1", json={"channels": ["users"]}, headers=bearer(key))
    assert resp.status == 201
    cookie = resp.cookies[STREAM_COOKIE]
    assert cookie.value == (await resp.json())["token"]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
    assert 0 < int(cookie["max-age"]) <= pcfg.auth.stream_token_ttl
    client.session.cookie_jar.clear()
    by_cookie = await stream(client, "/events", cookies={STREAM_COOKIE: cookie.value})
    await subscribed(client, 2)
    user = await feed.publish("users", "user.updated", {"id": 1})
    assert (await by_cookie.next() or {}).get("id") == user


async def test_stream_tokens_are_issued_for_readable_channels_only(aiohttp_client: Any, pcfg: Config) -> None:
    client = await aiohttp_client(create_app(pcfg))
    _, reader = await make_key(client, "read")
    _, metrics = await make_key(client, "metrics")
    assert await token_for(client, reader, ["ticker"])  # a public channel: any key
    for channels, channel in ((["users"], "users"), (["ticker", "tasks"], "tasks")):
        resp = await client.post("/feed/tokens", json={"channels": channels}, headers=bearer(reader))
        assert resp.status == 403
        assert (await resp.json())["channel"] == channel
    max_ttl = pcfg.auth.stream_token_max_ttl
    for body, fields in (
        ({"channels": ["ticker"], "ttl": max_ttl + 1}, {"ttl"}),
        ({"channels": ["ticker"], "ttl": 0.5}, {"ttl"}),
        ({"channels": ["ticker"], "ttl": True}, {"ttl"}),
        ({"channels": []}, {"channels"}),
        ({"channels": ["nope"], "extra": 1}, {"channels", "extra"}),
        ({}, {"channels"}),
    ):
        resp = await client.post("/feed/tokens", json=body, headers=bearer(reader))
        assert resp.status == 422, body
        assert {e["field"] for e in (await resp.json())["errors"]} == fields
    assert (await client.post("/feed/tokens", json={"channels": ["ticker"]})).status == 401
    resp = await client.post("/feed/tokens", json={"channels": ["ticker"]}, headers=bearer(metrics))
    assert resp.status == 403  # no scope that reads any channel


async def test_a_bad_stream_token_is_refused(aiohttp_client: Any, pcfg: Config) -> None:
    client = await aiohttp_client(create_app(pcfg))
    record, key = await make_key(client, "users:read")
    token = await token_for(client, key, ["users"])
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    for bad in ("nope", "hps_e30.AAAA", forged):
        resp = await client.get("/events", params={"token": bad})
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert resp.headers["Content-Type"] == "application/problem+json"
    access = client.app[ACCESS]
    assert access.store is not None
    await access.store.revoke("test", record.id)
    await access.changed(record.id)
    assert (await client.get("/events", params={"token": token})).status == 401  # its key is gone


# ---------------------------------------------------------------- streams end with their credential


async def test_an_expired_stream_token_ends_its_stream(aiohttp_client: Any, pcfg: Config) -> None:
    client = await aiohttp_client(create_app(replace(pcfg, feed={"retry": 2500})))
    _, key = await make_key(client, "users:read")
    # ttl 2: the token's expiry is a whole second, so it ends 1 to 2 s from now
    token = await token_for(client, key, ["users"], ttl=2)
    sse = await stream(client, "/events", params={"token": token})
    last = await ending(sse)
    assert last["event"] == "expired" and last["retry"] == 2500
    assert "stream token" in orjson.loads(last["data"])["reason"]
    await until(lambda: client.app[FEED].subscriber_count == 0, "the stream's end")
    # expired for good (on a new connection: the server closed the one the stream ended on)
    async with (
        aiohttp.ClientSession() as session,
        session.get(client.make_url("/events"), params={"token": token}) as resp,
    ):
        assert resp.status == 401


async def test_a_key_that_expires_ends_its_stream(aiohttp_client: Any, pcfg: Config) -> None:
    client = await aiohttp_client(create_app(pcfg))
    _, key = await make_key(client, "users:read", expires_at=datetime.now(UTC) + timedelta(seconds=1.5))
    sse = await stream(client, "/events?channels=users", headers=bearer(key))
    assert (await ending(sse))["event"] == "expired"


async def test_a_revoked_keys_streams_end_within_a_second(aiohttp_client: Any, pcfg: Config) -> None:
    """The key is revoked by another process (another app on the same PostgreSQL and Redis):
    every stream of it here, by header or by stream token, ends within a second; other keys'
    streams go on."""
    here = await aiohttp_client(create_app(pcfg))
    there = await aiohttp_client(create_app(pcfg))
    record, key = await make_key(here, "users:read", "jobs")
    _, other = await make_key(here, "users:read")
    token = await token_for(here, key, ["users", "tasks"])
    by_header = await stream(here, "/events?channels=users,tasks", headers=bearer(key))
    by_token = await stream(here, "/events", params={"token": token})
    bystander = await stream(here, "/events?channels=users", headers=bearer(other))
    await subscribed(here, 3)

    access = there.app[ACCESS]
    assert access.store is not None
    await access.store.revoke("test", record.id)
    started = time.monotonic()
    await access.changed(record.id)  # announced through Redis, as POST /admin/keys/{id}/revoke does
    ends = await asyncio.gather(ending(by_header, timeout=1.0), ending(by_token, timeout=1.0))
    assert time.monotonic() - started < 1.0
    assert [e["event"] for e in ends] == ["revoked", "revoked"]
    assert all(e["retry"] == pcfg.feed.retry for e in ends)
    await until(lambda: here.app[FEED].subscriber_count == 1, "the revoked key's streams' end")
    still = await here.app[FEED].publish("users", "user.created", {"id": 1})
    assert (await bystander.next() or {}).get("id") == still


async def test_a_rotated_keys_streams_end_with_its_overlap(aiohttp_client: Any, pcfg: Config) -> None:
    """A rotation announces no revocation: the old key just stops being valid when its overlap
    ends, which the feed's heartbeat loop notices (once per key with streams open)."""
    client = await aiohttp_client(create_app(replace(pcfg, feed={"heartbeat": 0.1})))
    record, key = await make_key(client, "users:read")
    sse = await stream(client, "/events?channels=users", headers=bearer(key))
    await subscribed(client)
    access = client.app[ACCESS]
    assert access.store is not None
    _, new, _ = await access.store.rotate("test", record.id, 1.0)
    await access.changed(record.id)
    await access.changed(new.id)
    assert (await ending(sse))["event"] == "expired"


async def test_tasks_made_over_http_reach_only_their_keys_streams(aiohttp_client: Any, pcfg: Config) -> None:
    """Each key makes a task with POST /send-notification: the task's events (from the job
    engine's listener) reach that key's stream alone."""
    await truncate_jobs(pcfg)
    client = await aiohttp_client(create_app(replace(pcfg, jobs={"concurrency": 0})))
    _, alice = await make_key(client, "jobs")
    _, bob = await make_key(client, "jobs")
    a = await stream(client, "/events?channels=tasks", headers=bearer(alice))
    b = await stream(client, "/events?channels=tasks", headers=bearer(bob))
    await subscribed(client, 2)

    async def task(key: str) -> int:
        resp = await client.post("/send-notification", json=NOTE, headers=bearer(key))
        assert resp.status == 202, await resp.text()
        task_id: int = (await resp.json())["task_id"]
        return task_id

    a1, b1, a2 = await task(alice), await task(bob), await task(alice)
    assert [orjson.loads((await a.next() or {})["data"])["task_id"] for _ in range(2)] == [a1, a2]
    event = await b.next()
    assert event is not None and event["event"] == "task.created"
    assert orjson.loads(event["data"])["task_id"] == b1 and "owner" not in orjson.loads(event["data"])


async def test_a_key_follows_its_own_task_to_its_end(
    aiohttp_client: Any, pcfg: Config, tmp_path: Path
) -> None:
    """GET /tasks/{id}/events with a key takes that key's task events only (by owner, as
    /events does), and follows its task run by a worker-only process to the end."""
    await truncate_jobs(pcfg)
    config = replace(pcfg, jobs=FAST, embedded={"data_dir": str(tmp_path)})
    client = await aiohttp_client(create_app(replace(config, jobs={"concurrency": 0})))  # runs none
    _, alice = await make_key(client, "jobs")
    created = await client.post("/send-notification", json=NOTE, headers=bearer(alice))
    assert created.status == 202
    task_id = (await created.json())["task_id"]
    resp = await client.get(f"/tasks/{task_id}/events", headers=bearer(alice))
    assert resp.status == 200
    runner = web.AppRunner(create_worker_app(config))
    await runner.setup()  # the worker takes the task; its changes reach the stream via the feed
    try:
        events = await events_until_end(resp)
    finally:
        await runner.cleanup()
    assert events[0]["event"] == "task.created" and events[-1]["event"] == "task.completed"
    assert {e["task_id"] for e in events} == {task_id}


async def test_an_open_route_reads_every_channel_and_unowned_tasks(aiohttp_client: Any, pcfg: Config) -> None:
    """auth.open_routes naming `events` (the migration path): callers without a key read the
    private channels again, and get the task events of the tasks made without a key only."""
    client = await aiohttp_client(create_app(replace(pcfg, auth={"open_routes": ("events",)})))
    feed = client.app[FEED]
    sse = await stream(client, "/events?channels=users,tasks")
    await subscribed(client)
    user = await feed.publish("users", "user.created", {"id": 1})
    await feed.publish("tasks", "task.created", {"task_id": 1}, owner=12345)
    unowned = await feed.publish("tasks", "task.created", {"task_id": 2})
    assert [(await sse.next() or {}).get("id") for _ in range(2)] == [user, unowned]
    replay = await stream(client, "/events?channels=tasks", headers={"Last-Event-ID": user})
    assert (await replay.next() or {}).get("id") == unowned
    # /stream-real-time is not opened: its private channels stay closed to callers without a key
    assert (await refused(client, "/stream-real-time?channels=users", 403))["channel"] == "users"
