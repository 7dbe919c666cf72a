"""Background jobs: no-op throughput of one worker process, and enqueue latency through POST.

    DATABASE_URL=... REDIS_URL=... python -m bench.jobs [--jobs 20000] [--concurrency 16] [--batch 16]

1. `python run.py worker` (one process, pinned to CPU 0) runs no-op jobs; the bench inserts
   them in batches of 1,000 (one statement, one NOTIFY each) and times the first insert to
   the last completion, polling the count. Target >= 2,000 jobs/s.
2. `python run.py` (pinned to CPU 0) answers POST /send-notification from 16 concurrent
   clients on CPU 1: p50/p99 of the 202 answers, once web only (jobs.concurrency = 0), once
   with the worker in the same process delivering into the Maildir outbox meanwhile.
Needs DATABASE_URL and REDIS_URL (a database `hotpath_bench_jobs` is recreated there).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import asyncpg

from bench.run import (
    LOAD_CPU,
    OPEN_ROUTES,
    ROOT,
    SERVER_CPU,
    _recreate_database,
    bench_config,
    free_port,
    server,
    taskset,
)
from server.urls import with_database

# A database of this bench's own: bench.run's `hotpath_bench` may be recreated by a parallel run.
BENCH_DB = "hotpath_bench_jobs"

SQL_WORKERS = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'"
)
SQL_INSERT = (
    "INSERT INTO jobs (kind, payload, max_attempts) SELECT 'noop', '{}', 1 FROM generate_series(1, $1)"
)


async def _wait_listening(dsn: str, count: int, timeout: float = 60.0) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout
        while await conn.fetchval(SQL_WORKERS) < count:
            if time.monotonic() > deadline:
                raise RuntimeError("the worker did not start listening")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def throughput(dsn: str, jobs: int) -> float:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("TRUNCATE jobs RESTART IDENTITY")
        start = time.perf_counter()
        left = jobs
        while left > 0:
            n = min(1000, left)
            await conn.execute(SQL_INSERT, n)
            left -= n
        while True:
            done = await conn.fetchval("SELECT count(*) FROM jobs WHERE state = 'completed'")
            if done >= jobs:
                break
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - start
        not_done = await conn.fetchval("SELECT count(*) FROM jobs WHERE state <> 'completed'")
        assert not_done == 0, not_done
        return jobs / elapsed
    finally:
        await conn.close()


async def enqueue_latency(base: str, requests: int, clients: int) -> list[float]:
    latencies: list[float] = []
    async with aiohttp.ClientSession() as session:
        counter = iter(range(requests))

        async def client() -> None:
            for i in counter:
                body = {"recipient": f"bench{i}@example.com", "subject": "bench", "content": "x"}
                t0 = time.perf_counter()
                async with session.post(f"{base}/send-notification", json=body) as resp:
                    await resp.read()
                    if resp.status != 202:
                        raise RuntimeError(f"POST /send-notification answered {resp.status}")
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(client() for _ in range(clients)))
    return latencies


@contextmanager
def worker_process(cmd: list[str], env: dict[str, str], dsn: str) -> Iterator[None]:
    """`run.py worker` pinned to the server CPU; ready once its LISTEN connection is up."""
    proc = subprocess.Popen([*taskset(SERVER_CPU), *cmd], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    try:
        asyncio.run(_wait_listening(dsn, 1))
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.jobs")
    parser.add_argument("--jobs", type=int, default=20000, help="no-op jobs for the throughput run")
    parser.add_argument("--concurrency", type=int, default=16, help="jobs.concurrency of the worker")
    parser.add_argument("--batch", type=int, default=16, help="jobs.batch_size of the worker")
    parser.add_argument("--requests", type=int, default=3000, help="POSTs for the latency run")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients for the latency run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hotpath-bench-jobs-") as tmp:
        env = dict(os.environ)
        if not (env.get("DATABASE_URL") and env.get("REDIS_URL")):
            print("bench.jobs needs DATABASE_URL and REDIS_URL", file=sys.stderr)
            return 2
        asyncio.run(_recreate_database(env["DATABASE_URL"], BENCH_DB))
        dsn = env["DATABASE_URL"] = with_database(env["DATABASE_URL"], BENCH_DB)
        config = Path(tmp) / "config.toml"
        config.write_text(bench_config(Path(tmp)))
        env.update(OPEN_ROUTES)
        env["HOTPATH_JOBS_CONCURRENCY"] = str(args.concurrency)
        env["HOTPATH_JOBS_BATCH_SIZE"] = str(args.batch)
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {int(LOAD_CPU)})  # the bench's own side stays off the server's CPU
        worker = [sys.executable, "run.py", "worker", "--config", str(config)]
        with worker_process(worker, env, dsn):
            rates = [asyncio.run(throughput(dsn, args.jobs)) for _ in range(3)]
        print(
            f"no-op jobs, one worker process (concurrency {args.concurrency}, batch {args.batch}), "
            f"{args.jobs} jobs x 3: "
            + ", ".join(f"{r:,.0f}" for r in rates)
            + f" jobs/s; median {statistics.median(rates):,.0f} jobs/s (target >= 2,000)"
        )
        for label, jobs_concurrency in (("web only, no worker", "0"), ("web + worker in one process", "16")):
            port = free_port()
            env_web = {**env, "HOTPATH_JOBS_CONCURRENCY": jobs_concurrency, "HOTPATH_JOBS_BATCH_SIZE": "16"}
            cmd = [sys.executable, "run.py", "--config", str(config), "--port", str(port)]
            base = f"http://127.0.0.1:{port}"
            with server(cmd, f"{base}/ready", env_web):
                asyncio.run(enqueue_latency(base, 200, args.clients))  # warm-up
                started = time.perf_counter()
                lat = sorted(asyncio.run(enqueue_latency(base, args.requests, args.clients)))
                rate = len(lat) / (time.perf_counter() - started)
            p50 = lat[len(lat) // 2] * 1000
            p99 = lat[int(len(lat) * 0.99)] * 1000
            print(
                f"POST /send-notification ({label}, {args.clients} clients, {args.requests} requests): "
                f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {lat[-1] * 1000:.2f} ms, {rate:,.0f} req/s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
