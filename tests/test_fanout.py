"""POST /process-urls against a local upstream, and the SSRF guard.

No test here ever sends a packet off this machine: blocked ranges are classified as units
without connecting, and end-to-end SSRF cases use loopback spellings only.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import ipaddress
import socket
from typing import Any

import pytest
from aiohttp import web

from server.app import create_app
from server.fanout import BlockedAddress, Guard, GuardedResolver, blocked_reason, literal_ip
from tests.conftest import replace

# ---------------------------------------------------------------- classification (no I/O)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "127.255.255.254", "10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1", "100.127.255.254",  # CGNAT
        "0.0.0.0", "0.1.2.3", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255",
        "192.0.0.8", "198.18.0.1", "192.0.2.1", "198.51.100.1", "203.0.113.1",
        "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1", "2001:db8::1",
        "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:a00:1::1",  # 6to4 of 10.0.0.1
    ],
)  # fmt: skip
def test_blocked_ranges(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "2a00:1450::1"]
)
def test_public_addresses_pass(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is None


def test_guard_allow_list() -> None:
    guard = Guard(["127.0.0.1/32", "upstream.internal"])
    guard.check_address("127.0.0.1", "127.0.0.1")
    guard.check_address("upstream.internal", "10.0.0.7")
    with pytest.raises(BlockedAddress):
        guard.check_address("127.0.0.2", "127.0.0.2")
    with pytest.raises(BlockedAddress):
        guard.check_address("other.internal", "10.0.0.7")


class _Answers(GuardedResolver):
    """The guard with a stand-in for DNS: what a rebinding name might answer."""

    def __init__(self, guard: Guard, answers: list[str]) -> None:
        super().__init__(guard)
        self._answers = answers

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> Any:
        results = [
            {"hostname": host, "host": a, "port": port, "family": family, "proto": 0, "flags": 0}
            for a in self._answers
        ]
        for r in results:
            self._guard.check_address(host, r["host"])
        return results


async def test_every_resolved_address_is_checked() -> None:
    guard = Guard([])
    assert await _Answers(guard, ["93.184.216.34"]).resolve("example.test", 80)
    with pytest.raises(BlockedAddress):
        await _Answers(guard, ["93.184.216.34", "127.0.0.1"]).resolve("rebind.test", 80)


# ---------------------------------------------------------------- end to end


@functools.cache
def gzip_bomb() -> bytes:
    """64 MiB of zeros in ~64 KB. Built once, before any request: compressing takes ~0.6 s, and
    inside a handler it would stall the test's one loop and be counted against the other URLs."""
    return gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)


def upstream_app() -> web.Application:
    async def json_(request: web.Request) -> web.Response:
        return web.json_response({"n": int(request.query.get("n", "1"))})

    async def text(request: web.Request) -> web.Response:
        return web.Response(text="plain words")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="late")

    async def error(request: web.Request) -> web.Response:
        return web.Response(status=500, text="boom")

    async def notjson(request: web.Request) -> web.Response:
        return web.Response(body=b"{nope", content_type="application/json")

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * (2 * 1024 * 1024), content_type="application/octet-stream")

    bomb_body = gzip_bomb()

    async def bomb(request: web.Request) -> web.Response:
        headers = {"Content-Encoding": "gzip", "Content-Type": "text/plain"}
        return web.Response(body=bomb_body, headers=headers)

    async def gz(request: web.Request) -> web.Response:
        body = gzip.compress(b'{"zipped": true}')
        return web.Response(
            body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    async def loop_(request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    app = web.Application()
    for path, handler in {
        "/json": json_, "/text": text, "/slow": slow, "/error": error, "/notjson": notjson,
        "/big": big, "/bomb": bomb, "/gz": gz, "/redirect": redirect, "/loop": loop_,
    }.items():  # fmt: skip
        app.router.add_get(path, handler)
    return app


@pytest.fixture
async def upstream(aiohttp_server: Any) -> Any:
    return await aiohttp_server(upstream_app(), host="127.0.0.1")


@pytest.fixture
async def fetcher(aiohttp_client: Any, cfg: Any) -> Any:
    config = replace(cfg, fetch={"allow": ("127.0.0.1/32",), "timeout": 1.0, "max_urls": 20})
    return await aiohttp_client(create_app(config))


async def test_mixed_results_in_request_order(fetcher: Any, upstream: Any) -> None:
    base = f"http://127.0.0.1:{upstream.port}"
    urls = [
        f"{base}/json?n=1", f"{base}/text", f"{base}/slow", f"{base}/error", f"{base}/notjson",
        f"{base}/big", f"{base}/bomb", f"{base}/gz", f"{base}/redirect?to=/json%3Fn%3D2", f"{base}/loop",
        "ftp://127.0.0.1/file", "not a url", 42, f"{base}/json?n=3",
    ]  # fmt: skip
    resp = await fetcher.post("/process-urls", json=urls)
    assert resp.status == 200
    doc = await resp.json()
    assert doc["total_urls"] == len(urls) and doc["processing_time"] < 5
    results = doc["results"]
    assert [r["url"] for r in results] == urls
    outcome = [(r.get("data") if "data" in r else r["error"]) for r in results]
    assert outcome == [
        {"n": 1}, "plain words", "timeout", "http_error", "invalid", "too_large", "too_large",
        {"zipped": True}, {"n": 2}, "http_error", "invalid", "invalid", "invalid", {"n": 3},
    ]  # fmt: skip
    assert results[3]["status"] == 500
    assert all("elapsed_ms" in r for r in results)
    # the slow URL did not hold up the others
    assert results[0]["elapsed_ms"] < 500 and results[13]["elapsed_ms"] < 500


async def test_object_body_with_timeout_and_limits(fetcher: Any, upstream: Any) -> None:
    base = f"http://127.0.0.1:{upstream.port}"
    resp = await fetcher.post(
        "/process-urls", json={"urls": [f"{base}/slow", f"{base}/json"], "timeout": 0.2}
    )
    results = (await resp.json())["results"]
    assert results[0]["error"] == "timeout" and results[0]["elapsed_ms"] < 1000
    assert results[1]["data"] == {"n": 1}
    too_many = await fetcher.post("/process-urls", json=[f"{base}/json"] * 21)
    assert too_many.status == 422
    for bad in (
        {"urls": "x"},
        {"urls": [], "timeout": 99},
        {"url": []},
        "just text",
        {"urls": [], "extra": 1},
    ):
        r = await fetcher.post("/process-urls", json=bad)
        assert r.status == 422, bad
    empty = await (await fetcher.post("/process-urls", json=[])).json()
    assert empty["results"] == [] and empty["total_urls"] == 0


async def test_redirect_to_a_blocked_address_is_blocked(fetcher: Any, upstream: Any) -> None:
    base = f"http://127.0.0.1:{upstream.port}"
    targets = [f"http://127.0.0.2:{upstream.port}/json", f"http://[::1]:{upstream.port}/json"]
    urls = [f"{base}/redirect?to={t}" for t in targets]
    results = (await (await fetcher.post("/process-urls", json=urls)).json())["results"]
    assert [r["error"] for r in results] == ["blocked", "blocked"]


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1", "localhost", "[::1]", "2130706433", "0x7f000001", "0177.0.0.1", "127.1",
        "[::ffff:127.0.0.1]", "0.0.0.0", "127.0.0.1.", "LOCALHOST",
    ],
)  # fmt: skip
async def test_loopback_spellings_are_blocked_by_default(
    aiohttp_client: Any, cfg: Any, upstream: Any, host: str
) -> None:
    client = await aiohttp_client(create_app(cfg))  # default config: empty allow-list
    resp = await client.post("/process-urls", json=[f"http://{host}:{upstream.port}/json"])
    result = (await resp.json())["results"][0]
    assert result["error"] == "blocked", result
    assert "data" not in result


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("2130706433", "127.0.0.1"), ("0x7f000001", "127.0.0.1"), ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"), ("[::1]", "::1"), ("127.0.0.1.", "127.0.0.1"), ("example.test", None),
        ("1e100.example", None),
    ],
)  # fmt: skip
def test_literal_ip_reads_numeric_spellings(host: str, expected: str | None) -> None:
    got = literal_ip(host)
    assert (str(got) if got is not None else None) == expected
