"""The development key of an embedded start: made once with every scope, shown once, kept in
<data_dir>/dev-key (0600), reused by the next start."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from server.access.apikeys import KEY_PATTERN, KeyStore
from server.access.devkey import DEV_KEY_NAME, ensure_dev_key
from server.access.scopes import SCOPES
from server.config import Config
from server.storage.db import Database
from server.storage.migrations import apply_migrations
from tests.helpers import PYTHON, ROOT, free_port, wait_ready


@pytest.fixture
async def store(cfg: Config) -> AsyncIterator[KeyStore]:
    pool = await asyncpg.create_pool(cfg.database.url, min_size=1, max_size=2)
    async with pool.acquire() as conn:
        await apply_migrations(conn)
    try:
        yield KeyStore(Database(pool, 5.0, 2))
    finally:
        await pool.close()


async def test_made_once_then_kept(store: KeyStore, tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    made = await ensure_dev_key(store, data_dir)
    assert made.state == "created" and made.key is not None and KEY_PATTERN.fullmatch(made.key)
    assert made.record.name == DEV_KEY_NAME and set(made.record.scopes) == set(SCOPES)
    path = data_dir / "dev-key"
    assert path.read_text() == made.key + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    again = await ensure_dev_key(store, data_dir)
    assert again.state == "kept" and again.key is None and again.record.id == made.record.id
    assert path.read_text() == made.key + "\n"

    # the file lost: the active key is not shown again, and no second one is made
    path.unlink()
    elsewhere = await ensure_dev_key(store, data_dir)
    assert elsewhere.state == "elsewhere" and elsewhere.record.id == made.record.id
    assert not path.exists()

    # revoked: the next start makes a new one
    await store.revoke("test", made.record.id)
    path.write_text(made.key + "\n")
    fresh = await ensure_dev_key(store, data_dir)
    assert fresh.state == "created" and fresh.key != made.key
    assert path.read_text() == f"{fresh.key}\n"


def embedded_env() -> dict[str, str]:
    """No URLs (embedded servers), and the shipped access rules (tests open every route)."""
    drop = ("DATABASE_URL", "REDIS_URL", "HOTPATH_AUTH_OPEN_ROUTES")
    return {k: v for k, v in os.environ.items() if k not in drop}


async def test_embedded_start_makes_the_key_once(embedded_tmp: Path) -> None:
    data_dir = embedded_tmp / "var"
    port = free_port()
    config = embedded_tmp / "config.toml"
    config.write_text(f'[server]\nport = {port}\nworkers = 1\n[embedded]\ndata_dir = "{data_dir}"\n')
    base = f"http://127.0.0.1:{port}"
    shown: list[str] = []
    async with aiohttp.ClientSession() as session:
        for round_ in range(2):
            log = embedded_tmp / f"run{round_}.log"
            with log.open("wb") as stderr:
                proc = await asyncio.create_subprocess_exec(
                    PYTHON, "run.py", "--config", str(config), cwd=ROOT, env=embedded_env(),
                    stdout=subprocess.DEVNULL, stderr=stderr,
                )  # fmt: skip
            try:
                await wait_ready(session, base, proc)
                key = (data_dir / "dev-key").read_text().strip()
                async with session.get(f"{base}/users", headers={"Authorization": f"Bearer {key}"}) as r:
                    assert r.status == 200
                async with session.get(f"{base}/users") as r:
                    assert r.status == 401  # configured nothing open: a key is needed
            finally:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(proc.wait(), 60) == 0
            text = log.read_text()
            shown += re.findall(r"^development key \(every scope\): (hp_\S+)$", text, re.MULTILINE)
            assert "Traceback" not in text
            if round_ == 0:
                assert shown == [key]  # shown once, on a line of its own
            else:
                assert shown == [key]  # not shown again: where it is kept instead
                assert f"development key (every scope): in {data_dir / 'dev-key'}" in text
                assert KEY_PATTERN.search(text) is None
    assert stat.S_IMODE((data_dir / "dev-key").stat().st_mode) == 0o600
