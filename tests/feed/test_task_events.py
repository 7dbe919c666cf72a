"""GET /tasks/{id}/events: a task's changes as server-sent events, from whichever process runs it;
and every job change on the feed's `tasks` channel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from server.app import create_app, create_worker_app
from server.config import Config
from tests.feed.test_feed import SSE, feed_cfg
from tests.helpers import replace
from tests.jobs.test_jobs import FAST, truncate_jobs

NOTE = {"recipient": "ops@example.com", "subject": "hello", "content": "a task event test"}


@pytest.fixture
async def tcfg(cfg: Config, tmp_path: Path) -> AsyncIterator[Config]:
    await truncate_jobs(cfg)
    yield replace(feed_cfg(cfg), jobs=FAST, embedded={"data_dir": str(tmp_path)})
    await truncate_jobs(cfg)


async def events_until_end(resp: Any) -> list[dict[str, Any]]:
    sse, out = SSE(resp), []
    while (event := await sse.next(timeout=20)) is not None:
        out.append({"event": event.get("event", "message"), **orjson.loads(event["data"])})
    return out


async def test_a_task_run_by_another_process_streams_to_its_end(aiohttp_client: Any, tcfg: Config) -> None:
    # The web app runs no jobs: the task waits until a worker-only app (sharing PostgreSQL and
    # Redis, as `run.py worker` does) takes it, and its changes reach this stream via the feed.
    web_client = await aiohttp_client(create_app(replace(tcfg, jobs={**FAST, "concurrency": 0})))
    created = await web_client.post("/send-notification", json=NOTE)
    assert created.status == 202
    task_id = (await created.json())["task_id"]

    resp = await web_client.get(f"/tasks/{task_id}/events")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    sse = SSE(resp)
    first = await sse.next()
    assert first is not None and first["event"] == "task.created"
    assert orjson.loads(first["data"])["status"] == "queued"

    runner = web.AppRunner(create_worker_app(tcfg))
    await runner.setup()  # the worker starts taking jobs
    try:
        rest = await events_until_end(resp)  # ends by itself once the task is final
    finally:
        await runner.cleanup()
    assert [e["task_id"] for e in rest] == [task_id] * len(rest)
    assert rest[-1]["event"] == "task.completed" and rest[-1]["status"] == "completed"
    assert any(e["event"] == "task.progress" for e in rest)
    stamps = [e["updated_at"] for e in rest]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)  # in order, no repeats


async def test_a_finished_task_gives_its_final_state_and_ends(aiohttp_client: Any, tcfg: Config) -> None:
    client = await aiohttp_client(create_app(tcfg))
    task_id = (await (await client.post("/send-notification", json=NOTE)).json())["task_id"]
    while (await (await client.get(f"/task-status/{task_id}")).json())["status"] != "completed":
        await (await client.get(f"/tasks/{task_id}/events")).read()  # each stream ends at the state it saw
    events = await events_until_end(await client.get(f"/tasks/{task_id}/events"))
    assert [(e["event"], e["status"]) for e in events] == [("task.completed", "completed")]


async def test_unknown_task_is_404(aiohttp_client: Any, tcfg: Config) -> None:
    client = await aiohttp_client(create_app(tcfg))
    resp = await client.get("/tasks/987654321/events")
    assert resp.status == 404 and resp.headers["Content-Type"] == "application/problem+json"


async def test_job_changes_are_published_on_the_tasks_channel(aiohttp_client: Any, tcfg: Config) -> None:
    client = await aiohttp_client(create_app(tcfg))
    resp = await client.get("/events?channels=tasks")
    sse = SSE(resp)
    task_id = (await (await client.post("/send-notification", json=NOTE)).json())["task_id"]
    seen: list[tuple[str, str]] = []  # (updated_at, event) as they arrive
    while not seen or "task.completed" not in (e for _, e in seen):
        event = await sse.next(timeout=20)
        assert event is not None
        data = orjson.loads(event["data"])
        assert data["task_id"] == task_id
        seen.append((data["updated_at"], event["event"]))
    # The channel carries every change as its publisher sends it: the request's task.created
    # and the runner's first task.progress race to Redis (each publishes after its own
    # statement), so they may arrive in either order; updated_at orders them, as
    # GET /tasks/{id}/events does for its client.
    in_order = [e for _, e in sorted(seen)]
    assert in_order[0] == "task.created" and "task.progress" in in_order
    assert in_order[-1] == "task.completed"
    resp.close()
