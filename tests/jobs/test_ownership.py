"""A task belongs to the key family that made it: over HTTP each key sees, follows, cancels and
reads the reports of its own tasks only (another's are 404), an admin sees every task, an
anonymous caller on an open route sees the tasks made without a key; Idempotency-Key is per
owner. Real PostgreSQL and Redis, keys made in the keys table."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from server.access import ACCESS, KeyStore
from server.access.scopes import ADMIN, JOBS, USERS_READ
from server.app import create_app
from server.config import Config
from server.jobs import JOBS as JOB_ENGINE
from server.jobs.queue import Job
from server.storage.pool import DB
from tests.feed.test_feed import SSE, feed_cfg
from tests.helpers import bearer, new_key, replace, until
from tests.jobs.test_jobs import FAST, truncate_jobs

NOTE = {"recipient": "ops@example.com", "subject": "hello", "content": "an ownership test"}
REPORT = {"report_type": "signups", "start": "2026-01-01", "end": "2026-01-03"}


@pytest.fixture
async def ocfg(cfg: Config, tmp_path: Path) -> AsyncIterator[Config]:
    """The shipped access rules (no open route); no jobs run, so tasks stay queued."""
    await truncate_jobs(cfg)
    yield replace(
        feed_cfg(cfg),
        auth={"open_routes": ()},
        jobs={**FAST, "concurrency": 0},
        embedded={"data_dir": str(tmp_path)},
    )
    await truncate_jobs(cfg)


class Keys:
    """Keys made in the app's keys table, each as its Authorization header."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.store = KeyStore(client.app[DB])

    async def make(self, name: str, *scopes: str) -> tuple[dict[str, str], int]:
        """(headers presenting a new key, its owner)."""
        record, token = await new_key(self.client.app, scopes, name)
        return bearer(token), record.owner

    async def rotate(self, key_id: int) -> dict[str, str]:
        _, new, token = await self.store.rotate("test", key_id, 60.0)
        await self.client.app[ACCESS].changed(new.id)
        return {"Authorization": f"Bearer {token}"}


async def create(client: Any, headers: dict[str, str] | None, **extra: str) -> int:
    resp = await client.post("/send-notification", json=NOTE, headers={**(headers or {}), **extra})
    assert resp.status == 202, await resp.text()
    return int((await resp.json())["task_id"])


async def status(client: Any, task_id: int, headers: dict[str, str] | None) -> int:
    resp = await client.get(f"/task-status/{task_id}", headers=headers)
    await resp.read()
    return int(resp.status)


async def listed(client: Any, headers: dict[str, str] | None, query: str = "") -> list[int]:
    resp = await client.get(f"/tasks{query}", headers=headers)
    assert resp.status == 200, await resp.text()
    return [item["task_id"] for item in (await resp.json())["items"]]


async def assert_not_found(resp: Any, what: str) -> None:
    """A 404 problem, exactly as for an id nobody has."""
    assert resp.status == 404, (what, resp.status, await resp.text())
    assert resp.headers["Content-Type"] == "application/problem+json"
    assert (await resp.json())["status"] == 404


async def first_event(client: Any, task_id: int, headers: dict[str, str]) -> dict[str, Any]:
    resp = await client.get(f"/tasks/{task_id}/events", headers=headers)
    assert resp.status == 200, await resp.text()
    event = await SSE(resp).next()
    resp.close()
    assert event is not None
    return {"event": event["event"], **orjson.loads(event["data"])}


async def test_two_keys_each_see_only_their_own_tasks(aiohttp_client: Any, ocfg: Config) -> None:
    client = await aiohttp_client(create_app(ocfg))
    keys = Keys(client)
    alice, alice_owner = await keys.make("alice", JOBS)
    bob, _ = await keys.make("bob", JOBS)
    admin, _ = await keys.make("operator", ADMIN)  # `admin` alone reads and cancels every task
    a1, a2 = await create(client, alice), await create(client, alice)
    b1 = await create(client, bob)

    # status
    assert await status(client, a1, alice) == 200 and await status(client, b1, bob) == 200
    for task_id, stranger in ((a1, bob), (b1, alice)):
        await assert_not_found(await client.get(f"/task-status/{task_id}", headers=stranger), "status")
    for task_id in (a1, a2, b1):
        assert await status(client, task_id, admin) == 200
    body = await (await client.get(f"/task-status/{a1}", headers=alice)).json()
    assert body["task_id"] == a1 and "owner" not in body  # owner ids are not shown

    # the list, also per state and paged
    assert await listed(client, alice) == [a1, a2]
    assert await listed(client, bob) == [b1]
    assert await listed(client, admin) == [a1, a2, b1]
    assert await listed(client, alice, "?state=queued") == [a1, a2]
    assert await listed(client, bob, f"?state=queued&after={a1}") == [b1]
    assert await listed(client, alice, f"?after={a1}&limit=1") == [a2]
    assert await listed(client, admin, "?state=queued") == [a1, a2, b1]

    # the event stream's first frame
    first = await first_event(client, a1, alice)
    assert (first["event"], first["task_id"], first["status"]) == ("task.created", a1, "queued")
    assert "owner" not in first
    assert (await first_event(client, b1, admin))["task_id"] == b1
    for task_id, stranger in ((a1, bob), (b1, alice)):
        await assert_not_found(await client.get(f"/tasks/{task_id}/events", headers=stranger), "events")

    # cancellation: a stranger's DELETE is a 404 and changes nothing
    await assert_not_found(await client.delete(f"/task-status/{a1}", headers=bob), "cancel")
    assert (await (await client.get(f"/task-status/{a1}", headers=alice)).json())["status"] == "queued"
    resp = await client.delete(f"/task-status/{a1}", headers=alice)
    assert resp.status == 200 and (await resp.json())["status"] == "cancelled"
    resp = await client.delete(f"/task-status/{a1}", headers=alice)
    assert resp.status == 409  # its owner learns it is final; a stranger still gets 404
    await assert_not_found(await client.delete(f"/task-status/{a1}", headers=bob), "cancel final")
    resp = await client.delete(f"/task-status/{b1}", headers=admin)
    assert resp.status == 200 and (await resp.json())["status"] == "cancelled"

    # a task nobody has answers the same 404 as a stranger's
    await assert_not_found(await client.get("/task-status/987654321", headers=alice), "unknown")

    # the owner is the key's family: a rotated key keeps its tasks, the stored rows say so
    record = await keys.store.get(alice_owner)
    assert record is not None
    rotated = await keys.rotate(record.id)
    assert await listed(client, rotated) == [a1, a2]
    conn = await asyncpg.connect(ocfg.database.url)
    try:
        owners = dict(await conn.fetch("SELECT id, owner FROM jobs ORDER BY id"))
    finally:
        await conn.close()
    assert owners[a1] == owners[a2] == alice_owner and owners[b1] not in (None, alice_owner)


async def test_a_report_answers_only_the_owner_of_its_task(aiohttp_client: Any, ocfg: Config) -> None:
    client = await aiohttp_client(create_app(replace(ocfg, jobs={**FAST, "concurrency": 2})))
    keys = Keys(client)
    alice, alice_owner = await keys.make("alice", JOBS, USERS_READ)  # a report reads users
    bob, _ = await keys.make("bob", JOBS)
    admin, _ = await keys.make("operator", ADMIN)
    resp = await client.post("/generate-report", json=REPORT, headers=alice)
    assert resp.status == 202, await resp.text()
    task_id = (await resp.json())["task_id"]

    async def finished() -> Any:
        data = await (await client.get(f"/task-status/{task_id}", headers=alice)).json()
        return data if data["status"] in ("completed", "failed", "cancelled") else None

    done = await until(finished, "the report task to finish", 20)
    assert done["status"] == "completed", done
    url = done["result"]["report_url"]

    resp = await client.get(url, headers=alice)
    assert resp.status == 200 and (await resp.json())["task_id"] == task_id
    assert (await client.get(url, headers=admin)).status == 200
    await assert_not_found(await client.get(url, headers=bob), "report")
    await assert_not_found(await client.get("/reports/987654321", headers=alice), "unknown report")
    # the report keeps its owner after its task is cleaned up
    conn = await asyncpg.connect(ocfg.database.url)
    try:
        assert await conn.fetchval("SELECT owner FROM reports WHERE job_id = $1", task_id) == alice_owner
        await conn.execute("DELETE FROM jobs WHERE id = $1", task_id)
    finally:
        await conn.close()
    assert (await client.get(url, headers=alice)).status == 200
    await assert_not_found(await client.get(url, headers=bob), "report without its task")


async def test_anonymous_callers_on_open_routes_see_only_unowned_tasks(
    aiohttp_client: Any, ocfg: Config
) -> None:
    client = await aiohttp_client(create_app(replace(ocfg, auth={"open_routes": ("*",)})))
    alice, _ = await Keys(client).make("alice", JOBS)
    n1 = await create(client, None)  # no key: the task is nobody's
    a1 = await create(client, alice)  # a key on an open route still owns what it makes

    assert await listed(client, None) == [n1]
    assert await listed(client, alice) == [a1]
    assert await status(client, n1, None) == 200
    await assert_not_found(await client.get(f"/task-status/{a1}", headers=None), "anonymous status")
    await assert_not_found(await client.get(f"/tasks/{a1}/events"), "anonymous events")
    await assert_not_found(await client.delete(f"/task-status/{a1}"), "anonymous cancel")
    await assert_not_found(await client.get(f"/task-status/{n1}", headers=alice), "a key on nobody's")
    assert (await first_event(client, n1, {}))["task_id"] == n1
    resp = await client.delete(f"/task-status/{n1}")
    assert resp.status == 200 and (await resp.json())["status"] == "cancelled"
    assert await status(client, a1, alice) == 200


async def test_idempotency_keys_are_per_owner(aiohttp_client: Any, ocfg: Config) -> None:
    client = await aiohttp_client(create_app(replace(ocfg, auth={"open_routes": ("*",)})))
    keys = Keys(client)
    alice, alice_owner = await keys.make("alice", JOBS)
    bob, _ = await keys.make("bob", JOBS)
    same = {"Idempotency-Key": "order-42"}

    async def post(headers: dict[str, str], body: dict[str, str] = NOTE) -> tuple[int, Any]:
        resp = await client.post("/send-notification", json=body, headers={**headers, **same})
        return resp.status, await resp.json()

    status_a, first_a = await post(alice)
    status_b, first_b = await post(bob)
    status_n, first_n = await post({})  # anonymous, on the open route
    assert (status_a, status_b, status_n) == (202, 202, 202)
    ids = {first_a["task_id"], first_b["task_id"], first_n["task_id"]}
    assert len(ids) == 3  # a job of its own each, never someone else's

    for headers, first in ((alice, first_a), (bob, first_b), ({}, first_n)):
        again_status, again = await post(headers)
        assert again_status == 200 and again["task_id"] == first["task_id"]
    # the same key with a different request is still a 409, per owner
    other = {**NOTE, "subject": "something else"}
    assert (await post(alice, other))[0] == 409
    assert (await post({}, other))[0] == 409
    assert await status(client, first_b["task_id"], bob) == 200
    assert await status(client, first_b["task_id"], alice) == 404

    # stored: the anonymous key as it came, an owned one under its owner; still one UNIQUE column
    conn = await asyncpg.connect(ocfg.database.url)
    try:
        stored = dict(await conn.fetch("SELECT id, idempotency_key FROM jobs ORDER BY id"))
        unique = await conn.fetchval(
            "SELECT count(*) FROM pg_indexes WHERE tablename = 'jobs'"
            " AND indexdef LIKE 'CREATE UNIQUE INDEX % (idempotency_key)'"
        )
    finally:
        await conn.close()
    assert stored[first_n["task_id"]] == "order-42"
    assert stored[first_a["task_id"]] == f"{alice_owner} order-42"
    assert unique == 1
    # a client's key cannot take the namespaced form (no spaces), so it never meets an owner's
    resp = await client.post(
        "/send-notification", json=NOTE, headers={"Idempotency-Key": f"{alice_owner} order-42"}
    )
    assert resp.status == 422


async def test_old_workers_keep_working_against_the_new_schema(aiohttp_client: Any, ocfg: Config) -> None:
    """A rolling restart: the previous release's statements (no owner column) still run, and a
    report such a worker stores belongs to its task's owner all the same."""
    client = await aiohttp_client(create_app(ocfg))
    alice, alice_owner = await Keys(client).make("alice", JOBS)
    owned = await create(client, alice, **{"Idempotency-Key": "k"})
    conn = await asyncpg.connect(ocfg.database.url)
    try:
        old_insert = """
        INSERT INTO jobs (kind, payload, idempotency_key, max_attempts) VALUES ($1, $2::jsonb, $3, $4)
        ON CONFLICT (idempotency_key) DO NOTHING RETURNING id
        """
        old_id = await conn.fetchval(old_insert, "send_notification", orjson.dumps(NOTE).decode(), "k", 3)
        assert old_id is not None  # the raw key is free: the owned task's is namespaced
        assert await conn.fetchval(old_insert, "send_notification", "{}", "k", 3) is None
        old_store_report = """
        INSERT INTO reports (job_id, report_type, params, summary, rows)
        VALUES ($1, $2, $3::jsonb, $4::jsonb, $5::jsonb)
        ON CONFLICT (job_id) DO UPDATE
           SET params = EXCLUDED.params, summary = EXCLUDED.summary, rows = EXCLUDED.rows, created_at = now()
        RETURNING id
        """
        report_id = await conn.fetchval(old_store_report, owned, "signups", "{}", "{}", "[]")
        assert await conn.fetchval(old_store_report, owned, "signups", "{}", "{}", "[]") == report_id
        assert await conn.fetchval("SELECT owner FROM reports WHERE id = $1", report_id) == alice_owner
    finally:
        await conn.close()
    assert (await client.get(f"/reports/{report_id}", headers=alice)).status == 200
    assert await listed(client, alice) == [owned]  # the old worker's task is nobody's


async def test_job_listeners_get_the_owner_and_the_snapshot_hides_it(
    aiohttp_client: Any, ocfg: Config
) -> None:
    client = await aiohttp_client(create_app(ocfg))
    alice, alice_owner = await Keys(client).make("alice", JOBS)
    seen: list[Job] = []

    async def listener(job: Job) -> None:
        seen.append(job)

    client.app[JOB_ENGINE].listeners.append(listener)
    task_id = await create(client, alice)
    await client.delete(f"/task-status/{task_id}", headers=alice)
    assert [(j.id, j.owner, j.state) for j in seen] == [
        (task_id, alice_owner, "queued"),
        (task_id, alice_owner, "cancelled"),
    ]
    assert all("owner" not in j.snapshot() for j in seen)
