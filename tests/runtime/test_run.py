"""run.py as a user runs it: embedded mode end to end, and start-up failures that name the target."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import run
from tests.helpers import PYTHON, ROOT, free_port, until, wait_ready
from tests.runtime.test_workers import children, running


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention `text` (a data dir, a socket path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next(
                (line for line in (entry / "status").read_text().splitlines() if line.startswith("State:")),
                "",
            )
        except OSError:
            continue
        if text in cmdline and "zombie" not in state:
            found.append(f"{entry.name}: {cmdline}")
    return found


def embedded_env() -> dict[str, str]:
    # no DATABASE_URL / REDIS_URL: embedded servers must start
    return {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}


async def start_run_py(config: Path, stderr_path: Path) -> Any:
    with stderr_path.open("ab") as stderr:  # the child keeps its own copy of the descriptor
        return await asyncio.create_subprocess_exec(
            PYTHON, "run.py", "--config", str(config), cwd=ROOT, env=embedded_env(),
            stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip


def embedded_setup(tmp_path: Path) -> tuple[Path, Path, int, str]:
    """(data dir, config file, port, base URL) for a run.py in embedded mode under tmp_path."""
    data_dir = tmp_path / "var"
    port = free_port()
    config = tmp_path / "config.toml"
    # Two workers: the embedded servers are started once, by the supervisor, for both.
    config.write_text(f'[server]\nport = {port}\nworkers = 2\n[embedded]\ndata_dir = "{data_dir}"\n')
    return data_dir, config, port, f"http://127.0.0.1:{port}"


async def test_embedded_mode_end_to_end(embedded_tmp: Path) -> None:
    tmp_path = embedded_tmp
    data_dir, config, port, base = embedded_setup(tmp_path)
    log = tmp_path / "run.log"
    async with aiohttp.ClientSession() as session:
        # cold start stopped by SIGTERM, then a warm start on the same data dir stopped by Ctrl-C
        for round_, stop_signal in enumerate((signal.SIGTERM, signal.SIGINT)):
            proc = await start_run_py(config, log)
            try:
                await wait_ready(session, base, proc)
                if round_ == 0:
                    async with session.post(
                        f"{base}/users", json={"name": "E", "email": "e2e@example.com"}
                    ) as r:
                        assert r.status == 201
                        location = r.headers["Location"]
                async with session.get(f"{base}{location}") as r:
                    assert r.status == 200  # the data survived the restart
                    assert (await r.json())["email"] == "e2e@example.com"
            finally:
                if proc.returncode is None:
                    proc.send_signal(stop_signal)
                rc = await asyncio.wait_for(proc.wait(), 60)
            text = log.read_text()
            assert rc == 0, text
            assert "Traceback" not in text
            assert text.count(f"hotpath supervisor (pid {proc.pid}) on http://127.0.0.1:{port}") == 1
            assert text.count(f"listening on http://127.0.0.1:{port}") == 2 * (round_ + 1)
            assert text.count("embedded PostgreSQL and Redis ready") == round_ + 1
            assert text.count("embedded PostgreSQL and Redis stopped") == round_ + 1
            assert processes_mentioning(str(data_dir)) == []


async def test_next_start_works_after_kill_9(embedded_tmp: Path) -> None:
    tmp_path = embedded_tmp
    data_dir, config, _, base = embedded_setup(tmp_path)
    async with aiohttp.ClientSession() as session:
        proc = await start_run_py(config, tmp_path / "first.log")
        await wait_ready(session, base, proc)
        workers = children(proc.pid)
        proc.kill()
        await proc.wait()
        # Its workers die with it (PDEATHSIG) but finish their requests first; until they are
        # gone they still answer on the port, and /ready would be theirs, not the new server's.
        await until(
            lambda: not any(running(pid) for pid in workers), "the killed supervisor's workers to exit"
        )
        proc = await start_run_py(config, tmp_path / "second.log")
        try:
            await wait_ready(session, base, proc)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 60) == 0
    # the PostgreSQL left by the killed process was adopted, then stopped with the second one
    assert processes_mentioning(str(data_dir)) == []


@pytest.mark.parametrize(
    ("env", "expect"),
    [
        (
            {"DATABASE_URL": "postgresql://app:s3cret@127.0.0.1:9/x", "REDIS_URL": "redis://127.0.0.1:9/0"},
            "cannot reach PostgreSQL at postgresql://app:***@127.0.0.1:9/x",
        ),
    ],
)
def test_unreachable_database_stops_with_a_message(env: dict[str, str], expect: str) -> None:
    env = {"PATH": os.environ.get("PATH", ""), **env, "HOTPATH_DATABASE_START_TIMEOUT": "0.5"}
    started = time.monotonic()
    proc = subprocess.run([PYTHON, "run.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert expect in proc.stderr
    assert "s3cret" not in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - started < 30


def test_unreachable_redis_stops_with_a_message(database_url: str, tmp_path: Path) -> None:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": database_url,
        "REDIS_URL": f"unix://{tmp_path}/nothing.sock",
        "HOTPATH_REDIS_START_TIMEOUT": "0.5",
    }
    proc = subprocess.run([PYTHON, "run.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"cannot reach Redis at unix://{tmp_path}/nothing.sock" in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_started_server_freezes_its_startup_heap() -> None:
    """What is alive once the app has started is moved out of the collector's reach, so a full
    collection (set off by a burst of allocations) no longer walks every module and pool."""
    assert gc.get_freeze_count() == 0
    try:
        await run.freeze_startup_heap(web.Application())
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
