"""Streamed datasets: exact content, edges, hostile values, disconnects and stalled clients."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import logging
import socket
from typing import Any

import asyncpg
import orjson
import pytest

from server import records
from server.app import create_app
from server.storage.db import Database
from server.storage.pool import DB
from tests.helpers import replace, until


def expected_records(n: int) -> list[dict[str, Any]]:
    return [records.synthetic_record(i) for i in range(1, n + 1)]


@pytest.mark.parametrize("count", [0, 1, 2, 999, 1000, 1001, 2500])
async def test_stream_json_exact(client: Any, count: int) -> None:
    resp = await client.get(f"/stream-json/{count}")
    assert resp.status == 200 and resp.content_type == "application/json"
    body = await resp.read()
    assert orjson.loads(body) == expected_records(count)
    # byte for byte what a JSON encoder writes for the same records
    assert body == orjson.dumps(expected_records(count))


@pytest.mark.parametrize("count", [0, 3, 1001])
async def test_stream_ndjson_exact(client: Any, count: int) -> None:
    resp = await client.get(f"/stream-json/{count}?format=ndjson")
    assert resp.content_type == "application/x-ndjson"
    lines = (await resp.text()).splitlines()
    assert [json.loads(line) for line in lines] == expected_records(count)


@pytest.mark.parametrize("count", [0, 3, 1001])
async def test_stream_csv_exact(client: Any, count: int) -> None:
    resp = await client.get(f"/stream-csv/{count}")
    assert resp.content_type == "text/csv"
    body = await resp.text()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(["id", "name", "email", "created_at"])
    for r in expected_records(count):
        writer.writerow(r.values())
    assert body == buf.getvalue()


async def test_count_cap_and_format_errors(aiohttp_client: Any, cfg: Any) -> None:
    client = await aiohttp_client(create_app(replace(cfg, streaming={"max_records": 50})))
    assert (await client.get("/stream-json/50")).status == 200
    resp = await client.get("/stream-json/51")
    assert resp.status == 400 and "50" in (await resp.json(content_type=None))["detail"]
    assert (await client.get("/stream-csv/51")).status == 400
    assert (await client.get("/stream-json/5?format=xml")).status == 400
    assert (await client.get("/stream-json/-1")).status == 404


async def test_download_names_the_file(client: Any) -> None:
    resp = await client.get("/stream-csv/2?download=1")
    assert resp.headers["Content-Disposition"] == 'attachment; filename="records-2.csv"'
    assert "Content-Disposition" not in (await client.get("/stream-csv/2")).headers


HOSTILE = [
    ('Comma, Quote "Q"', "a@example.com"),
    ("line\nbreak", "b@example.com"),
    ('=HYPERLINK("x")', "c@example.com"),
    ("+1 plus", "d@example.com"),
    ("-minus", "e@example.com"),
    ("@at", "f@example.com"),
    ("Zoë ☃", "g@example.com"),
    ("＝HYPERLINK(1)", "h@example.com"),  # fullwidth: spreadsheets read it as =
    ("＋1", "i@example.com"),
    ("－1", "j@example.com"),
    ("＠SUM(1)", "k@example.com"),
    ("﹦1", "l@example.com"),
    ("\tTAB", "m@example.com"),
]


async def seed(cfg: Any, people: list[tuple[str, str]]) -> None:
    conn = await asyncpg.connect(cfg.database.url)
    try:
        await conn.executemany("INSERT INTO users (name, email) VALUES ($1, $2)", people)
    finally:
        await conn.close()


def same_instants(users: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """PostgreSQL writes 12:00:00.5+00:00 where Python writes 12:00:00.500000+00:00: the
    export's timestamps are compared as instants."""
    return [
        {k: dt.datetime.fromisoformat(v) if k.endswith("_at") else v for k, v in u.items()} for u in users
    ]


async def test_users_export_in_each_format(client: Any, cfg: Any) -> None:
    await seed(cfg, HOSTILE)
    listed = same_instants((await (await client.get("/users")).json())["items"])
    as_json = await client.get("/users/export", headers={"Accept": "application/json"})
    assert as_json.content_type == "application/json"
    assert same_instants(await as_json.json()) == listed
    nd = await client.get("/users/export?format=ndjson")
    assert same_instants([json.loads(line) for line in (await nd.text()).splitlines()]) == listed
    as_csv = await client.get("/users/export", headers={"Accept": "text/csv"})
    rows = list(csv.DictReader(io.StringIO(await as_csv.text(), newline="")))
    assert [r["email"] for r in rows] == [u["email"] for u in listed]
    names = {r["email"]: r["name"] for r in rows}
    assert names["a@example.com"] == 'Comma, Quote "Q"' and names["b@example.com"] == "line\nbreak"
    assert names["c@example.com"] == '\'=HYPERLINK("x")'  # formula-like cells defused
    assert names["d@example.com"] == "'+1 plus" and names["e@example.com"] == "'-minus"
    assert names["f@example.com"] == "'@at" and names["g@example.com"] == "Zoë ☃"
    assert names["h@example.com"] == "'＝HYPERLINK(1)" and names["i@example.com"] == "'＋1"
    assert names["j@example.com"] == "'－1" and names["k@example.com"] == "'＠SUM(1)"
    assert names["l@example.com"] == "'﹦1" and names["m@example.com"] == "'\tTAB"
    empty = await client.get("/users/export?since=2999-01-01")
    assert await empty.json() == []
    assert (await client.get("/users/export?since=yesterday")).status == 422
    assert (await client.get("/users/export?format=xml")).status == 400
    assert (await client.get("/users/export", headers={"Accept": "image/png"})).status == 406


SINCE_OUT_OF_RANGE = [
    "9999-12-31T23:59:59-23:59",  # past year 9999 in UTC: asyncpg cannot encode it (was a 500 mid-stream)
    "0001-01-01T00:00:00+23:59",  # before year 1 in UTC
    "0001-01-01",  # asyncpg's -infinity
    "9999-12-31T23:59:59.999999",  # asyncpg's infinity
    "1969-12-31T23:59:59Z",
    "2999-12-31T23:00:00-01:00",  # 3000-01-01 in UTC
]


@pytest.mark.parametrize("since", SINCE_OUT_OF_RANGE)
async def test_export_since_out_of_range_is_422_before_any_sql(
    client: Any, monkeypatch: pytest.MonkeyPatch, since: str
) -> None:
    def no_sql(self: Database) -> Any:
        raise AssertionError("the export reached the database")

    monkeypatch.setattr(Database, "acquire", no_sql)
    for fmt in ("json", "csv"):
        resp = await client.get("/users/export", params={"since": since, "format": fmt})
        assert resp.status == 422 and resp.content_type == "application/problem+json"
        doc = await resp.json(content_type=None)
        assert doc["errors"][0]["field"] == "since" and "1970-01-01" in doc["errors"][0]["message"]


async def test_export_since_at_the_edges_of_the_range(client: Any, cfg: Any) -> None:
    await seed(cfg, [("Edge", "edge@example.com")])
    everyone = await client.get("/users/export", params={"since": "1970-01-01T00:00:00Z"})
    assert [u["email"] for u in await everyone.json()] == ["edge@example.com"]
    assert await (await client.get("/users/export", params={"since": "2999-12-31T23:59:59Z"})).json() == []
    for since, rows in (("1970-01-01T01:00:00+01:00", 2), ("2999-12-31", 1)):  # header + users
        resp = await client.get("/users/export", params={"since": since, "format": "csv"})
        assert len((await resp.text()).splitlines()) == rows


async def test_export_is_one_snapshot_under_concurrent_inserts(client: Any, cfg: Any) -> None:
    await seed(cfg, [(f"P{i}", f"p{i}@example.com") for i in range(3000)])
    conn = await asyncpg.connect(cfg.database.url)
    try:

        async def insert_more() -> None:
            for i in range(200):
                await conn.execute(
                    "INSERT INTO users (name, email) VALUES ($1, $2)", f"N{i}", f"n{i}@example.com"
                )

        inserting = asyncio.ensure_future(insert_more())
        body = await (await client.get("/users/export?format=ndjson")).text()
        await inserting
    finally:
        await conn.close()
    ids = [json.loads(line)["id"] for line in body.splitlines()]
    assert ids == sorted(ids) and len(ids) == len(set(ids))
    assert ids[:3000] == list(range(1, 3001))  # every row present at the start is there once


async def raw_get(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def wait_idle(pool: asyncpg.Pool, timeout: float = 10.0) -> None:
    released = "the export's connection to be released"
    await until(lambda: pool.get_size() == pool.get_idle_size(), released, timeout)


@pytest.mark.parametrize("fmt", ["ndjson", "csv"])
async def test_disconnect_mid_export_releases_the_connection(client: Any, cfg: Any, fmt: str) -> None:
    await seed(cfg, [(f"D{i}", f"d{i}@example.com") for i in range(20000)])
    reader, writer = await raw_get(client.port, f"/users/export?format={fmt}")
    await reader.readexactly(4096)  # the stream has started
    writer.transport.abort()  # the client goes away mid-stream
    await wait_idle(client.app[DB].pool)
    assert (await client.get("/users?limit=1")).status == 200  # the pool still works


async def test_stalled_client_is_dropped(
    aiohttp_client: Any, cfg: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="hotpath.streaming")
    app = create_app(replace(cfg, streaming={"write_timeout": 0.3}))
    client = await aiohttp_client(app)
    sock = socket.create_connection(("127.0.0.1", client.port))
    sock.sendall(b"GET /stream-json/1000000 HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        sock.setblocking(False)
        # read nothing until the server gives up on us (its one debug line), then drain:
        # what was already in flight arrives, then EOF or a reset, not the whole body
        await until(
            lambda: any("ended early: _Stalled" in r.getMessage() for r in caplog.records),
            "the server to drop the stalled stream",
            timeout=15,
        )
        received = 0
        while True:
            assert loop.time() < deadline, "the stalled stream was never dropped"
            try:
                data = await loop.sock_recv(sock, 65536)
            except ConnectionResetError:
                break
            if not data:
                break
            received += len(data)
        assert received < 90_000_000  # it did not send the whole 90 MB body
    finally:
        sock.close()


# ---------------------------------------------------------------- failures after prepare()


async def raw_exchange(port: int, request: bytes, timeout: float = 30.0) -> bytes:
    """Send one raw HTTP/1.1 request (keep-alive: the client does not ask for a close) and read
    until the server closes the connection. A server that keeps it open fails the wait."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        received = bytearray()

        async def drain() -> None:
            while True:
                try:
                    data = await reader.read(65536)
                except ConnectionResetError:
                    return
                if not data:
                    return
                received.extend(data)

        await asyncio.wait_for(drain(), timeout)  # a bound for a hung server, not a timing claim
        return bytes(received)
    finally:
        writer.close()


def assert_aborted(raw: bytes, rid: str, caplog: pytest.LogCaptureFixture) -> None:
    """One response only, whose chunked body was cut off, and the failure logged with its id."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep and head.startswith(b"HTTP/1.1 200 "), raw[:300]
    assert b"transfer-encoding: chunked" in head.lower()
    assert body, "the stream had started: some of its body arrived"
    assert b"HTTP/1.1" not in body and b"problem+json" not in body  # no second response inside
    assert not body.endswith(b"0\r\n\r\n")  # never a clean end of the chunked body
    logged = [r for r in caplog.records if rid in r.getMessage() and "connection aborted" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]


def get(path: str, rid: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-ID: {rid}\r\n\r\n".encode()


def failing_chunks(chunks: list[bytes]) -> Any:
    async def gen(*args: Any, **kwargs: Any) -> Any:
        for chunk in chunks:
            yield chunk
        raise RuntimeError("injected failure after the stream began")

    return gen


def failing_sync_chunks(chunks: list[bytes]) -> Any:
    def gen(*args: Any, **kwargs: Any) -> Any:
        yield from chunks
        raise RuntimeError("injected failure after the stream began")

    return gen


async def failing_csv(conn: Any, since: Any, write: Any, **kwargs: Any) -> None:
    await write(b"id,name,email,created_at,updated_at\r\n")
    await write(b"1,A,a@example.com,2026-01-01,2026-01-01\r\n")
    raise RuntimeError("injected failure after the stream began")


async def failing_pump(sub: Any, resp: Any, timeout: float) -> None:
    raise RuntimeError("injected failure after the stream began")


async def huge_then_unencodable(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    big = "x" * (300 * 1024)  # past the size at which /process-urls streams
    return [{"url": "http://a.test/", "bytes": len(big), "data": big}, {"url": "b", "data": object()}]


JSON_PARTS = failing_chunks([b"[", b'{"id":1}'])
FAILURES = [  # name, what is patched, with what, the route
    ("export-json", "server.records.export_json_lines", JSON_PARTS, "/users/export"),
    ("export-ndjson", "server.records.export_json_lines", JSON_PARTS, "/users/export?format=ndjson"),
    ("export-csv", "server.records.export_csv", failing_csv, "/users/export?format=csv"),
    ("stream-json", "server.records.synthetic_json", failing_sync_chunks([b"[", b"{}"]), "/stream-json/5"),
    (
        "stream-csv",
        "server.records.synthetic_csv",
        failing_sync_chunks([b"id\r\n", b"1\r\n"]),
        "/stream-csv/5",
    ),
    ("events", "handlers.feed._pump", failing_pump, "/events?channels=users"),
]


@pytest.mark.parametrize(("name", "target", "replacement", "path"), FAILURES, ids=[f[0] for f in FAILURES])
async def test_failure_after_prepare_aborts_the_connection(
    client: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    name: str,
    target: str,
    replacement: Any,
    path: str,
) -> None:
    monkeypatch.setattr(target, replacement)
    caplog.set_level(logging.WARNING)
    rid = f"abort-{name}"
    assert_aborted(await raw_exchange(client.port, get(path, rid)), rid, caplog)
    assert (await client.get("/health")).status == 200  # the server itself carries on


async def test_process_urls_failing_mid_stream_aborts_the_connection(
    client: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("handlers.fetch.fetch_all_cached", huge_then_unencodable)
    caplog.set_level(logging.WARNING)
    body = b'["http://a.test/", "http://b.test/"]'
    request = (
        b"POST /process-urls HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-ID: abort-fetch\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    assert_aborted(await raw_exchange(client.port, request), "abort-fetch", caplog)


async def test_export_whose_database_connection_dies_mid_stream_is_cut_off(
    client: Any, cfg: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """No patching: the export's PostgreSQL backend is terminated while the client is reading."""
    caplog.set_level(logging.WARNING)
    admin = await asyncpg.connect(cfg.database.url)
    try:
        await admin.execute(  # ~25 MB of NDJSON: far more than the socket buffers hold
            "INSERT INTO users (name, email) "
            "SELECT 'User ' || g, 'user' || g || '@example.com' FROM generate_series(1, 200000) g"
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(get("/users/export?format=ndjson", "abort-terminated"))
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        await reader.readexactly(4096)  # the stream is under way; now the client stops reading

        async def export_backend() -> Any:
            return await admin.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND query LIKE '%row_to_json%'"
            )

        pid = await until(export_backend, "the export's backend")
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        received = bytearray()

        async def drain() -> None:
            while data := await reader.read(65536):
                received.extend(data)

        await asyncio.wait_for(drain(), 60)  # the server must close the connection
        writer.close()
    finally:
        await admin.close()
    assert b"HTTP/1.1" not in received
    assert not received.endswith(b"0\r\n\r\n")
    lines = received.split(b"\r\n")
    assert len(lines) < 200000  # cut off, not complete
    logged = [r for r in caplog.records if "abort-terminated" in r.getMessage()]
    assert len(logged) == 1 and "connection aborted" in logged[0].getMessage()
    await wait_idle(client.app[DB].pool)
    assert (await client.get("/users?limit=1")).status == 200  # the pool replaced the connection
