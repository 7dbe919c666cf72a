"""Background-job changes on the feed's `tasks` channel, and reading them back per task."""

from __future__ import annotations

from typing import Any

import orjson

from server.feed.core import Feed
from server.feed.events import Frame

FINAL = frozenset({"completed", "failed", "cancelled"})


def event_name(snapshot: dict[str, Any]) -> str:
    """task.created (just queued), task.retrying (queued again after a failed attempt),
    task.progress (processing), or task.completed / task.failed / task.cancelled."""
    status = snapshot["status"]
    if status == "queued":
        return "task.created" if snapshot["attempts"] == 0 else "task.retrying"
    if status == "processing":
        return "task.progress"
    return f"task.{status}"


async def publish_task(feed: Feed, snapshot: dict[str, Any]) -> None:
    """A job listener (server.jobs.runner.Engine.listeners): every change goes out on `tasks`.
    publish_quietly: a job never fails because the feed could not be told."""
    await feed.publish_quietly("tasks", event_name(snapshot), snapshot)


def frame_data(frame: Frame) -> dict[str, Any] | None:
    """The JSON object a `tasks` frame carries (None for heartbeats and anything else)."""
    lines = [line[5:].lstrip(b" ") for line in frame.body.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    try:
        data = orjson.loads(b"\n".join(lines))
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None
