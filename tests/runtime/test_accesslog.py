"""The JSON access log: one parseable line per request with what an operator needs."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from server.access import ACCESS
from server.access.guard import STREAM_COOKIE
from server.app import create_app
from server.runtime.accesslog import BufferedLineHandler, JsonAccessLogger
from tests.helpers import replace, until


async def test_one_json_line_per_request(
    aiohttp_client: Any, cfg: Any, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("hotpath.access")
    caplog.set_level(logging.INFO, logger="hotpath.access")  # before the server checks `enabled`
    server = TestServer(create_app(cfg))
    await server.start_server(access_log=logger, access_log_class=JsonAccessLogger)
    client = await aiohttp_client(server)
    await client.get("/health", headers={"X-Request-ID": "trace-9"})
    await client.get("/users/12345")
    await client.get("/no/such/path")
    await client.close()  # the last line is written once its response is done
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "hotpath.access"]
    assert [(x["route"], x["status"]) for x in lines] == [("health", 200), ("user", 404), ("unmatched", 404)]
    first = lines[0]
    assert first["rid"] == "trace-9" and first["method"] == "GET" and first["path"] == "/health"
    assert first["bytes"] > 0 and first["ms"] >= 0 and first["remote"] == "127.0.0.1"
    assert all(x["rid"] for x in lines)


async def test_stream_tokens_are_never_logged(
    aiohttp_client: Any, cfg: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream token travels in an event stream's query string (?token=, what EventSource can
    send) or a cookie: the line names the path alone."""
    caplog.set_level(logging.INFO, logger="hotpath.access")
    server = TestServer(create_app(replace(cfg, auth={"open_routes": ()})))
    await server.start_server(
        access_log=logging.getLogger("hotpath.access"), access_log_class=JsonAccessLogger
    )
    client = await aiohttp_client(server)
    access = client.app[ACCESS]
    record, key = await access.store.create("test", "access log", ["users:read"])
    await access.changed(record.id)
    resp = await client.post(
        "/feed/tokens", json={"channels": ["users"]}, headers={"Authorization": f"Bearer {key}"}
    )
    token = (await resp.json())["token"]
    assert (await client.get("/events", params={"token": token + "x", "channels": "users"})).status == 401
    assert (await client.get("/events", cookies={STREAM_COOKIE: token + "y"})).status == 401
    stream = await client.get("/events", params={"token": token})
    assert stream.status == 200
    await access.store.revoke("test", record.id)
    await access.changed(record.id)  # which ends the stream: its line is written
    assert b"event: revoked" in await stream.read()

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "hotpath.access"]

    lines = await until(lambda: len(logged()) == 4 and logged(), "four lines")
    assert not [line for line in lines if token in line or key in line or "hps_" in line]
    assert [json.loads(line)["path"] for line in lines] == ["/feed/tokens", "/events", "/events", "/events"]
    assert [json.loads(line)["status"] for line in lines] == [201, 401, 401, 200]


def test_buffered_handler_writes_every_line_by_close(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        handler = BufferedLineHandler(fd, interval=60)  # no periodic flush during the test
        handler.setFormatter(logging.Formatter("%(message)s"))
        for i in range(1000):
            handler.write_line(b'{"n":%d}' % i)
        handler.emit(logging.makeLogRecord({"msg": "a record", "levelno": logging.INFO}))
        handler.close()
    finally:
        os.close(fd)
    lines = path.read_text().splitlines()
    assert [json.loads(x)["n"] for x in lines[:1000]] == list(range(1000))
    assert lines[1000] == "a record"


def test_json_application_log_lines_parse(tmp_path: Path) -> None:
    import subprocess

    from tests.helpers import PYTHON, ROOT

    env = {**os.environ, "HOTPATH_LOG_FORMAT": "json"}
    proc = subprocess.run(
        [PYTHON, "run.py", "--port", "70000"], cwd=ROOT, env=env, capture_output=True, timeout=60
    )
    # a config error is reported before logging is configured: one plain line, exit 2
    assert proc.returncode == 2
    assert proc.stderr.decode().startswith("hotpath: configuration error: server.port")
    env = {**os.environ, "HOTPATH_LOG_FORMAT": "json", "DATABASE_URL": "postgresql://127.0.0.1:1/x"}
    env["REDIS_URL"], env["HOTPATH_DATABASE_START_TIMEOUT"] = "redis://127.0.0.1:1/0", "0.2"
    proc = subprocess.run(
        [PYTHON, "run.py", "--workers", "1"], cwd=ROOT, env=env, capture_output=True, timeout=60
    )
    assert proc.returncode == 1
    lines = [json.loads(line) for line in proc.stderr.decode().splitlines()]
    assert lines and all({"ts", "level", "logger", "pid", "msg"} <= line.keys() for line in lines)
    assert any(line["level"] == "ERROR" and "127.0.0.1:1" in line["msg"] for line in lines)


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"G\x00T / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /health HTTP/1.1\r\nBad Header\r\n\r\n",
    ],
)
async def test_a_malformed_request_logs_one_line_and_no_traceback(
    cfg: Any, caplog: pytest.LogCaptureFixture, raw: bytes
) -> None:
    import asyncio

    logger = logging.getLogger("hotpath.access")
    caplog.set_level(logging.INFO)
    server = TestServer(create_app(cfg))
    await server.start_server(access_log=logger, access_log_class=JsonAccessLogger)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(raw)
        answer = await reader.read()  # aiohttp answers 400 and closes
        writer.close()
        assert answer.split(b" ", 2)[1] == b"400", answer[:100]
    finally:
        await server.close()
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "hotpath.access"]
    assert [x["status"] for x in lines] == [400]
    assert lines[0]["route"] is None
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    refused = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(refused) <= 1 and all(r.levelno == logging.INFO for r in refused)


def test_malformed_request_lines_are_one_a_second() -> None:
    from aiohttp.http_exceptions import BadHttpMessage

    from server.runtime.logs import MalformedRequestFilter

    f = MalformedRequestFilter(interval=1.0)

    def record(at: float, exc: BaseException) -> logging.LogRecord:
        r = logging.LogRecord(
            "aiohttp.server",
            logging.ERROR,
            "x",
            1,
            "Error handling request from %s",
            ("1.2.3.4",),
            (type(exc), exc, None),
        )
        r.created = at
        return r

    first = record(100.0, BadHttpMessage("bad\nheader"))
    assert f.filter(first) and first.levelno == logging.INFO and first.exc_info is None
    assert first.getMessage() == "refused a malformed request from 1.2.3.4 with 400: bad header"
    assert not any(f.filter(record(100.0 + i / 10, BadHttpMessage("x"))) for i in range(1, 9))
    later = record(101.5, BadHttpMessage("y"))
    assert f.filter(later) and later.getMessage().endswith("y (+8 more since the last line)")
    other = record(101.6, ValueError("a real bug"))
    assert f.filter(other) and other.exc_info is not None and other.levelno == logging.ERROR


def test_malformed_request_lines_never_log_credentials() -> None:
    """aiohttp quotes the start of a line it refuses (a URL or a header beyond 8 KiB): a stream
    token in an over-long event-stream URL, or a key in an over-long header, reached the log."""
    from aiohttp.http_exceptions import LineTooLong

    from server.runtime.logs import MalformedRequestFilter

    key = "hp_0123456789ab_" + "S" * 43
    stream = "hps_eyJrIjogMX0.c2lnbmF0dXJl"
    for line in (
        f"/events?channels=users&token={stream}&x=" + "a" * 100,
        f"Bearer {key}" + " " * 100,
        f"bearer metrics-token-{'s' * 20}",
        f"hotpath_stream={stream}; other=1",
        key,
    ):
        exc = LineTooLong(line[:100] + "...", "8190")
        r = logging.LogRecord(
            "aiohttp.server", logging.ERROR, "x", 1, "Error handling request from %s", ("1.2.3.4",),
            (type(exc), exc, None),
        )  # fmt: skip
        assert MalformedRequestFilter().filter(r)
        message = r.getMessage()
        assert "Got more than 8190 bytes" in message and "***" in message, message
        for secret in (key[16:], "S" * 10, stream[4:], "metrics-token"):
            assert secret not in message, message
