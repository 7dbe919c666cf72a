"""Versioned SQL migrations from server/storage/sql/, applied in order under an advisory lock."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from server.storage.db import local_statement_timeout

log = logging.getLogger("hotpath.migrations")

SQL_DIR = Path(__file__).resolve().parent / "sql"
# Any constant works; it only has to be the same in every hotpath process.
ADVISORY_LOCK_ID = 0x686F7470617468  # "hotpath"
# Seconds a migration step may take: the wait for the advisory lock while another process
# migrates, and each migration's statements (an index built on a large table). A constant, not
# a setting: `run.py migrate` (a connection of its own) and the pool at start must agree, and
# the pool's statement_timeout (database.statement_timeout, seconds) is far too short for both.
MIGRATION_TIMEOUT = 600.0
_NAME = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(Exception):
    """The migration files and the database disagree (edited or missing migration)."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(sql_dir: Path = SQL_DIR) -> list[Migration]:
    """Every migration file in version order; a malformed or duplicate name is an error."""
    found: dict[int, Migration] = {}
    for path in sorted(sql_dir.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise MigrationError(f"bad migration file name {path.name!r} (want NNN_name.sql)")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"two migrations share version {version}")
        found[version] = Migration(version, match.group(2), path.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def apply_migrations(
    conn: asyncpg.Connection, sql_dir: Path = SQL_DIR, *, timeout: float = MIGRATION_TIMEOUT
) -> list[int]:
    """Apply pending migrations; return the versions applied by this call.

    A session advisory lock serialises concurrent callers (several workers starting at
    once): the second waits, then finds everything applied. Each migration runs in its
    own transaction together with its bookkeeping row. The lock wait and each migration
    get `timeout` seconds, on the server (SET LOCAL statement_timeout: the connection's own
    limit is back once each transaction ends) and in asyncpg.
    """
    migrations = discover(sql_dir)
    applied_now: list[int] = []
    # taken inside a transaction only to scope the longer limit: a session lock outlives it
    async with conn.transaction():
        await local_statement_timeout(conn, timeout)
        await conn.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_ID, timeout=timeout)
    try:
        await conn.execute(_CREATE_TABLE)
        rows = await conn.fetch("SELECT version, checksum FROM schema_migrations")
        done = {r["version"]: r["checksum"] for r in rows}
        for m in migrations:
            if m.version in done:
                if done[m.version] != m.checksum:
                    raise MigrationError(
                        f"migration {m.version:03d}_{m.name} was changed after it was applied; "
                        "add a new migration instead"
                    )
                continue
            async with conn.transaction():
                await local_statement_timeout(conn, timeout)
                await conn.execute(m.sql, timeout=timeout)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    m.version,
                    m.name,
                    m.checksum,
                )
            log.info("applied migration %03d_%s", m.version, m.name)
            applied_now.append(m.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_ID)
    return applied_now
