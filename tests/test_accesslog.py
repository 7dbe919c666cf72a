"""The JSON access log: one parseable line per request with what an operator needs."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from server.accesslog import BufferedLineHandler, JsonAccessLogger
from server.app import create_app


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

    from tests.conftest import PYTHON, ROOT

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
