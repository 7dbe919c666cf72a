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


async def publish_task(feed: Feed, snapshot: dict[str, Any], owner: int | None) -> None:
    """Through a job listener (server/jobs/__init__.py): every change of a task goes out on
    `tasks`, to the subscribers of its `owner` (the key family that made it; None: made without
    a key, so `admin` subscribers only while tasks is private). The owner travels beside the
    event, never in its data. publish_quietly: a job never fails because the feed could not
    be told."""
    if "owner" in snapshot:
        snapshot = {k: v for k, v in snapshot.items() if k != "owner"}
    await feed.publish_quietly("tasks", event_name(snapshot), snapshot, owner)


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
