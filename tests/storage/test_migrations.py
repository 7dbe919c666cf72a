"""Migrations: applied in order, recorded, idempotent, safe from several processes at once."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import secrets
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from server.storage.migrations import (
    ADVISORY_LOCK_ID,
    MIGRATION_TIMEOUT,
    MigrationError,
    apply_migrations,
    discover,
)
from server.urls import with_database
from tests.helpers import PYTHON, ROOT, until


@pytest.fixture
async def fresh_db(database_url: str) -> AsyncIterator[str]:
    """An empty database of this test's own (migrations must start from nothing)."""
    name = f"hotpath_mig_{os.getpid()}_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(with_database(database_url, "postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield with_database(database_url, name)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def test_discover_finds_ordered_migrations() -> None:
    found = discover()
    assert [m.version for m in found] == sorted(m.version for m in found)
    assert found[0].version == 1 and found[0].name == "users"


def test_discover_rejects_bad_names(tmp_path: Path) -> None:
    (tmp_path / "1_x.sql").write_text("SELECT 1")
    with pytest.raises(MigrationError):
        discover(tmp_path)


async def test_apply_twice_applies_once(fresh_db: str) -> None:
    conn = await asyncpg.connect(fresh_db)
    try:
        first = await apply_migrations(conn)
        assert first == [m.version for m in discover()]
        assert await apply_migrations(conn) == []
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        assert [(r["version"], r["name"]) for r in rows] == [(m.version, m.name) for m in discover()]
        assert await conn.fetchval("SELECT count(*) FROM users") == 0
    finally:
        await conn.close()


async def test_new_migration_applies_and_edited_one_is_refused(fresh_db: str, tmp_path: Path) -> None:
    (tmp_path / "001_a.sql").write_text("CREATE TABLE a (x int);")
    conn = await asyncpg.connect(fresh_db)
    try:
        assert await apply_migrations(conn, tmp_path) == [1]
        (tmp_path / "002_b.sql").write_text("CREATE TABLE b (x int);")
        assert await apply_migrations(conn, tmp_path) == [2]
        (tmp_path / "001_a.sql").write_text("CREATE TABLE a (x bigint);")
        with pytest.raises(MigrationError, match="001_a was changed"):
            await apply_migrations(conn, tmp_path)
    finally:
        await conn.close()


async def test_failed_migration_rolls_back_and_records_nothing(fresh_db: str, tmp_path: Path) -> None:
    (tmp_path / "001_bad.sql").write_text("CREATE TABLE t (x int); SELECT * FROM no_such_table;")
    conn = await asyncpg.connect(fresh_db)
    try:
        with pytest.raises(asyncpg.UndefinedTableError):
            await apply_migrations(conn, tmp_path)
        assert await conn.fetchval("SELECT to_regclass('t')") is None
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == 0
        # the advisory lock was released: another session can take it at once
        other = await asyncpg.connect(fresh_db)
        try:
            assert await other.fetchval("SELECT pg_try_advisory_lock($1)", ADVISORY_LOCK_ID) is True
        finally:
            await other.close()
    finally:
        await conn.close()


async def test_two_processes_migrating_at_once(fresh_db: str, redis_url: str) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "DATABASE_URL": fresh_db, "REDIS_URL": redis_url}
    procs = [
        await asyncio.create_subprocess_exec(
            PYTHON, "run.py", "migrate", cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
        )
        for _ in range(3)
    ]
    outputs = [(await p.communicate())[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    # exactly one of them applied 001; the others found nothing pending
    assert sum("applied migration 001_users" in out for out in outputs) == 1
    conn = await asyncpg.connect(fresh_db)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(discover())
    finally:
        await conn.close()


# A pool like the app's, with limits far shorter than what a migration is allowed to take.
SHORT_LIMITS = {"statement_timeout": "200"}  # ms


async def test_migrations_keep_their_longer_limit_on_a_short_pool(fresh_db: str, tmp_path: Path) -> None:
    (tmp_path / "001_slow.sql").write_text(
        "SELECT pg_sleep(0.6);"  # three times the pool's statement_timeout
        "CREATE TABLE probe AS SELECT current_setting('statement_timeout')::interval AS inside;"
    )
    pool = await asyncpg.create_pool(
        fresh_db, min_size=1, max_size=2, command_timeout=0.2, server_settings=SHORT_LIMITS
    )
    holder = await asyncpg.connect(fresh_db)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_ID)  # another process migrating
        async with pool.acquire() as conn:
            migrating = asyncio.ensure_future(apply_migrations(conn, tmp_path))

            async def lock_waited_long() -> bool:
                await holder.execute("SELECT pg_stat_clear_snapshot()")
                return bool(
                    await holder.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND query LIKE '%pg_advisory_lock%' AND pid <> pg_backend_pid() "
                        "AND clock_timestamp() - query_start > interval '1 second'"
                    )
                )

            await until(lock_waited_long, "the advisory-lock wait to outlast the pool's limits")
            await holder.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_ID)
            assert await migrating == [1]
            inside = await conn.fetchval("SELECT inside FROM probe")
            assert inside == dt.timedelta(seconds=MIGRATION_TIMEOUT)
            assert await conn.fetchval("SHOW statement_timeout") == "200ms"  # the pool's again
    finally:
        await holder.close()
        await pool.close()
