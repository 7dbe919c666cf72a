"""`python run.py keys ...` as an operator runs it, against the test run's PostgreSQL and Redis,
with a running app that must hear every change within a second."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import asyncpg
import pytest

from server.access.apikeys import KEY_PATTERN
from server.access.scopes import SCOPES
from server.config import Config
from tests.helpers import PYTHON, ROOT, until


class Ran:
    def __init__(self, status: int, out: str, err: str) -> None:
        self.status, self.out, self.err = status, out, err

    @property
    def last_line(self) -> str:
        return self.out.rstrip("\n").rsplit("\n", 1)[-1]


async def keys(cfg: Config, *args: str, **env: str) -> Ran:
    """run.py keys ARGS in a process of its own, on the test run's database and Redis."""
    environ = {**os.environ, "DATABASE_URL": cfg.database.url, "REDIS_URL": cfg.redis.url, **env}
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "run.py", "keys", *args, cwd=ROOT, env=environ,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    ran = Ran(await proc.wait(), out.decode(), err.decode())
    assert "Traceback" not in ran.err, ran.err
    return ran


async def status_with(api: Any, key: str, path: str = "/users") -> int:
    async with api.get(path, headers={"Authorization": f"Bearer {key}"}) as resp:
        return int(resp.status)


async def refused_within(api: Any, key: str, seconds: float, what: str) -> None:
    """The app answers the key with 401 within `seconds` (polled, never slept)."""
    await until(lambda: _is(status_with(api, key), 401), what, timeout=seconds)


async def _is(status: Any, expected: int) -> bool:
    return bool(await status == expected)


async def test_create_list_revoke_rotate_round_trip(api: Any, auth_cfg: Config) -> None:
    ran = await keys(
        auth_cfg, "create", "--name", "ci deploy", "--scopes", "users:read,jobs", "--rate", "1000/minute"
    )
    assert ran.status == 0, ran.err
    key = ran.last_line
    assert KEY_PATTERN.fullmatch(key)
    assert "ci deploy" in ran.out and "users:read, jobs" in ran.out and "1000/minute" in ran.out
    assert key not in ran.err
    key_id = int(ran.out.split("created key ", 1)[1].split()[0])

    # the running app was told: the key works (its scope), at once
    await until(lambda: _is(status_with(api, key), 200), "the new key to work", timeout=1.0)
    assert await status_with(api, key, "/admin/keys") == 403

    ran = await keys(auth_cfg, "list")
    assert ran.status == 0
    header, *rows = ran.out.splitlines()
    assert header.split()[:3] == ["ID", "NAME", "PREFIX"]
    assert any(row.split()[0] == str(key_id) and key[:15] in row for row in rows)
    assert key not in ran.out

    # revoked from the command line: the running app refuses it within a second
    ran = await keys(auth_cfg, "revoke", str(key_id))
    assert ran.status == 0, ran.err
    assert f"revoked key {key_id}" in ran.out
    await refused_within(api, key, 1.0, "the revoked key to be refused")
    assert str(key_id) not in [row.split()[0] for row in (await keys(auth_cfg, "list")).out.splitlines()[1:]]
    listed = (await keys(auth_cfg, "list", "--all")).out
    assert any(row.split()[0] == str(key_id) and row.endswith("revoked") for row in listed.splitlines())

    # rotated: both keys work, then the old one stops after the overlap
    ran = await keys(auth_cfg, "create", "--name", "rotating", "--all-scopes", "--expires", "30d")
    old_key = ran.last_line
    old_id = int(ran.out.split("created key ", 1)[1].split()[0])
    await until(lambda: _is(status_with(api, old_key), 200), "the second key to work", timeout=1.0)
    ran = await keys(auth_cfg, "rotate", str(old_id), "--overlap", "2")
    rotated_at = time.monotonic()
    assert ran.status == 0, ran.err
    new_key = ran.last_line
    assert KEY_PATTERN.fullmatch(new_key) and new_key != old_key
    await until(lambda: _is(status_with(api, new_key), 200), "the replacement to work", timeout=1.0)
    if time.monotonic() - rotated_at < 1.5:  # still inside the overlap (with a margin)
        assert await status_with(api, old_key) == 200
    await refused_within(api, old_key, 2.0 + 1.0 + (time.monotonic() - rotated_at), "the old key to expire")
    assert await status_with(api, new_key) == 200
    assert await status_with(api, new_key, "/admin/keys") == 200  # --all-scopes: admin too

    conn = await asyncpg.connect(auth_cfg.database.url)
    try:
        actions = await conn.fetch("SELECT actor, action, target FROM audit_log ORDER BY id")
    finally:
        await conn.close()
    by_cli = [(r["action"], r["target"]) for r in actions if r["actor"] == "cli"]
    assert ("key.create", str(key_id)) in by_cli
    assert ("key.revoke", str(key_id)) in by_cli
    assert ("key.rotate", str(old_id)) in by_cli
    assert ("key.list", None) in by_cli


async def test_scopes_lists_every_scope(cfg: Config) -> None:
    ran = await keys(cfg, "scopes", DATABASE_URL="postgresql://nobody@127.0.0.1:9/none")  # no database needed
    assert ran.status == 0
    lines = ran.out.splitlines()
    assert [line.split()[0] for line in lines] == list(SCOPES)
    assert all(SCOPES[line.split()[0]] in line for line in lines)


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        (["create", "--name", "x", "--scopes", "users:read,root"], 2, "unknown scope(s) 'root'"),
        (["create", "--name", "x", "--all-scopes", "--rate", "lots"], 2, "--rate"),
        (["create", "--name", "x", "--all-scopes", "--rate", "1/400d"], 2, "366 days"),
        (["create", "--name", "x", "--all-scopes", "--expires", "2001-01-01"], 2, "in the future"),
        (["create", "--name", "x"], 2, "--scopes"),
        (["rotate", "1", "--overlap", "soon"], 2, "--overlap"),
        (["revoke", "abc"], 2, "positive number"),
        (["revoke", "424242"], 1, "no key with id 424242"),
        (["rotate", "424242"], 1, "no key with id 424242"),
    ],
)
async def test_errors_are_one_clear_line(cfg: Config, args: list[str], status: int, says: str) -> None:
    ran = await keys(cfg, *args)
    assert ran.status == status, (ran.out, ran.err)
    assert says in ran.err
    assert not KEY_PATTERN.search(ran.out)


async def test_database_down_is_a_runtime_error(cfg: Config) -> None:
    ran = await keys(
        cfg,
        "list",
        DATABASE_URL="postgresql://app:s3cret@127.0.0.1:9/x",
        HOTPATH_DATABASE_START_TIMEOUT="0.3",
    )
    assert ran.status == 1
    assert "cannot reach PostgreSQL at postgresql://app:***@127.0.0.1:9/x" in ran.err
    assert "s3cret" not in ran.err
