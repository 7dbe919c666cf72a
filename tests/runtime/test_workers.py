"""`run.py --workers N`: one socket, N processes, crash restarts, rolling restarts without failures."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.config import Config
from server.urls import with_database
from tests.helpers import PYTHON, ROOT, free_port, until


def children(pid: int) -> set[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return set()
    return {int(x) for x in text.split()}


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


class Cluster:
    def __init__(self, proc: asyncio.subprocess.Process, base: str, log: Path) -> None:
        self.proc, self.base, self.log = proc, base, log

    @property
    def workers(self) -> set[int]:
        return children(self.proc.pid)

    async def ready_pid(self, session: aiohttp.ClientSession) -> int | None:
        try:
            async with session.get(self.base + "/ready") as resp:
                return int((await resp.json())["pid"]) if resp.status == 200 else None
        except aiohttp.ClientError:
            return None


@pytest.fixture
async def cluster(base_config: Config, tmp_path: Path) -> AsyncIterator[Cluster]:
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": base_config.database.url,
        "REDIS_URL": base_config.redis.url,
        "HOTPATH_SERVER_SHUTDOWN_TIMEOUT": "10",
    }
    log = tmp_path / "cluster.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "run.py", "--port", str(port), "--workers", "2", cwd=ROOT, env=env, stderr=out
        )
    cl = Cluster(proc, f"http://127.0.0.1:{port}", log)
    try:
        await until(
            lambda: b"2 workers listening" in log.read_bytes() or proc.returncode is not None, "workers"
        )
        assert proc.returncode is None, log.read_text()
        yield cl
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30)


async def distinct_pids(cl: Cluster, want: set[int] | None = None) -> set[int]:
    """Pids answering /ready, over many parallel fresh connections, until all of `want` answered."""
    seen: set[int] = set()
    target = want if want is not None else cl.workers

    async def round_() -> bool:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            pids = await asyncio.gather(*(cl.ready_pid(s) for _ in range(40)))
        seen.update(p for p in pids if p is not None)
        return target <= seen

    await until(round_, f"requests answered by every worker {target}")
    return seen


async def test_workers_share_the_socket_and_a_killed_worker_is_replaced(cluster: Cluster) -> None:
    first = cluster.workers
    assert len(first) == 2
    assert await distinct_pids(cluster) == first  # both take requests on the one port

    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    replaced = await until(lambda: len(w := cluster.workers) == 2 and victim not in w and w, "a replacement")
    await distinct_pids(cluster, replaced)
    assert b"died with -9; restarting" in cluster.log.read_bytes()


async def test_rolling_restart_under_load_fails_no_request(cluster: Cluster) -> None:
    before = cluster.workers
    stats = {"ok": 0, "failed": 0}
    stop = asyncio.Event()

    async def load(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            try:
                async with session.get(cluster.base + "/health") as resp:
                    await resp.read()
                    stats["ok" if resp.status == 200 else "failed"] += 1
            except aiohttp.ClientError:
                stats["failed"] += 1

    async def long_download(session: aiohttp.ClientSession) -> int:
        # A response still streaming when its worker is told to stop must finish intact.
        async with session.get(cluster.base + "/stream-json/300000") as resp:
            assert resp.status == 200
            return len(orjson.loads(await resp.read()))

    async with aiohttp.ClientSession() as session:
        loaders = [asyncio.create_task(load(session)) for _ in range(16)]
        await until(lambda: stats["ok"] > 200, "load to start")
        download = asyncio.create_task(long_download(session))
        cluster.proc.send_signal(signal.SIGHUP)
        await until(lambda: len(w := cluster.workers) == 2 and not (w & before), "both workers replaced")
        await until(lambda: b"rolling restart done" in cluster.log.read_bytes(), "the roll to finish")
        settled = stats["ok"]
        await until(lambda: stats["ok"] > settled + 200, "load on the new workers")
        stop.set()
        await asyncio.gather(*loaders)
        assert await download == 300000
    assert stats["failed"] == 0, stats
    assert b"Traceback" not in cluster.log.read_bytes()


async def test_sigterm_stops_every_worker_and_exits_0(cluster: Cluster) -> None:
    workers = cluster.workers
    cluster.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(cluster.proc.wait(), 30) == 0
    assert not any(running(pid) for pid in workers)


async def test_workers_that_keep_crashing_stop_the_supervisor(cluster: Cluster) -> None:
    killed: set[int] = set()
    deadline = time.monotonic() + 60
    while cluster.proc.returncode is None:
        assert time.monotonic() < deadline, "the supervisor neither gave up nor restarted workers"
        fresh = cluster.workers - killed
        if fresh:
            pid = min(fresh)
            killed.add(pid)
            os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.05)
        assert len(killed) <= 10, "the supervisor kept restarting"
    assert cluster.proc.returncode == 1
    assert b"giving up" in cluster.log.read_bytes()


def test_worker_that_cannot_start_stops_the_supervisor(base_config: Config) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": with_database(base_config.database.url, "no_such_database_here"),
        "REDIS_URL": base_config.redis.url,
    }
    proc = subprocess.run(
        [PYTHON, "run.py", "--port", str(free_port()), "--workers", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert b"before it listened" in proc.stderr


async def test_metrics_add_up_every_workers_requests(cluster: Cluster) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for _ in range(10):
            await asyncio.gather(*(session.get(cluster.base + "/health") for _ in range(20)))
        await distinct_pids(cluster)  # both workers have answered something

        async def health_total() -> float:
            async with session.get(cluster.base + "/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
            for family in text_string_to_metric_families(text):
                if family.name == "hotpath_http_requests":
                    return sum(
                        s.value
                        for s in family.samples
                        if s.name.endswith("_total") and s.labels["route"] == "health"
                    )
            return 0.0

        # Each worker's own totals reach the others within metrics.flush_interval.
        await until(lambda: _equals(health_total(), 200), "200 /health requests counted over both workers")


async def _equals(value: Any, want: float) -> bool:
    return bool(await value == want)
