"""Bodies that leave as they are produced: synthetic records and the users export.

Everything here yields `bytes` chunks of roughly `chunk_size` (16-64 KiB): one write() per
row is far slower, and each awaited write() is the backpressure that keeps memory flat.
Where PostgreSQL can do the formatting it does (row_to_json, COPY ... CSV), so the export
never builds a Python object per row.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import asyncpg

from server.http.operations import Schema
from server.http.render import FORMULA_START

# ---------------------------------------------------------------- synthetic records (API.md)
# Every field is ASCII made from an integer, so the JSON and CSV text is formatted directly:
# no dict per record, no escaping needed, and the output is byte-for-byte what orjson and
# the csv module would produce for the same records (the tests check that).
_JSON_RECORD = b'{"id":%d,"name":"User %d","email":"user%d@example.com","created_at":"2024-01-%02d"}'
_CSV_RECORD = b"%d,User %d,user%d@example.com,2024-01-%02d\r\n"
CSV_HEADER = b"id,name,email,created_at\r\n"
RECORD = Schema(
    "Record",
    {
        "type": "object",
        "required": ["id", "name", "email", "created_at"],
        "properties": {
            "id": {"type": "integer"},
            "name": {"type": "string"},
            "email": {"type": "string"},
            "created_at": {"type": "string", "format": "date"},
        },
    },
)


def synthetic_record(i: int) -> dict[str, object]:
    """Record i of the synthetic dataset, as data (for tests and small answers)."""
    return {
        "id": i,
        "name": f"User {i}",
        "email": f"user{i}@example.com",
        "created_at": f"2024-01-{i % 28 + 1:02d}",
    }


def _rows(start: int, stop: int, template: bytes, sep: bytes) -> bytes:
    return sep.join([template % (i, i, i, i % 28 + 1) for i in range(start, stop)])


def synthetic_json(count: int, batch: int) -> Iterator[bytes]:
    """A JSON array of `count` records (valid for 0 too), `batch` records per chunk."""
    yield b"["
    for start in range(1, count + 1, batch):
        chunk = _rows(start, min(start + batch, count + 1), _JSON_RECORD, b",")
        yield chunk if start == 1 else b"," + chunk
    yield b"]"


def synthetic_ndjson(count: int, batch: int) -> Iterator[bytes]:
    """One JSON record per line."""
    for start in range(1, count + 1, batch):
        yield _rows(start, min(start + batch, count + 1), _JSON_RECORD + b"\n", b"")


def synthetic_csv(count: int, batch: int) -> Iterator[bytes]:
    """RFC 4180 CSV with a header line."""
    yield CSV_HEADER
    for start in range(1, count + 1, batch):
        yield _rows(start, min(start + batch, count + 1), _CSV_RECORD, b"")


# ---------------------------------------------------------------- users export (PostgreSQL)

# Formula-injection guard done by PostgreSQL for CSV: a cell that starts like a formula
# (render.FORMULA_START) gets a leading '. In the regex class "-" goes last, where it is literal.
_FORMULA_CLASS = "".join(c for c in FORMULA_START if c != "-").replace("\t", "\\t").replace("\r", "\\r") + "-"
_GUARD = "CASE WHEN {c} ~ '^[" + _FORMULA_CLASS + "]' THEN '''' || {c} ELSE {c} END AS {c}"
EXPORT_COLUMNS = "id, name, email, created_at, updated_at"
SQL_EXPORT_JSON = (
    "SELECT row_to_json(u)::text FROM "
    f"(SELECT {EXPORT_COLUMNS} FROM users WHERE created_at >= $1 ORDER BY id) u"
)
# COPY takes no parameters: `since` is inlined (see _timestamptz)
SQL_EXPORT_CSV = (
    f"SELECT id, {_GUARD.format(c='name')}, {_GUARD.format(c='email')}, created_at, updated_at "
    "FROM users WHERE created_at >= {since} ORDER BY id"
)
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _timestamptz(value: dt.datetime) -> str:
    """`value` as a timestamptz literal, for the one statement that cannot bind it. asyncpg's
    stand-in for parameters of COPY (prepare the query to learn its types, quote the values in
    a second query) costs two round trips, and runs under the pool's short command timeout, so
    an export waiting for a lock on users failed there. The ISO form of an aware datetime holds
    only digits and -:T+. : there is nothing to quote."""
    if value.tzinfo is None:
        raise ValueError("an aware datetime is required")
    return f"'{value.isoformat()}'::timestamptz"


async def export_json_lines(
    conn: asyncpg.Connection,
    since: dt.datetime | None,
    fetch_rows: int,
    chunk_size: int,
    *,
    array: bool,
    timeout: float,
) -> AsyncIterator[bytes]:
    """Users as a JSON array (array=True) or NDJSON, formatted by PostgreSQL, read through a
    server-side cursor `fetch_rows` at a time. Must run inside a transaction; each step of the
    cursor may take `timeout` seconds (the pool's command timeout is for short requests)."""
    cursor = await conn.cursor(SQL_EXPORT_JSON, since or EPOCH, timeout=timeout)
    sep = "," if array else "\n"
    first = True
    if array:
        yield b"["
    pending: list[str] = []
    size = 0
    while True:
        rows = await cursor.fetch(fetch_rows, timeout=timeout)
        if not rows:
            break
        for (text,) in rows:
            pending.append(text)
            size += len(text) + 1
        if size >= chunk_size:
            body = sep.join(pending)
            yield (body if first else sep + body).encode() if array else (body + "\n").encode()
            first, pending, size = False, [], 0
    if pending:
        body = sep.join(pending)
        yield (body if first else sep + body).encode() if array else (body + "\n").encode()
    if array:
        yield b"]"


async def export_csv(
    conn: asyncpg.Connection,
    since: dt.datetime | None,
    write: Callable[[bytes], Awaitable[None]],
    *,
    timeout: float,
) -> None:
    """Users as CSV with a header, formatted by PostgreSQL (COPY ... TO STDOUT), each chunk
    handed to `write` as it arrives. `timeout` covers the whole COPY, the client's reading
    included (asyncpg times the output callback too)."""
    query = SQL_EXPORT_CSV.format(since=_timestamptz(since or EPOCH))
    await conn.copy_from_query(query, output=write, format="csv", header=True, timeout=timeout)
