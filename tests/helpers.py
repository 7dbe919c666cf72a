"""Helpers the tests share: config variants, ports, waiting for an effect, external programs."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.access import ACCESS
from server.access.apikeys import KeyRecord
from server.config import Config

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def replace(config: Config, **sections: dict[str, Any]) -> Config:
    """dataclasses.replace for nested sections: replace(cfg, database={"max_size": 1})."""
    changes = {
        name: dataclasses.replace(getattr(config, name), **values) for name, values in sections.items()
    }
    return dataclasses.replace(config, **changes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_program(path: str, package: str) -> str:
    """`path` if installed; otherwise skip (a developer's machine) or fail (CI, where .ci/run
    installs `package`, so a missing program means the test would silently not run)."""
    if os.access(path, os.X_OK):
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{path} is missing: .ci/run installs the Debian package {package}")
    pytest.skip(f"{path} not installed (apt-get install -y {package})")


async def until(predicate: Callable[[], Any], what: str = "condition", timeout: float = 30.0) -> Any:
    """Poll `predicate` (sync, or returning an awaitable) until it gives something truthy, and
    return that; fail naming `what` after `timeout` seconds. The one way tests wait for an
    effect they cannot await directly."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def wait_ready(session: aiohttp.ClientSession, base: str, proc: Any, timeout: float = 90.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        assert proc.returncode is None, "run.py exited before becoming ready"
        try:
            async with session.get(f"{base}/ready") as resp:
                if resp.status == 200:
                    return time.monotonic() - start
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("run.py did not become ready")


async def new_key(
    app: Any, scopes: Iterable[str], name: str = "test", **fields: Any
) -> tuple[KeyRecord, str]:
    """A key made in `app`'s keys table (actor "test") and applied at once, as the admin routes
    make one: (its record, the key). `fields`: expires_at, rate."""
    access = app[ACCESS]
    record, key = await access.store.create("test", name, list(scopes), **fields)
    await access.changed(record.id)
    return record, key


def bearer(key: str) -> dict[str, str]:
    """The headers presenting `key`."""
    return {"Authorization": f"Bearer {key}"}
