"""POST /process-urls against a local upstream, and the SSRF guard.

No test here ever sends a packet off this machine: blocked ranges are classified as units
without connecting, and end-to-end SSRF cases use loopback spellings only.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import ipaddress
import json
import socket
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from server.app import create_app
from server.fetch.client import (
    BlockedAddress,
    FetchLimits,
    Guard,
    GuardedResolver,
    blocked_reason,
    fetch_all,
    fetch_one,
    literal_ip,
)
from tests.helpers import replace, until

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


def large_json(n: int) -> bytes:
    """~900 KB of JSON (under fetch.max_bytes, over what one socket read brings), distinct per n."""
    return json.dumps(
        {"n": n, "rows": [{"i": i, "text": f"row {i} of {n} é"} for i in range(20_000)]}
    ).encode()


def upstream_app() -> web.Application:
    async def json_(request: web.Request) -> web.Response:
        return web.json_response({"n": int(request.query.get("n", "1"))})

    async def large(request: web.Request) -> web.Response:
        n = int(request.query.get("n", "0"))
        await asyncio.sleep(float(request.query.get("delay", "0")))
        body = large_json(n)
        if request.query.get("gzip"):
            return web.Response(
                body=gzip.compress(body),
                headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
            )
        return web.Response(body=body, content_type="application/json")

    async def large_text(request: web.Request) -> web.Response:
        return web.Response(text="ligne é\n" * 100_000)

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
        "/large": large, "/large-text": large_text,
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
    # a non-string item is echoed in its result: one nested deeper than JSON output allows
    # is refused with the body, not answered with a 500
    deep = b"[" + b"[" * 300 + b"]" * 300 + b"]"
    r = await fetcher.post("/process-urls", data=deep, headers={"Content-Type": "application/json"})
    assert r.status == 400 and r.content_type == "application/problem+json"
    assert "nested more than 64" in (await r.json())["detail"]
    odd = await (await fetcher.post("/process-urls", json=[[1, {"a": None}], 7])).json()
    assert [x["url"] for x in odd["results"]] == [[1, {"a": None}], 7]
    assert {x["error"] for x in odd["results"]} == {"invalid"}


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


# ---------------------------------------------------------------- large bodies, paced


async def test_large_bodies_arrive_whole_and_in_order(fetcher: Any, upstream: Any) -> None:
    """Bodies of ~900 KB come in over many socket reads, each taken in through the request's
    pacing gate, and are answered in a streamed document (written in pieces of 256 KiB):
    each one parsed exactly, in request order although they finish in reverse order."""
    base = f"http://127.0.0.1:{upstream.port}"
    count = 6
    urls = [f"{base}/large?n={n}&delay={(count - n) * 0.03:.2f}" for n in range(count)]
    urls += [f"{base}/large?n=99&gzip=1", f"{base}/large-text", f"{base}/json?n=7"]
    resp = await fetcher.post("/process-urls", json=urls)
    assert resp.status == 200
    doc = json.loads(await resp.read())  # the whole streamed document is one valid JSON value
    results = doc["results"]
    assert [r["url"] for r in results] == urls
    for n in range(count):
        assert results[n].get("data") == json.loads(large_json(n)), results[n].get("error")
        assert results[n]["bytes"] == len(large_json(n))
    assert results[count]["data"] == json.loads(large_json(99))  # gzip, decoded in pieces
    assert results[count + 1]["data"] == "ligne é\n" * 100_000
    assert results[count + 2]["data"] == {"n": 7}
    assert doc["total_urls"] == len(urls)


def _limits(**changes: Any) -> FetchLimits:
    fields = {
        "timeout": 5.0, "connect_timeout": 1.0, "max_bytes": 1024 * 1024, "max_redirects": 2,
        "concurrency": 100, "deadline": 10.0,
    }  # fmt: skip
    fields.update(changes)
    return FetchLimits(**fields)


class CountingLock(asyncio.Lock):
    def __init__(self) -> None:
        super().__init__()
        self.acquired = 0

    async def acquire(self) -> bool:
        self.acquired += 1
        return await super().acquire()


async def test_large_body_is_taken_in_through_the_gate(upstream: Any) -> None:
    """The pacing gate is on the body's path: while it is held elsewhere (another fetch of the
    same request taking its piece) the body waits; once free, it arrives whole."""
    url = f"http://127.0.0.1:{upstream.port}/large?n=3"
    gate = CountingLock()
    async with aiohttp.ClientSession() as session:
        await gate.acquire()
        fetch = asyncio.ensure_future(fetch_one(session, Guard(["127.0.0.1/32"]), url, _limits(), gate))
        await until(lambda: gate.acquired > 1, "a piece of the body waiting at the gate")
        assert not fetch.done()
        gate.release()
        result = await fetch
    assert orjson.loads(orjson.dumps(result["data"])) == json.loads(large_json(3))
    assert gate.acquired > 3  # several pieces, and the decoding


async def test_fetch_all_keeps_order_for_many_urls(upstream: Any) -> None:
    base = f"http://127.0.0.1:{upstream.port}"
    urls = [f"{base}/json?n={n}" for n in range(57)]  # not a multiple of the starts per pass
    async with aiohttp.ClientSession() as session:
        results = await fetch_all(session, Guard(["127.0.0.1/32"]), urls, _limits())
    assert [orjson.loads(orjson.dumps(r["data"])) for r in results] == [{"n": n} for n in range(57)]


async def test_cancelled_fan_out_leaves_no_fetch_running(upstream: Any) -> None:
    """A request that goes away (its task cancelled) takes its fetches with it, also those
    not started yet."""
    base = f"http://127.0.0.1:{upstream.port}"
    urls = [f"{base}/slow"] * 30

    def fetches() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if "fetch_all" in t.get_coro().__qualname__]  # type: ignore[union-attr]

    async with aiohttp.ClientSession() as session:
        fan_out = asyncio.ensure_future(fetch_all(session, Guard(["127.0.0.1/32"]), urls, _limits()))
        await until(lambda: len(fetches()) > 20, "fetches running")
        fan_out.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fan_out
        assert fetches() == []
