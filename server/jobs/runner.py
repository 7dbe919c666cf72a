"""Durable background jobs in PostgreSQL: enqueue, claim with SKIP LOCKED, leases, retries, cancellation.

Why our own module and not pgqueuer (measured here, see the commit): pgqueuer keeps no
progress and no results, its log table grows by three rows a job and is never pruned, and a
job whose worker was SIGKILLed is not counted as an attempt, so a job that kills its worker
every time loops forever. The queue itself is one `UPDATE ... WHERE id = ANY(ARRAY(SELECT ...
FOR UPDATE SKIP LOCKED LIMIT n)) RETURNING` with a lease column, which measured 3,350 jobs/s
at batches of 10 and 16,000 at 100 on this machine, against 2,200 and 5,500 for pgqueuer.

The rules that make it safe:
- `attempts` is incremented when a job is claimed, so a crash counts as an attempt. With the
  worker id it is the fencing token: a worker writes progress or an outcome only while the
  row still carries the attempt and worker of its claim. A worker that lost its lease
  (stalled, then retaken elsewhere) or handed the job back can no longer overwrite the state
  of a newer attempt.
- A claim holds the job for `lease` seconds; a heartbeat renews the lease of every running
  job. Expired leases are reaped by any worker: back to queued, or failed when the attempts
  are used up, or cancelled when cancellation was asked for.
- Delivery is at least once: every job kind is written to be idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from server.config import Config, JobsConfig
from server.errors import Conflict, NotFound, ValidationFailed
from server.storage.db import Database
from server.storage.listen import listen_forever

log = logging.getLogger("hotpath.jobs")

CHANNEL = "hotpath_jobs"
STATES = ("queued", "processing", "completed", "failed", "cancelled")
FINAL = frozenset({"completed", "failed", "cancelled"})
_REAP_BATCH = 100
_CLEANUP_BATCH = 5000

_COLS = (
    "id, kind, payload, state, idempotency_key, attempts, max_attempts, run_after, lease_until, worker,"
    " cancel_requested, progress_done, progress_total, progress_message, result, error,"
    " created_at, updated_at, started_at, finished_at"
)
_JCOLS = ", ".join(f"j.{c.strip()}" for c in _COLS.split(","))

SQL_INSERT = f"""
INSERT INTO jobs (kind, payload, idempotency_key, max_attempts) VALUES ($1, $2::jsonb, $3, $4)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING {_COLS}
"""
SQL_INSERT_MANY = """
INSERT INTO jobs (kind, payload, max_attempts)
SELECT $1, p::jsonb, $3 FROM unnest($2::text[]) AS p
"""
SQL_BY_KEY = f"SELECT {_COLS} FROM jobs WHERE idempotency_key = $1"
SQL_GET = f"SELECT {_COLS} FROM jobs WHERE id = $1"
SQL_PAGE = f"SELECT {_COLS} FROM jobs WHERE id > $1 ORDER BY id LIMIT $2"
SQL_PAGE_STATE = f"SELECT {_COLS} FROM jobs WHERE state = $3 AND id > $1 ORDER BY id LIMIT $2"
# ARRAY(...) rather than IN (...): the locking subquery must run exactly once.
SQL_CLAIM = f"""
UPDATE jobs SET state = 'processing', attempts = attempts + 1, worker = $2,
       lease_until = now() + make_interval(secs => $3),
       started_at = COALESCE(started_at, now()), updated_at = now()
 WHERE id = ANY(ARRAY(
       SELECT id FROM jobs WHERE state = 'queued' AND run_after <= now()
        ORDER BY run_after, id LIMIT $1 FOR UPDATE SKIP LOCKED))
RETURNING {_COLS}
"""
# Seconds until the next queued job is due, by the database's clock (no skew with ours).
SQL_NEXT_DUE = "SELECT extract(epoch FROM min(run_after) - now())::float8 FROM jobs WHERE state = 'queued'"
SQL_REAP = f"""
UPDATE jobs SET
       state = CASE WHEN cancel_requested THEN 'cancelled'
                    WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END,
       error = CASE WHEN cancel_requested THEN error
                    ELSE 'worker ' || COALESCE(worker, '?') || ' stopped during attempt ' || attempts
                         || ' (lease expired)' END,
       finished_at = CASE WHEN cancel_requested OR attempts >= max_attempts THEN now() END,
       run_after = now(), lease_until = NULL, worker = NULL, updated_at = now()
 WHERE id = ANY(ARRAY(
       SELECT id FROM jobs WHERE state = 'processing' AND lease_until < now()
        ORDER BY lease_until LIMIT {_REAP_BATCH} FOR UPDATE SKIP LOCKED))
RETURNING {_COLS}
"""
SQL_COMPLETE = f"""
UPDATE jobs j SET state = 'completed', result = v.result::jsonb, error = NULL, lease_until = NULL,
       finished_at = now(), updated_at = now()
  FROM unnest($1::bigint[], $2::int[], $3::text[]) AS v(id, attempt, result)
 WHERE j.id = v.id AND j.attempts = v.attempt AND j.state = 'processing' AND j.worker = $4
RETURNING {_JCOLS}
"""
SQL_FAIL = f"""
UPDATE jobs SET state = CASE WHEN $3 AND attempts < max_attempts THEN 'queued' ELSE 'failed' END,
       run_after = now() + make_interval(secs => $4), error = $5,
       finished_at = CASE WHEN $3 AND attempts < max_attempts THEN NULL ELSE now() END,
       lease_until = NULL, worker = NULL, updated_at = now()
 WHERE id = $1 AND attempts = $2 AND state = 'processing' AND worker = $6
RETURNING {_COLS}
"""
SQL_CANCELLED = f"""
UPDATE jobs SET state = 'cancelled', lease_until = NULL, finished_at = now(), updated_at = now()
 WHERE id = $1 AND attempts = $2 AND state = 'processing' AND worker = $3
RETURNING {_COLS}
"""
SQL_PROGRESS = f"""
UPDATE jobs SET progress_done = $3, progress_total = $4, progress_message = $5, updated_at = now(),
       lease_until = now() + make_interval(secs => $6)
 WHERE id = $1 AND attempts = $2 AND state = 'processing' AND worker = $7
RETURNING {_COLS}
"""
SQL_HEARTBEAT = """
UPDATE jobs j SET lease_until = now() + make_interval(secs => $3)
  FROM unnest($1::bigint[], $2::int[]) AS v(id, attempt)
 WHERE j.id = v.id AND j.attempts = v.attempt AND j.state = 'processing' AND j.worker = $4
RETURNING j.id, j.cancel_requested
"""
# Handing back is not the job's fault: the attempt it was charged at claim is returned.
SQL_HAND_BACK = f"""
UPDATE jobs j SET state = CASE WHEN j.cancel_requested THEN 'cancelled' ELSE 'queued' END,
       attempts = GREATEST(j.attempts - 1, 0), lease_until = NULL, worker = NULL, run_after = now(),
       finished_at = CASE WHEN j.cancel_requested THEN now() END, updated_at = now()
  FROM unnest($1::bigint[], $2::int[]) AS v(id, attempt)
 WHERE j.id = v.id AND j.attempts = v.attempt AND j.state = 'processing' AND j.worker = $3
RETURNING {_JCOLS}
"""
SQL_CANCEL = f"""
UPDATE jobs SET cancel_requested = true,
       state = CASE WHEN state = 'queued' THEN 'cancelled' ELSE state END,
       finished_at = CASE WHEN state = 'queued' THEN now() ELSE finished_at END, updated_at = now()
 WHERE id = $1 AND state IN ('queued', 'processing')
RETURNING {_COLS}
"""
SQL_CLEANUP = f"""
DELETE FROM jobs WHERE id = ANY(ARRAY(
       SELECT id FROM jobs WHERE state IN ('completed', 'failed', 'cancelled')
          AND finished_at < now() - make_interval(secs => $1) LIMIT {_CLEANUP_BATCH}))
"""
SQL_WAKE = "SELECT pg_notify('hotpath_jobs', '')"

Listener = Callable[[dict[str, Any]], Awaitable[None]]


class JobCancelled(Exception):
    """Raised at a progress point of a job whose cancellation was requested."""


class JobLost(Exception):
    """The job is no longer ours (lease expired and retaken, or finished elsewhere)."""


class PermanentError(Exception):
    """A failure that retrying cannot fix (bad input, a 5xx from the mail relay): fail at once."""


@dataclass(slots=True)
class Job:
    """One row of `jobs`, decoded."""

    id: int
    kind: str
    payload: dict[str, Any]
    state: str
    idempotency_key: str | None
    attempts: int
    max_attempts: int
    run_after: dt.datetime
    lease_until: dt.datetime | None
    worker: str | None
    cancel_requested: bool
    progress_done: int
    progress_total: int | None
    progress_message: str | None
    result: Any
    error: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Job:
        values = dict(row.items())
        values["payload"] = orjson.loads(values["payload"])
        if values["result"] is not None:
            values["result"] = orjson.loads(values["result"])
        return cls(**values)

    def snapshot(self) -> dict[str, Any]:
        """The public view (GET /task-status, listeners): no payload, no worker internals."""
        out: dict[str, Any] = {
            "task_id": self.id,
            "kind": self.kind,
            "status": self.state,
            "progress": {
                "done": self.progress_done,
                "total": self.progress_total,
                "message": self.progress_message,
            },
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "cancel_requested": self.cancel_requested,
            "error": self.error,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "run_after": self.run_after,
        }
        if self.state == "completed":
            out["result"] = self.result
        return out


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def backoff_delay(cfg: JobsConfig, kind: str, attempt: int) -> float:
    """Seconds before the next try after failed attempt `attempt` (1-based): exponential, +-25 %."""
    base = cfg.backoff_for(kind) * 2 ** max(0, attempt - 1)
    return float(min(cfg.backoff_max, base * random.uniform(0.75, 1.25)))


class Engine:
    """Enqueue, read, list and cancel jobs; used by web processes and workers alike.

    `listeners` are awaited with the job's snapshot on every state or progress change made
    by this process (the SSE feed publishes them); a failing listener is logged, not raised.
    They run inline on the job's path, so each should only hand the snapshot on (a queue, a
    pub/sub publish), not do slow work.
    """

    def __init__(self, db: Database, config: JobsConfig) -> None:
        self.db = db
        self.config = config
        self.listeners: list[Listener] = []

    async def publish(self, job: Job) -> None:
        if not self.listeners:
            return
        snap = job.snapshot()
        for listener in list(self.listeners):
            try:
                await listener(snap)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job listener failed for job %d", job.id)

    async def enqueue(
        self, kind: str, payload: Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> tuple[Job, bool]:
        """Insert a job; returns (job, created). With a key already used, the existing job and
        False; Conflict when that key was used for a different kind or payload."""
        body = _dumps(payload)
        try:
            row = await self.db.fetchrow(
                SQL_INSERT, kind, body, idempotency_key, self.config.attempts_for(kind)
            )
        except asyncpg.UntranslatableCharacterError:  # jsonb cannot hold \u0000
            raise ValidationFailed(
                [{"field": "", "message": "text must not contain NUL (\\u0000) characters"}],
                "the request holds text PostgreSQL cannot store",
            ) from None
        if row is not None:
            job = Job.from_row(row)
            await self.publish(job)
            return job, True
        assert idempotency_key is not None  # without a key there is nothing to conflict on
        existing = await self.db.fetchrow(SQL_BY_KEY, idempotency_key)
        if existing is None:  # deleted by cleanup between the two statements: try once more
            return await self.enqueue(kind, payload, idempotency_key=idempotency_key)
        job = Job.from_row(existing)
        if job.kind != kind or job.payload != orjson.loads(body):
            raise Conflict("this Idempotency-Key was already used for a different request")
        return job, False

    async def enqueue_many(self, kind: str, payloads: list[Mapping[str, Any]]) -> None:
        """Insert many jobs of one kind in one statement (one NOTIFY)."""
        await self.db.execute(
            SQL_INSERT_MANY, kind, [_dumps(p) for p in payloads], self.config.attempts_for(kind)
        )

    async def get(self, job_id: int) -> Job:
        row = await self.db.fetchrow(SQL_GET, job_id)
        if row is None:
            raise NotFound(f"task {job_id} does not exist")
        return Job.from_row(row)

    async def page(self, state: str | None, after: int, limit: int) -> list[Job]:
        """Up to `limit` jobs with id > `after` (optionally in one state), in id order."""
        if state is None:
            rows = await self.db.fetch(SQL_PAGE, after, limit)
        else:
            rows = await self.db.fetch(SQL_PAGE_STATE, after, limit, state)
        return [Job.from_row(r) for r in rows]

    async def cancel(self, job_id: int) -> Job:
        """Queued: cancelled at once. Processing: flagged; the job stops at its next progress
        point. Final already: Conflict. Unknown: NotFound."""
        row = await self.db.fetchrow(SQL_CANCEL, job_id)
        if row is None:
            job = await self.get(job_id)
            raise Conflict(f"task {job_id} is already {job.state}")
        job = Job.from_row(row)
        await self.publish(job)
        return job

    async def cleanup(self, retention: float) -> int:
        """Delete finished jobs older than `retention` seconds; returns how many."""
        total = 0
        while True:
            status = await self.db.execute(SQL_CLEANUP, retention)
            n = int(status.rsplit(" ", 1)[1])
            total += n
            if n < _CLEANUP_BATCH:
                return total


@dataclass(slots=True)
class JobContext:
    """What a job handler gets besides its payload: identity, resources, progress and cancellation."""

    job: Job
    engine: Engine
    runner: Runner
    config: Config
    cancel_requested: bool = False
    lost: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def db(self) -> Database:
        return self.engine.db

    def check(self) -> None:
        """Raise JobCancelled / JobLost if the heartbeat has seen either (no round trip)."""
        if self.lost:
            raise JobLost()
        if self.cancel_requested:
            raise JobCancelled()

    async def progress(self, done: int, total: int | None = None, message: str | None = None) -> None:
        """Record progress (also renews the lease); raises JobCancelled when cancellation was asked."""
        self.check()
        job = self.job
        row = await self.db.fetchrow(
            SQL_PROGRESS,
            job.id,
            job.attempts,
            done,
            total,
            message,
            self.engine.config.lease,
            self.runner.worker_id,
        )
        if row is None:
            self.lost = True
            raise JobLost()
        self.job = Job.from_row(row)
        await self.engine.publish(self.job)
        if self.job.cancel_requested:
            self.cancel_requested = True
            raise JobCancelled()


Handler = Callable[[JobContext, dict[str, Any]], Awaitable[Any]]


class Runner:
    """Runs jobs in this process: claims, heartbeats, reaping, cleanup and graceful shutdown.

    Owns its tasks: the dispatcher, the heartbeat, the cleanup loop, the LISTEN connection,
    and one task per running job; close() ends them all.
    """

    def __init__(
        self, engine: Engine, kinds: Mapping[str, Handler], config: Config, dsn: str, *, name: str = ""
    ) -> None:
        self.engine = engine
        self.kinds = dict(kinds)
        self.config = config
        self.cfg = config.jobs
        self.dsn = dsn
        self.worker_id = name or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self.running: dict[int, tuple[asyncio.Task[None], JobContext]] = {}
        # Slots in use: a job gives its slot back when its handler returns, before its
        # completion is written, so the next claim overlaps that write.
        self._busy = 0
        self.listening = asyncio.Event()
        self._wake = asyncio.Event()
        self._slot = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._dispatcher: asyncio.Task[None] | None = None
        self._completions: list[tuple[int, int, str, asyncio.Future[Job | None]]] = []
        self._flush_handle: asyncio.Handle | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._dispatcher = loop.create_task(self._dispatch(), name="jobs-dispatch")
        self._tasks = [
            loop.create_task(self._heartbeat(), name="jobs-heartbeat"),
            loop.create_task(self._cleanup_loop(), name="jobs-cleanup"),
            loop.create_task(
                # One LISTEN connection per process; after each (re)connect, claim again: jobs
                # may have arrived while nobody listened.
                listen_forever(
                    self.dsn,
                    CHANNEL,
                    self._wake.set,
                    on_listen=self._wake.set,
                    listening=self.listening,
                    what="jobs",
                    log=log,
                ),
                name="jobs-listen",
            ),
        ]

    # ------------------------------------------------------------------ claiming

    async def _dispatch(self) -> None:
        cfg = self.cfg
        while not self._stopping:
            free = cfg.concurrency - self._busy
            if free <= 0:
                self._slot.clear()
                await self._slot.wait()
                continue
            want = min(free, cfg.batch_size)
            self._wake.clear()  # before the claim: a NOTIFY during it is not lost
            try:
                rows = await self.engine.db.fetch(SQL_CLAIM, want, self.worker_id, cfg.lease)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("claiming jobs failed (%s: %s); retrying in 1 s", type(exc).__name__, exc)
                await self._sleep_unless_stopping(1.0)
                continue
            for row in rows:
                self._start_job(Job.from_row(row))
            if len(rows) == want or self._stopping:
                continue
            timeout = cfg.poll_interval
            try:
                due = await self.engine.db.fetchval(SQL_NEXT_DUE)
            except asyncio.CancelledError:
                raise
            except Exception:
                due = None
            if due is not None:
                # Due already but not claimed: another worker holds it. Do not spin on it.
                timeout = max(0.05, min(timeout, due + 0.005))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _sleep_unless_stopping(self, delay: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)

    async def _reap(self) -> None:
        rows = await self.engine.db.fetch(SQL_REAP)
        if not rows:
            return
        for row in rows:
            job = Job.from_row(row)
            log.warning("job %d (%s): %s; now %s", job.id, job.kind, job.error, job.state)
            await self.engine.publish(job)
        await self.engine.db.execute(SQL_WAKE)

    def _start_job(self, job: Job) -> None:
        ctx = JobContext(job=job, engine=self.engine, runner=self, config=self.config)
        task = asyncio.get_running_loop().create_task(self._execute(ctx), name=f"job-{job.id}")
        self.running[job.id] = (task, ctx)
        self._busy += 1

    # ------------------------------------------------------------------ running one job

    async def _execute(self, ctx: JobContext) -> None:
        job = ctx.job
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._busy -= 1
                self._slot.set()

        try:
            await self.engine.publish(job)
            handler = self.kinds.get(job.kind)
            if handler is None:
                raise PermanentError(f"unknown job kind {job.kind!r}")
            result = await handler(ctx, job.payload)
        except JobCancelled:
            await self._write(SQL_CANCELLED, job.id, ctx.job.attempts, self.worker_id)
        except JobLost:
            log.warning("job %d: lease lost to another worker; dropping attempt %d", job.id, job.attempts)
        except asyncio.CancelledError:
            raise  # shutdown: close() hands the job back
        except Exception as exc:
            retry = not isinstance(exc, PermanentError)
            delay = backoff_delay(self.cfg, job.kind, job.attempts) if retry else 0.0
            message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, PermanentError) else str(exc)
            if retry:
                log.warning("job %d (%s) attempt %d failed: %s", job.id, job.kind, job.attempts, message)
            await self._write(SQL_FAIL, job.id, job.attempts, retry, delay, message[:2000], self.worker_id)
        else:
            release()
            try:
                done = await self._complete(job.id, job.attempts, _dumps(result))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the lease runs out and the job runs again: at least once
                log.warning("job %d: recording completion failed (%s)", job.id, exc)
            else:
                if done is not None:
                    await self.engine.publish(done)
        finally:
            self.running.pop(job.id, None)
            release()

    async def _write(self, sql: str, *args: Any) -> None:
        try:
            row = await self.engine.db.fetchrow(sql, *args)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("job %s: recording its outcome failed (%s)", args[0], exc)
            return
        if row is not None:
            await self.engine.publish(Job.from_row(row))

    async def _complete(self, job_id: int, attempt: int, result: str) -> Job | None:
        """Completions made in one loop pass go to PostgreSQL as one UPDATE."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Job | None] = loop.create_future()
        self._completions.append((job_id, attempt, result, fut))
        if self._flush_handle is None:
            self._flush_handle = loop.call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        self._flush_handle = None
        batch, self._completions = self._completions, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._flush_batch(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _flush_batch(self, batch: list[tuple[int, int, str, asyncio.Future[Job | None]]]) -> None:
        try:
            rows = await self.engine.db.fetch(
                SQL_COMPLETE,
                [b[0] for b in batch],
                [b[1] for b in batch],
                [b[2] for b in batch],
                self.worker_id,
            )
        except BaseException as exc:
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
            if not isinstance(exc, Exception):
                raise
            return
        by_id = {r["id"]: r for r in rows}
        for job_id, _attempt, _result, fut in batch:
            row = by_id.get(job_id)
            if not fut.done():
                fut.set_result(None if row is None else Job.from_row(row))

    # ------------------------------------------------------------------ leases, cleanup, wake-ups

    async def _heartbeat(self) -> None:
        """Every heartbeat_interval: reap expired leases (any worker's: a busy worker reaps too,
        so a dead worker's job never waits for an idle one), then renew our own leases."""
        while True:
            try:
                await self._reap()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reaping expired leases failed (%s: %s)", type(exc).__name__, exc)
            await asyncio.sleep(self.cfg.heartbeat_interval)
            if not self.running:
                continue
            held = {job_id: ctx for job_id, (_task, ctx) in self.running.items()}
            try:
                rows = await self.engine.db.fetch(
                    SQL_HEARTBEAT,
                    list(held),
                    [c.job.attempts for c in held.values()],
                    self.cfg.lease,
                    self.worker_id,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("renewing job leases failed (%s: %s)", type(exc).__name__, exc)
                continue
            kept = {r["id"]: r["cancel_requested"] for r in rows}
            for job_id, ctx in held.items():
                if job_id not in kept:
                    ctx.lost = job_id in self.running  # finished meanwhile is not lost
                elif kept[job_id]:
                    ctx.cancel_requested = True

    async def _cleanup_loop(self) -> None:
        interval = min(300.0, max(0.5, self.cfg.retention / 4))
        while True:
            try:
                n = await self.engine.cleanup(self.cfg.retention)
                if n:
                    log.info("removed %d finished jobs older than %g s", n, self.cfg.retention)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("job cleanup failed (%s: %s)", type(exc).__name__, exc)
            await asyncio.sleep(interval)

    # ------------------------------------------------------------------ shutdown

    async def _stop_jobs(self) -> None:
        """Cancel what still runs; cancel again while a task's own clean-up (a `finally` that
        awaits) holds it, for up to 5 s."""
        for _ in range(50):
            tasks = [task for task, _ctx in self.running.values()]
            if not tasks:
                return
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=0.1)
        log.warning("%d jobs did not stop when cancelled", len(self.running))

    async def close(self) -> None:
        """Stop claiming, let running jobs finish for jobs.shutdown_timeout, hand the rest back."""
        self._stopping = True
        self._wake.set()
        self._slot.set()
        if self._dispatcher is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        pending = [task for task, _ctx in self.running.values()]
        if pending:
            log.info("waiting up to %g s for %d running jobs", self.cfg.shutdown_timeout, len(pending))
            await asyncio.wait(pending, timeout=self.cfg.shutdown_timeout)
        left = {job_id: ctx.job.attempts for job_id, (_task, ctx) in self.running.items()}
        if left:
            # Handed back before the tasks are stopped: the attempt fence keeps a task that
            # still finishes from overwriting the queued state, and a job stuck in a cleanup
            # of its own (an SMTP QUIT to a dead relay) cannot delay the hand-back.
            try:
                rows = await self.engine.db.fetch(
                    SQL_HAND_BACK, list(left), list(left.values()), self.worker_id
                )
                await self.engine.db.execute(SQL_WAKE)
            except Exception as exc:
                log.warning("handing back %d jobs failed (%s); their leases will expire", len(left), exc)
            else:
                log.info("handed back %d unfinished jobs", len(rows))
                for row in rows:
                    await self.engine.publish(Job.from_row(row))
        await self._stop_jobs()
        if self._flushes:
            await asyncio.wait(list(self._flushes))
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
