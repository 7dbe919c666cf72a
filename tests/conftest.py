"""Shared fixtures: a private PostgreSQL database and Redis database per test run.

With DATABASE_URL and REDIS_URL set (CI, a developer's machine), the run creates its own
database on that server and uses its own Redis database number. With neither set (a fresh
machine), it starts embedded PostgreSQL and Redis in a temporary directory, exactly as
`python run.py` would, so the suite needs nothing but Python.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from server.app import create_app
from server.config import Config, load_config
from server.runtime.embedded import EmbeddedServices
from server.urls import with_database
from tests.helpers import require_program

if TYPE_CHECKING:
    from playwright.async_api import Browser

CHROMIUM = "/usr/bin/chromium"  # Debian's build (.ci/run installs it); never `playwright install`
# Without the background-networking flags Chromium keeps trying to reach the internet.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(with_database(url, "postgres"))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# Each feature's tests call its routes without keys: every route is open to them (servers the
# tests start as processes inherit this too). tests/access/ tests the keys, scopes and open
# routes with the shipped defaults (a config of their own, with auth.open_routes = []).
OPEN_ROUTES = {"HOTPATH_AUTH_OPEN_ROUTES": '["*"]'}


def pytest_configure(config: pytest.Config) -> None:
    """A run stopped with SIGTERM (a CI time-out, `kill`) ends like Ctrl-C: pytest still tears
    its fixtures down, so the embedded PostgreSQL (a daemon) is stopped, not left running."""
    signal.signal(signal.SIGTERM, _interrupt)
    os.environ.update(OPEN_ROUTES)


@contextmanager
def embedded_dir() -> Iterator[Path]:
    """A temporary dir for embedded servers, directly under /tmp.

    Not pytest's tmp_path: running as root, embedded PostgreSQL needs o+rx on every parent
    of its data dir, and pytest resets its own base dir to 0700 whenever a session starts,
    which would break an embedded server of a concurrently running session.
    """
    path = Path(tempfile.mkdtemp(prefix="hotpath-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def embedded_tmp() -> Iterator[Path]:
    with embedded_dir() as path:
        yield path


@pytest.fixture(scope="session")
def servers() -> Iterator[tuple[str, str]]:
    """(postgres server URL, redis server URL): the configured ones, or embedded ones."""
    db_url, redis_url = os.environ.get("DATABASE_URL"), os.environ.get("REDIS_URL")
    if db_url and redis_url:
        yield db_url, redis_url
        return
    with embedded_dir() as path, EmbeddedServices(path) as embedded:
        yield embedded.start()


@pytest.fixture(scope="session")
def database_url(servers: tuple[str, str]) -> Iterator[str]:
    """A database of this run's own, created on the server and dropped at the end."""
    name = f"hotpath_test_{os.getpid()}_{secrets.token_hex(3)}"
    asyncio.run(_admin(servers[0], f'CREATE DATABASE "{name}"'))
    yield with_database(servers[0], name)
    asyncio.run(_admin(servers[0], f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def redis_url(servers: tuple[str, str]) -> str:
    """A Redis database number of this run's own (1..15), flushed before each test."""
    return with_database(servers[1], 1 + os.getpid() % 15)


@pytest.fixture(scope="session")
def base_config(database_url: str, redis_url: str) -> Config:
    return load_config(env={"DATABASE_URL": database_url, "REDIS_URL": redis_url, **OPEN_ROUTES})


@pytest.fixture
async def clean_state(base_config: Config) -> AsyncIterator[None]:
    """Empty tables and an empty Redis database before each test that uses the app."""
    conn = await asyncpg.connect(base_config.database.url)
    try:
        exists = await conn.fetchval("SELECT to_regclass('users') IS NOT NULL")
        if exists:
            await conn.execute("TRUNCATE users RESTART IDENTITY CASCADE")
        if await conn.fetchval("SELECT to_regclass('api_keys') IS NOT NULL"):
            await conn.execute("TRUNCATE api_keys, audit_log RESTART IDENTITY")
    finally:
        await conn.close()
    r = aioredis.from_url(base_config.redis.url)
    try:
        await r.flushdb()
    finally:
        await r.aclose()
    yield


@pytest.fixture
def cfg(base_config: Config, clean_state: None) -> Config:
    return base_config


@pytest.fixture
async def client(aiohttp_client: Any, cfg: Config) -> Any:
    """A test client over the real app: cleanup contexts open the real pool and Redis."""
    return await aiohttp_client(create_app(cfg))


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium driven by Playwright: skipped where it is not installed, a failure in CI."""
    require_program(CHROMIUM, "chromium")
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            await b.close()
