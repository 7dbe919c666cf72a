"""Slow clients and the connection cap, through a real `run.py`: a head or body that trickles in
is cut (408), an idle keep-alive connection is closed, a worker at server.max_connections leaves
new connections to the others, and when every worker is full a new client gets a 503."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import time
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from server.config import Config, ConfigError, ServerConfig, load_config
from server.runtime.site import DEFAULT_CAP, FD_OTHERS, connection_cap
from server.runtime.supervisor import Board
from tests.helpers import PYTHON, ROOT, free_port, until

pytestmark = pytest.mark.slow

SHORT = 0.5  # the head and body timeouts of the servers below, in seconds
BOUND = 8.0  # "cut within a generous bound"


@dataclass
class Server:
    port: int
    log: Path
    socks: list[socket.socket]

    def lines(self, text: str) -> int:
        return self.log.read_text().count(text)

    async def connect(self) -> socket.socket:
        sock = socket.socket()
        self.socks.append(sock)  # closed when the server stops, if the test has not
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        return sock


@contextlib.asynccontextmanager
async def run_py(
    base_config: Config, tmp_path: Path, workers: int, **server: object
) -> AsyncIterator[Server]:
    """`run.py --workers N` with HOTPATH_SERVER_<KEY> overrides, until it listens; SIGTERM after."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": base_config.database.url,
        "REDIS_URL": base_config.redis.url,
        **{f"HOTPATH_SERVER_{key.upper()}": str(value) for key, value in server.items()},
    }
    log = tmp_path / f"run-{port}.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "run.py", "--port", str(port), "--workers", str(workers),
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=out,
        )  # fmt: skip
    ready = f"{workers} workers listening" if workers > 1 else "hotpath listening on"
    srv = Server(port, log, [])
    try:
        await until(lambda: ready in log.read_text() or proc.returncode is not None, "run.py listening")
        assert proc.returncode is None, log.read_text()
        yield srv
    finally:
        for sock in srv.socks:
            sock.close()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30)


# ------------------------------------------------------------------ raw HTTP over a socket


async def send(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)


async def until_closed(sock: socket.socket, timeout: float = BOUND) -> bytes:
    """Everything the server sends until it closes the connection (FIN or reset)."""
    loop = asyncio.get_running_loop()
    chunks: list[bytes] = []
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await loop.sock_recv(sock, 65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


async def response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response on a connection that stays open: (status, headers, body)."""
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(BOUND):
        while b"\r\n\r\n" not in data:
            chunk = await loop.sock_recv(sock, 65536)
            assert chunk, f"connection closed after {data!r}"
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        while len(body) < int(headers.get("content-length", "0")):
            chunk = await loop.sock_recv(sock, 65536)
            assert chunk, "connection closed mid-body"
            body += chunk
    return int(lines[0].split()[1]), headers, body


def parse(raw: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    """A whole response read to the close: (status, headers, JSON body)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, orjson.loads(body)


async def drip(sock: socket.socket, data: bytes, interval: float = 0.1) -> None:
    """Send `data` one byte at a time, until done or the server hangs up."""
    with contextlib.suppress(OSError):
        for i in range(len(data)):
            await send(sock, data[i : i + 1])
            await asyncio.sleep(interval)


GET_READY = b"GET /ready HTTP/1.1\r\nHost: t\r\n\r\n"


# ------------------------------------------------------------------ timeouts


async def test_a_slow_head_is_cut_with_408_and_a_silent_connection_is_closed(
    base_config: Config, tmp_path: Path
) -> None:
    async with run_py(base_config, tmp_path, 1, client_header_timeout=SHORT) as srv:
        # A head dripped one byte per 0.1 s would take 10 s: the connection is cut long before.
        slow = await srv.connect()
        head = b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"x" * 100 + b"\r\n\r\n"
        dripping = asyncio.create_task(drip(slow, head))
        started = time.monotonic()
        raw = await until_closed(slow)
        assert not dripping.done(), "the whole head went out: it was not cut"
        dripping.cancel()
        status, headers, doc = parse(raw)
        assert (status, headers["connection"], headers["content-type"]) == (
            408, "close", "application/problem+json"
        )  # fmt: skip
        assert doc["status"] == 408 and "client_header_timeout" in str(doc["detail"])
        assert time.monotonic() - started < BOUND

        # Connected but never a byte: closed, with nothing to answer.
        silent = await srv.connect()
        assert await until_closed(silent) == b""


async def test_the_head_deadline_starts_at_the_first_byte_of_a_request_not_while_idle(
    base_config: Config, tmp_path: Path
) -> None:
    async with run_py(base_config, tmp_path, 1, client_header_timeout=SHORT, keepalive_timeout=30) as srv:
        sock = await srv.connect()
        await send(sock, GET_READY)
        assert (await response(sock))[0] == 200
        await asyncio.sleep(SHORT * 3)  # idle between requests: keepalive_timeout's business
        await send(sock, GET_READY)
        assert (await response(sock))[0] == 200  # still open
        await send(sock, b"GET /ready HTTP/1.1\r\n")  # ... but a head begun must complete
        assert parse(await until_closed(sock))[0] == 408


async def test_a_slow_body_gets_408_from_the_handler_and_the_connection_closes(
    base_config: Config, tmp_path: Path
) -> None:
    async with run_py(base_config, tmp_path, 1, client_body_timeout=SHORT) as srv:
        body = orjson.dumps({"name": "Slow " * 20, "email": "slow@example.com"})
        head = (
            b"POST /users HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        sock = await srv.connect()
        await send(sock, head)
        dripping = asyncio.create_task(drip(sock, body))  # would take 25 s
        raw = await until_closed(sock)
        assert not dripping.done()
        dripping.cancel()
        status, headers, doc = parse(raw)
        assert (status, headers["connection"], headers["content-type"]) == (
            408, "close", "application/problem+json"
        )  # fmt: skip
        assert doc["type"] == "/problems/request-timeout"
        assert "client_body_timeout" in str(doc["detail"])

        # A body that arrives in time is served as before.
        sock = await srv.connect()
        await send(sock, head + body)
        status, _, created = await response(sock)
        assert status == 201, created


async def test_an_idle_keepalive_connection_is_closed(base_config: Config, tmp_path: Path) -> None:
    async with run_py(base_config, tmp_path, 1, keepalive_timeout=SHORT) as srv:
        sock = await srv.connect()
        await send(sock, GET_READY)
        assert (await response(sock))[0] == 200
        assert await until_closed(sock) == b""  # closed by the server, nothing more said


def test_deploy_nginx_closes_idle_upstream_connections_before_hotpath_does() -> None:
    """nginx must not reuse an upstream connection hotpath has closed: a POST on it is a 502."""
    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    upstream = re.search(r"upstream hotpath \{(.*?)\n\}", nginx, re.S)
    assert upstream is not None
    found = re.search(r"^\s*keepalive_timeout (\d+)s;", upstream.group(1), re.M)
    assert found is not None, "deploy/nginx.conf's upstream sets no keepalive_timeout"
    nginx_idle = int(found.group(1))
    shipped = tomllib.loads((ROOT / "config.toml").read_text())["server"]["keepalive_timeout"]
    assert nginx_idle < shipped
    assert nginx_idle < ServerConfig().keepalive_timeout
    # The client-side limits nginx applies are spelled out in the locations file.
    locations = (ROOT / "deploy" / "hotpath-locations.conf").read_text()
    for directive in ("client_header_timeout", "client_body_timeout", "send_timeout", "keepalive_timeout"):
        assert re.search(rf"^{directive} \d+s;", locations, re.M), directive


def test_timeouts_and_cap_are_validated() -> None:
    for key, bad in (("client_header_timeout", 0), ("client_body_timeout", -1), ("max_connections", -5)):
        with pytest.raises(ConfigError, match=f"server.{key}"):
            load_config(env={f"HOTPATH_SERVER_{key.upper()}": str(bad)})


# ------------------------------------------------------------------ the connection cap


def test_the_default_cap_is_sized_from_the_open_files_limit() -> None:
    import resource

    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit == resource.RLIM_INFINITY:
        pytest.skip("no open-files limit to size from")
    config = load_config(env={})
    others = FD_OTHERS + config.database.max_size + config.redis.max_connections + config.fetch.concurrency
    assert connection_cap(config) == max(1, min(DEFAULT_CAP, limit - others))
    small = load_config(env={"HOTPATH_SERVER_MAX_CONNECTIONS": "5"})
    assert connection_cap(small) == 5
    huge = load_config(env={"HOTPATH_SERVER_MAX_CONNECTIONS": str(limit + 1000)})
    assert connection_cap(huge) == max(1, limit - others)  # what the descriptors allow


def test_the_board_says_everyone_is_full_to_exactly_the_last_to_fill() -> None:
    fd = Board.create(2)
    try:
        a, b = Board(fd, 0), Board(fd, 1)
        assert a.mark(True) is False  # b still has room
        assert b.mark(True) is True
        assert a.everyone_full()
        assert a.mark(False) is False and not b.everyone_full()
        a.close()
        b.close()
    finally:
        os.close(fd)


async def hold(srv: Server) -> tuple[socket.socket, int]:
    """A connection that asked /ready once and stays open: (socket, pid of its worker)."""
    sock = await srv.connect()
    await send(sock, GET_READY)
    status, _, body = await response(sock)
    assert status == 200, body
    return sock, int(orjson.loads(body)["pid"])


async def refused(srv: Server) -> tuple[int, dict[str, str], dict[str, object]]:
    sock = await srv.connect()
    with contextlib.suppress(OSError):  # the answer may come (and the FIN) before we ask
        await send(sock, GET_READY)
    raw = await until_closed(sock)
    sock.close()
    return parse(raw)


async def test_a_full_worker_leaves_new_connections_to_the_other_and_503_when_both_are_full(
    base_config: Config, tmp_path: Path
) -> None:
    async with run_py(base_config, tmp_path, 2, max_connections=5) as srv:
        held = [await hold(srv) for _ in range(10)]
        per_worker: dict[int, int] = {}
        for _, pid in held:
            per_worker[pid] = per_worker.get(pid, 0) + 1
        assert sorted(per_worker.values()) == [5, 5]  # the first to fill stopped accepting

        # Both full: a new client is told so, and why, and when to come back.
        status, headers, doc = await refused(srv)
        assert (status, headers["retry-after"], headers["content-type"]) == (
            503, "1", "application/problem+json"
        )  # fmt: skip
        assert doc["status"] == 503 and "server.max_connections" in str(doc["detail"])
        # ... while the connections already open are served as usual.
        sock, pid = held[0]
        await send(sock, GET_READY)
        assert (await response(sock))[0] == 200

        # Many refusals make few log lines (at most one per second and worker).
        started = time.monotonic()
        for _ in range(20):
            assert (await refused(srv))[0] == 503
        seconds = time.monotonic() - started
        assert srv.lines("connection cap reached") <= 2 * (seconds + 3)

        # One connection closes: service resumes.
        sock.close()

        async def served() -> int | None:
            try:
                fresh, fresh_pid = await hold(srv)
            except AssertionError:  # still a 503: the worker has not seen the close yet
                return None
            fresh.close()
            return fresh_pid

        assert await until(served, "a new connection served after one closed") in per_worker


async def test_one_worker_without_a_supervisor_applies_the_same_cap(
    base_config: Config, tmp_path: Path
) -> None:
    async with run_py(base_config, tmp_path, 1, max_connections=3) as srv:
        held = [await hold(srv) for _ in range(3)]
        status, headers, _ = await refused(srv)
        assert (status, headers["retry-after"]) == (503, "1")
        assert "connection cap reached" in srv.log.read_text()
        held.pop()[0].close()

        async def served() -> bool:
            try:
                sock, _ = await hold(srv)
            except AssertionError:
                return False
            held.append((sock, 0))
            return True

        await until(served, "a new connection served after one closed")
        assert (await refused(srv))[0] == 503  # full again


# ------------------------------------------------------------------ requests the parser refuses


async def test_a_malformed_request_gets_a_problem_and_one_log_line(
    base_config: Config, tmp_path: Path
) -> None:
    """aiohttp answers what its parser refuses itself; through run.py that answer is a problem
    document too, the connection closes, and the log holds one line, no traceback."""
    async with run_py(base_config, tmp_path, 1, access_log="true") as srv:
        for raw in (
            b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
            b"GET /health HTTP/1.1\r\nBad Header\r\n\r\n",
            b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n\r\n",
        ):
            sock = await srv.connect()
            await send(sock, raw)
            answer = await until_closed(sock)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.split(b" ", 2)[1] in (b"400", b"414", b"431"), head
            assert b"Content-Type: application/problem+json" in head
            doc = orjson.loads(body)
            assert doc["status"] == int(head.split(b" ", 2)[1]) and doc["detail"]
        await until(lambda: srv.lines('"status":400') >= 1, "the access log line")
    text = srv.log.read_text()
    assert "Traceback" not in text and "refused a malformed request" in text


async def test_compressed_bodies_are_decoded_by_their_reader_under_run_py(
    base_config: Config, tmp_path: Path
) -> None:
    """run.py's protocol gets the app's handler_args (auto_decompress off): a gzip body is
    decoded once, by the reader that stops at the route's limit, and a bomb is refused."""
    import gzip

    import aiohttp

    async with run_py(base_config, tmp_path, 1) as srv:
        base = f"http://127.0.0.1:{srv.port}"
        async with aiohttp.ClientSession() as session:
            body = gzip.compress(orjson.dumps({"name": "Gz", "email": "gz@example.com"}))
            headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
            async with session.post(base + "/users", data=body, headers=headers) as resp:
                assert resp.status in (201, 409), await resp.text()
            bomb = gzip.compress(b"[" + b" " * (64 * 1024 * 1024) + b"]", compresslevel=9)
            async with session.post(base + "/users", data=bomb, headers=headers) as resp:
                assert resp.status == 413, await resp.text()
                assert resp.content_type == "application/problem+json"
            async with session.get(base + "/health") as resp:
                assert resp.status == 200
    assert "Traceback" not in srv.log.read_text()


async def test_a_client_that_reads_nothing_is_cut_after_the_send_timeout(
    base_config: Config, tmp_path: Path
) -> None:
    """Pipelined requests whose answers are never read held their connection (and with it a
    place under the connection cap) for as long as the client liked."""
    async with run_py(base_config, tmp_path, 1, send_timeout=SHORT) as srv:
        sock = socket.socket()
        srv.socks.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", srv.port))
        await send(sock, b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 200)
        await until(lambda: srv.lines("server.send_timeout") >= 1, "the send timeout", timeout=BOUND)
        # what the kernel still held arrives, then the connection is gone
        await until_closed(sock)


# server/runtime/protocol.py and site.py subclass aiohttp's protocol and site and reads their private
# state (checked on aiohttp 3.14.5): those names must still be there, and its own none of theirs.
PROTOCOL_STATE_READ = (
    "_loop",
    "_request_count",
    "_messages",
    "_upgraded",
    "_force_close",
    "_waiter",
    "_current_request",
    "_lingering_time",
)


def _own(obj: object, cls: type) -> set[str]:
    """The private names `cls` adds: its methods and what its instance `obj` holds."""
    names = set(vars(obj)) | {n for n in vars(cls) if n.startswith("_") and not n.startswith("__")}
    return names - {"_abc_impl"}


async def test_the_aiohttp_internals_the_guards_lean_on_are_still_there() -> None:
    from aiohttp import web

    from server.runtime.protocol import GuardedRequestHandler
    from server.runtime.site import GuardedSite

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()

    server = web.Server(handler, auto_decompress=False)
    assert server._kwargs == {"auto_decompress": False}  # what GuardedSite passes on
    plain = server()  # aiohttp's own protocol, as its sites make it
    for name in PROTOCOL_STATE_READ:
        assert hasattr(plain, name), name
    loop = asyncio.get_running_loop()
    guarded = GuardedRequestHandler(server, loop=loop, site=None, header_timeout=1.0, body_timeout=1.0)
    assert not _own(guarded, GuardedRequestHandler) & set(dir(web.RequestHandler))

    runner = web.AppRunner(web.Application())
    await runner.setup()
    try:
        theirs = set(dir(web.BaseSite))  # with its slots: every attribute name of theirs
        assert "_server" in theirs  # set on purpose: BaseSite.stop() closes it
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            site = GuardedSite(
                runner, sock, backlog=1, cap=1, header_timeout=1.0, body_timeout=1.0, handler_kwargs={}
            )
            assert not _own(site, GuardedSite) & theirs
    finally:
        await runner.cleanup()
