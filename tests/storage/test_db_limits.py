"""PostgreSQL's own limits on hotpath's pool: statement_timeout and temp_file_limit per pooled
connection, a clean 503 when a statement outlives its limit, and the longer limits of the work
that is meant to take long (exports, bulk imports; migrations are in test_migrations.py)."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from yarl import URL

from server.app import create_app
from server.config import CONFIG, Config
from server.storage.db import Database
from server.storage.pool import DB, create_pg_pool
from tests.helpers import replace, until


@pytest.fixture
async def admin(cfg: Config) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(cfg.database.url)
    try:
        yield conn
    finally:
        await conn.close()


async def shown(db: Database, setting: str) -> list[str]:
    """`SHOW setting` on two pooled connections checked out at once (so both are real ones)."""
    async with db.acquire() as one, db.acquire() as two:
        return [await c.fetchval(f"SHOW {setting}") for c in (one, two)]


async def test_pool_connections_carry_the_configured_limits(aiohttp_client: Any, cfg: Config) -> None:
    app = create_app(replace(cfg, database={"statement_timeout": 2.5, "temp_file_limit": 64 * 1024 * 1024}))
    await aiohttp_client(app)
    assert await shown(app[DB], "statement_timeout") == ["2500ms", "2500ms"]
    assert await shown(app[DB], "temp_file_limit") == ["64MB", "64MB"]


async def test_shipped_limits(client: Any) -> None:
    assert await shown(client.app[DB], "statement_timeout") == ["6s", "6s"]
    assert await shown(client.app[DB], "temp_file_limit") == ["1GB", "1GB"]


async def waiting_longer_than(admin: asyncpg.Connection, query_like: str, seconds: float) -> bool:
    """A backend whose statement (matching `query_like`) has waited for a lock for `seconds`."""
    # pg_stat_activity is read once per transaction, and `admin` is inside one (the lock's)
    await admin.execute("SELECT pg_stat_clear_snapshot()")
    return bool(
        await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE $1 "
            "AND clock_timestamp() - query_start > make_interval(secs => $2)",  # now(): the txn's start
            query_like,
            seconds,
        )
    )


async def test_a_statement_over_its_limit_is_a_clean_503(
    aiohttp_client: Any, cfg: Config, admin: asyncpg.Connection
) -> None:
    # the server's limit fires first here: asyncpg's own timeout is far longer
    app = create_app(replace(cfg, database={"statement_timeout": 0.3, "command_timeout": 30.0}))
    client = await aiohttp_client(app)
    async with admin.transaction():
        await admin.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")  # GET /users now waits
        resp = await client.get("/users?limit=1")
        assert resp.status == 503 and resp.content_type == "application/problem+json"
        assert resp.headers["Retry-After"] == "1"
        doc = await resp.json(content_type=None)
        assert "statement timeout" in doc["detail"]
    assert (await client.get("/users?limit=1")).status == 200


# the pool's limits, far shorter than what the long work below waits for
SHORT = {"statement_timeout": 0.4, "command_timeout": 1.0}


@pytest.mark.parametrize("fmt", ["ndjson", "csv"])
async def test_an_export_outlives_the_pool_limits(
    aiohttp_client: Any, cfg: Config, admin: asyncpg.Connection, fmt: str
) -> None:
    client = await aiohttp_client(create_app(replace(cfg, database=SHORT)))
    await admin.executemany(
        "INSERT INTO users (name, email) VALUES ($1, $2)", [(f"E{i}", f"e{i}@example.com") for i in range(50)]
    )
    tx = admin.transaction()
    await tx.start()
    try:
        await admin.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        export = asyncio.ensure_future(client.get(f"/users/export?format={fmt}"))
        # the export's statement waits for the lock three times as long as the pool allows
        long_wait = 3 * SHORT["command_timeout"]
        await until(lambda: waiting_longer_than(admin, "%FROM users%", long_wait), "the export to wait long")
    finally:
        await tx.rollback()
    resp = await export
    assert resp.status == 200
    body = await resp.text()
    assert body.count("@example.com") == 50


async def test_a_bulk_import_outlives_the_pool_limits(
    aiohttp_client: Any, cfg: Config, admin: asyncpg.Connection
) -> None:
    jobs = {"lease": 10.0, "heartbeat_interval": 0.3, "poll_interval": 0.2, "shutdown_timeout": 2.0}
    client = await aiohttp_client(create_app(replace(cfg, database=SHORT, jobs=jobs)))
    await admin.execute("TRUNCATE jobs, reports RESTART IDENTITY")  # the app made the tables
    records = [{"name": f"B{i}", "email": f"b{i}@example.com"} for i in range(20)]
    tx = admin.transaction()
    await tx.start()
    try:
        await admin.execute("LOCK TABLE users IN SHARE MODE")  # readers pass, the upsert waits
        resp = await client.post("/bulk-process", json=records)
        assert resp.status == 202
        task_id = (await resp.json())["task_id"]
        await until(
            lambda: waiting_longer_than(admin, "%INSERT INTO users%", 3 * SHORT["command_timeout"]),
            "the import's upsert to wait long",
        )
    finally:
        await tx.rollback()

    async def finished() -> Any:
        data = await (await client.get(f"/task-status/{task_id}")).json()
        return data if data["status"] in ("completed", "failed", "cancelled") else None

    done = await until(finished, "the import to finish")
    assert done["status"] == "completed" and done["attempts"] == 1, done
    assert done["result"]["imported"] == 20
    await admin.execute("TRUNCATE jobs, reports RESTART IDENTITY")


# ---------------------------------------------------------------- a role that may not set temp_file_limit


@pytest.fixture
async def plain_role(admin: asyncpg.Connection) -> AsyncIterator[str]:
    """A login role of this test's own, without superuser (roles are cluster-wide: dropped after)."""
    name = f"hotpath_plain_{secrets.token_hex(4)}"
    await admin.execute(f'CREATE ROLE "{name}" LOGIN')
    try:
        yield name
    finally:
        await admin.execute(f'REVOKE ALL ON PARAMETER temp_file_limit FROM "{name}"')
        await admin.execute(f'DROP ROLE "{name}"')


def with_user(url: str, user: str) -> str:
    return str(URL(url).with_user(user))


async def open_pool(cfg: Config) -> asyncpg.Pool:
    app = web.Application()
    app[CONFIG] = cfg
    return await create_pg_pool(app)


async def test_temp_file_limit_refused_is_one_warning_and_the_pool_works(
    cfg: Config, plain_role: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = with_user(cfg.database.url, plain_role)
    caplog.set_level(logging.WARNING, logger="hotpath.resources")
    pool = await open_pool(replace(cfg, database={"url": url, "min_size": 3, "statement_timeout": 2.0}))
    try:
        db = Database(pool, 2.0, 10)
        assert await shown(db, "temp_file_limit") == ["-1", "-1"]  # the server's default stays
        assert await shown(db, "statement_timeout") == ["2s", "2s"]  # any role may set this one
    finally:
        await pool.close()
    warnings = [r for r in caplog.records if "temp_file_limit" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


async def test_temp_file_limit_granted_on_the_parameter_is_applied(
    cfg: Config, plain_role: str, admin: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    if int(await admin.fetchval("SHOW server_version_num")) < 150000:
        pytest.skip("GRANT SET ON PARAMETER arrived in PostgreSQL 15")
    await admin.execute(f'GRANT SET ON PARAMETER temp_file_limit TO "{plain_role}"')
    caplog.set_level(logging.WARNING, logger="hotpath.resources")
    pool = await open_pool(replace(cfg, database={"url": with_user(cfg.database.url, plain_role)}))
    try:
        assert await shown(Database(pool, 2.0, 10), "temp_file_limit") == ["1GB", "1GB"]
    finally:
        await pool.close()
    assert not [r for r in caplog.records if "temp_file_limit" in r.getMessage()]


# ---------------------------------------------------------------- client-chosen ranges (the audit)

RANGES = [  # request, status; each bound is checked in the handler, before any SQL
    ("/tasks?after=99999999999999999999&limit=500", 200),  # beyond bigint: capped, an empty page
    ("/tasks?after=-5", 422),
    ("/tasks?limit=0", 422),
    ("/tasks?limit=-1", 422),
    ("/tasks?limit=999999999999999999999", 200),  # capped at the page maximum
    ("/users?after=99999999999999999999&limit=-1", 422),
    ("/products?page=0", 422),
    ("/products?page=99999999999999999999&limit=99999999999", 200),  # capped: an empty page
    ("/task-status/9999999999999999999", 404),  # 19 digits, beyond bigint
    ("/reports/9999999999999999999", 404),
    ("/tasks/9999999999999999999/events", 404),
    ("/stream-json/999999999999", 400),  # streaming.max_records
]


@pytest.mark.parametrize(("path", "status"), RANGES)
async def test_client_ranges_are_bounded_before_sql(client: Any, path: str, status: int) -> None:
    resp = await client.get(path)
    assert resp.status == status, await resp.text()
    if status >= 400:
        assert resp.content_type == "application/problem+json"
    else:
        body = await resp.json()
        assert body["items"] == [] and body["limit"] == 200


@pytest.mark.parametrize("user_id", ["9223372036854775808", "-1", "0", "1e400", "1.5"])
async def test_report_user_ids_beyond_bigint_are_422(client: Any, user_id: str) -> None:
    resp = await client.post("/generate-report", json={"report_type": "user-activity", "user_id": user_id})
    assert resp.status == 422
    assert (await resp.json(content_type=None))["errors"][0]["field"] == "user_id"
