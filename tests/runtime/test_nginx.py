"""deploy/nginx.conf run by a real nginx in front of a real multi-worker hotpath."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from server.config import Config
from tests.helpers import PYTHON, ROOT, free_port, require_program

DEPLOY = ROOT / "deploy"
TOKEN = "nginx-test-token"


@dataclass
class Stack:
    direct: str  # hotpath itself
    proxied: str  # through nginx, HTTP
    tls: str  # through nginx, HTTPS + HTTP/2
    access_log: Path  # nginx's


def deploy_config(tmp: Path, hotpath_port: int, http_port: int, tls_port: int) -> Path:
    """deploy/nginx.conf with only addresses and paths changed, wrapped in a minimal main config."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    text = (DEPLOY / "nginx.conf").read_text()
    for old, new in (
        ("server 127.0.0.1:8080;", f"server 127.0.0.1:{hotpath_port};"),
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen [::]:80;", ""),
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{tls_port} ssl http2;"),
        ("listen [::]:443 ssl http2;", ""),
        ("/etc/ssl/hotpath/fullchain.pem", str(tmp / "cert.pem")),
        ("/etc/ssl/hotpath/privkey.pem", str(tmp / "key.pem")),
        ("/etc/nginx/snippets/hotpath-locations.conf", str(DEPLOY / "hotpath-locations.conf")),
        ("/var/log/nginx/hotpath.access.log", str(tmp / "access.log")),
    ):
        assert old in text, f"deploy/nginx.conf no longer has {old!r}: update this test"
        text = text.replace(old, new)
    (tmp / "hotpath.conf").write_text(text)
    temp = "\n".join(
        f"{kind}_temp_path {tmp}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = tmp / "nginx.conf"
    main.write_text(
        f"{'user root;' if os.geteuid() == 0 else ''}\n"
        f"daemon off;\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log warn;\nworker_processes 1;\n"
        f"events {{ worker_connections 1024; }}\n"
        f"http {{\naccess_log off;\n{temp}\ninclude {tmp}/hotpath.conf;\n}}\n"
    )
    return main


def wait_until_ready(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert all(p.poll() is None for p in procs), "hotpath or nginx exited"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer 200"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def stack(base_config: Config, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    nginx = require_program("/usr/sbin/nginx", "nginx")
    tmp = tmp_path_factory.mktemp("nginx")
    hot_port, http_port, tls_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "DATABASE_URL": base_config.database.url,
        "REDIS_URL": base_config.redis.url,
        "HOTPATH_RATELIMIT_POLICIES": '{ protected = "3/minute" }',
        "HOTPATH_FEED_ADMIN_TOKEN": TOKEN,
    }
    main = deploy_config(tmp, hot_port, http_port, tls_port)
    check = subprocess.run([nginx, "-t", "-c", str(main)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    with (tmp / "hotpath.log").open("wb") as log:
        hot = subprocess.Popen(
            [PYTHON, "run.py", "--port", str(hot_port), "--workers", "2"], cwd=ROOT, env=env, stderr=log
        )
    proxy = subprocess.Popen([nginx, "-c", str(main)], stderr=subprocess.DEVNULL)
    stack = Stack(
        f"http://127.0.0.1:{hot_port}",
        f"http://127.0.0.1:{http_port}",
        f"https://127.0.0.1:{tls_port}",
        tmp / "access.log",
    )
    try:
        wait_until_ready(stack.proxied + "/ready", [hot, proxy])
        yield stack
    finally:
        for proc, sig in ((proxy, signal.SIGQUIT), (hot, signal.SIGTERM)):
            if proc.poll() is None:
                proc.send_signal(sig)
                proc.wait(30)


async def test_api_through_the_proxy(stack: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            stack.proxied + "/users", json={"name": "Via Nginx", "email": "via@nginx.example"}
        ) as r:
            assert r.status == 201
            location = r.headers["Location"]
            # nginx's $request_id travels to hotpath and back, so both logs share it
            assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-ID"])
        async with session.get(stack.proxied + location) as r:
            assert r.status == 200
            assert (await r.json())["email"] == "via@nginx.example"
        async with session.get(stack.proxied + "/no/such/path") as r:
            assert r.status == 404 and r.headers["Content-Type"] == "application/problem+json"


async def test_access_log_masks_stream_tokens(stack: Stack) -> None:
    """A stream token in an event stream's URL (what EventSource sends) never reaches nginx's
    log; the rest of the request line does."""
    secret = "hps_e30.c2VjcmV0LXNpZ25hdHVyZQ"
    async with aiohttp.ClientSession() as session:
        for query in (
            f"token={secret}",
            f"channels=ticker&token={secret}&last_event_id=1-0",
            f"token={secret}&token=x",  # hotpath reads the first
            f"%74oken={secret}",  # hotpath decodes it as token
            f"TOKEN=x&token={secret}",
        ):
            async with session.get(f"{stack.proxied}/events?{query}") as r:
                assert r.status in (400, 401), query  # not a token this deployment signed
        async with session.get(f"{stack.proxied}/products?page=1") as r:
            assert r.status == 200
    logged = stack.access_log.read_text()
    assert secret not in logged
    assert logged.count('"GET /events?- HTTP/1.1"') == 5
    assert '"GET /products?page=1 HTTP/1.1" 200' in logged  # other queries are kept


async def test_rate_limit_counts_the_real_client_not_the_proxy(stack: Stack) -> None:
    """Clients on 127.0.0.2 and 127.0.0.3 reach nginx; hotpath only sees nginx (127.0.0.1)
    but believes its X-Forwarded-For, so each client has limits of its own."""

    async def statuses(source: str, n: int) -> list[int]:
        connector = aiohttp.TCPConnector(local_addr=(source, 0))
        async with aiohttp.ClientSession(connector=connector) as session:
            out = []
            for _ in range(n):
                async with session.get(stack.proxied + "/protected-endpoint") as r:
                    out.append(r.status)
            return out

    assert await statuses("127.0.0.2", 4) == [200, 200, 200, 429]
    assert await statuses("127.0.0.3", 1) == [200]


async def test_large_streamed_export_passes_intact(stack: Stack) -> None:
    async def digest(base: str) -> tuple[str, int]:
        h, size = hashlib.sha256(), 0
        async with aiohttp.ClientSession() as session, session.get(base + "/stream-csv/300000") as r:
            assert r.status == 200
            async for chunk in r.content.iter_chunked(1 << 16):
                h.update(chunk)
                size += len(chunk)
        return h.hexdigest(), size

    direct, proxied = await asyncio.gather(digest(stack.direct), digest(stack.proxied))
    assert proxied == direct and direct[1] > 10_000_000


async def test_metrics_are_not_served_through_the_proxy(stack: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(stack.proxied + "/metrics") as r:
            assert r.status == 403
        async with session.get(stack.direct + "/metrics") as r:
            assert r.status == 200


async def test_oversized_body_is_refused_by_nginx_as_a_problem(stack: Stack) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(stack.proxied + "/users", data=io.BytesIO(b"x" * (2 << 20))) as r,
    ):
        assert r.status == 413
        assert r.headers["Content-Type"] == "application/problem+json"
        assert (await r.json())["status"] == 413
        # a bulk import may be bigger (jobs.bulk_max_size): nginx passes it, hotpath reads it
        rows = b"name,email\n" + b"".join(b"User %06d,u%d@example.com\n" % (i, i) for i in range(45_000))
        assert 1 << 20 < len(rows) < 2 << 20
        async with session.post(
            stack.proxied + "/bulk-process", data=io.BytesIO(rows), headers={"Content-Type": "text/csv"}
        ) as bulk:
            assert bulk.status == 413  # more rows than jobs.bulk_max_rows: hotpath's answer, not nginx's
            assert "jobs.bulk_max_rows" in (await bulk.json())["detail"]


def test_tls_server_speaks_http2(stack: Stack) -> None:
    curl = require_program("/usr/bin/curl", "curl")
    out = subprocess.run(
        [
            curl,
            "-sk",
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
            f"{stack.tls}/health",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.stdout == "2 200", out.stderr


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = require_program("/usr/bin/systemd-analyze", "systemd")
    unit = (DEPLOY / "hotpath.service").read_text()
    assert "/opt/hotpath/.venv/bin/python" in unit
    unit = unit.replace("/opt/hotpath/.venv/bin/python", PYTHON).replace("/opt/hotpath", str(ROOT))
    path = tmp_path / "hotpath.service"
    path.write_text(unit)
    out = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


async def test_events_pass_through_unbuffered(stack: Stack) -> None:
    """Each event published (straight to hotpath) reaches a client reading through nginx within
    100 ms: nothing sits in a proxy buffer waiting for more."""
    async with aiohttp.ClientSession() as session:
        stream = await session.get(stack.proxied + "/events?channels=users")
        assert stream.status == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        assert "Content-Encoding" not in stream.headers or stream.headers["Content-Encoding"] == "identity"
        await stream.content.readuntil(b"\n\n")  # the opening retry: frame
        delays = []
        for i in range(5):
            started = time.monotonic()
            async with session.post(
                stack.direct + "/events",
                json={"channel": "users", "event": "probe", "data": {"i": i}},
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as r:
                assert r.status == 201
            frame = b""
            while b"event: probe" not in frame:  # skip heartbeats
                frame = await asyncio.wait_for(stream.content.readuntil(b"\n\n"), 5)
            delays.append(time.monotonic() - started)
            assert b'"i":%d' % i in frame
        stream.close()
    assert max(delays) < 0.1, delays
