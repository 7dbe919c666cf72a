"""Background jobs: the queue in PostgreSQL, the runner, the kinds of job."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from functools import partial

from aiohttp import web

from server.config import CONFIG
from server.feed import FEED
from server.feed.core import Feed
from server.feed.task_events import publish_task
from server.jobs.kinds import KINDS
from server.jobs.queue import Engine, Job
from server.jobs.runner import Runner
from server.runtime import metrics
from server.storage.pool import DB

log = logging.getLogger("hotpath.resources")

JOBS = web.AppKey("hotpath.jobs", Engine)
# None when this process runs no jobs (jobs.concurrency = 0).
JOB_RUNNER: web.AppKey[Runner | None] = web.AppKey("hotpath.job_runner")


async def jobs_ctx(app: web.Application) -> AsyncIterator[None]:
    """The job engine under JOBS (enqueue, status, cancel) and, when jobs.concurrency > 0, this
    process's job runner under JOB_RUNNER. Last in cleanup_ctx: at shutdown running jobs finish
    (up to jobs.shutdown_timeout) while the pool and every other resource are still open."""
    config = app[CONFIG]
    engine = Engine(app[DB], config.jobs)
    feed = app.get(FEED)
    if feed is not None:  # every state and progress change goes out on the feed's `tasks` channel
        engine.listeners.append(partial(_to_feed, feed))
    app[JOBS] = engine
    app_metrics = app.get(metrics.METRICS)
    if app_metrics is not None:
        app_metrics.global_sources.append(partial(_job_families, app))
    runner = Runner(engine, KINDS, config, config.database.url) if config.jobs.concurrency > 0 else None
    app[JOB_RUNNER] = runner
    if runner is not None:
        await runner.start()
    yield
    if runner is not None:
        await runner.close()


async def _to_feed(feed: Feed, job: Job) -> None:
    """A job listener: the task's snapshot to the feed, for its owner."""
    await publish_task(feed, job.snapshot(), job.owner)


async def _job_families(app: web.Application) -> list[metrics.Family]:
    """Jobs by state, from PostgreSQL: one deployment-wide count, read by the answering worker."""
    if app.get(JOBS) is None:
        return []
    try:
        rows = await app[DB].fetch("SELECT state, count(*) AS n FROM jobs GROUP BY state")
    except Exception as exc:  # a scrape while the database is away still shows everything else
        log.warning("metrics: job counts unavailable: %s", exc)
        return []
    counts: dict[tuple[str, ...], float] = {
        ("queued",): 0.0,
        ("processing",): 0.0,
        ("completed",): 0.0,
        ("failed",): 0.0,
        ("cancelled",): 0.0,
    }
    counts.update({(r["state"],): float(r["n"]) for r in rows})
    return [
        metrics.Family(
            "hotpath_jobs", "gauge", "Background jobs by state (whole deployment)", ("state",), counts
        )
    ]
