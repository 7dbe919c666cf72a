"""Runs jobs in this process: claims, leases and heartbeats, retries with backoff, LISTEN wake-ups,
concurrency, and graceful shutdown; JobContext is what a job handler gets.

The queue itself (its SQL, the Job row, Engine) is server/jobs/queue.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from server.config import Config, JobsConfig
from server.jobs.queue import (
    CHANNEL,
    SQL_CANCELLED,
    SQL_CLAIM,
    SQL_COMPLETE,
    SQL_FAIL,
    SQL_HAND_BACK,
    SQL_HEARTBEAT,
    SQL_NEXT_DUE,
    SQL_PROGRESS,
    SQL_REAP,
    SQL_WAKE,
    Engine,
    Job,
)
from server.storage.db import Database
from server.storage.listen import listen_forever

log = logging.getLogger("hotpath.jobs")


class JobCancelled(Exception):
    """Raised at a progress point of a job whose cancellation was requested."""


class JobLost(Exception):
    """The job is no longer ours (lease expired and retaken, or finished elsewhere)."""


class PermanentError(Exception):
    """A failure that retrying cannot fix (bad input, a 5xx from the mail relay): fail at once."""


def backoff_delay(cfg: JobsConfig, kind: str, attempt: int) -> float:
    """Seconds before the next try after failed attempt `attempt` (1-based): exponential, +-25 %."""
    base = cfg.backoff_for(kind) * 2 ** max(0, attempt - 1)
    return float(min(cfg.backoff_max, base * random.uniform(0.75, 1.25)))


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
                done = await self._complete(job.id, job.attempts, orjson.dumps(result).decode())
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
