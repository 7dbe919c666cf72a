"""The README's gunicorn line, run as written: aiohttp's uvloop worker and the app factory."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
from collections.abc import Awaitable
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from server.config import Config
from tests.helpers import PYTHON, ROOT, free_port, until


def readme_command() -> list[str]:
    """The gunicorn command line the README gives, split as a shell would."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"`(gunicorn [^`]+)`", text)
    assert match, "README names no gunicorn command"
    return shlex.split(match.group(1))


async def test_gunicorn_serves_with_the_readme_command(base_config: Config, tmp_path: Path) -> None:
    argv = readme_command()
    port = free_port()
    argv[argv.index("--bind") + 1] = f"127.0.0.1:{port}"
    argv[argv.index("--workers") + 1] = "2"
    shared = tmp_path / "metrics"
    shared.mkdir()
    env = {
        **os.environ,
        "DATABASE_URL": base_config.database.url,
        "REDIS_URL": base_config.redis.url,
        "HOTPATH_METRICS_SHARED_DIR": str(shared),
        "HOTPATH_METRICS_FLUSH_INTERVAL": "0.2",
    }
    log = tmp_path / "gunicorn.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "gunicorn", *argv[1:], cwd=ROOT, env=env, stdout=out, stderr=out
        )
    base = f"http://127.0.0.1:{port}"
    answered: list[int] = []  # the pid of every /ready answer

    async def ready(session: aiohttp.ClientSession) -> bool:
        assert proc.returncode is None, log.read_text()
        try:
            async with session.get(base + "/ready") as resp:
                answered.append(int((await resp.json()).get("pid", 0)))
                return resp.status == 200
        except aiohttp.ClientConnectionError:
            return False

    async def ready_total(session: aiohttp.ClientSession) -> float:
        async with session.get(base + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        return sum(
            s.value
            for f in text_string_to_metric_families(text)
            if f.name == "hotpath_http_requests"
            for s in f.samples
            if s.name.endswith("_total") and s.labels["route"] == "ready"
        )

    try:
        # a new connection per request, so the kernel spreads them over both workers
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            await until(lambda: ready(session), "gunicorn's workers to be ready", timeout=60)
            body = {"name": "Grace Hopper", "email": "grace@example.com"}
            async with session.post(base + "/users", json=body) as resp:
                assert resp.status == 201, await resp.text()
                location = resp.headers["Location"]
            async with session.get(base + location) as resp:
                assert resp.status == 200
                assert (await resp.json())["email"] == "grace@example.com"

            async def both_answered() -> bool:
                return await ready(session) and len(set(answered)) == 2

            await until(both_answered, "both workers to answer")
            # /metrics on either worker sums both through metrics.shared_dir
            await until(
                lambda: _equals(ready_total(session), len(answered)), "every /ready counted over both workers"
            )
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, log.read_text()


async def _equals(value: Awaitable[float], want: float) -> bool:
    return await value == want
