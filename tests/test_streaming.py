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

from server import streaming
from server.app import create_app
from server.keys import DB
from tests.conftest import replace, until


def expected_records(n: int) -> list[dict[str, Any]]:
    return [streaming.synthetic_record(i) for i in range(1, n + 1)]


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
