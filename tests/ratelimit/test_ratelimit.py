"""Rate limiting: exact under concurrency and across processes, identity, headers, fail modes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from middlewares import chain_for, compose
from middlewares.ratelimit import ratelimit_middleware
from middlewares.request_context import request_context_middleware
from server.app import create_app
from server.http.streams import stream_headers
from server.ratelimit import RATE_LIMITER
from server.ratelimit.identity import ClientIdentity
from server.ratelimit.limiter import RateLimiter
from server.ratelimit.local import LocalWindows
from server.ratelimit.policy import Window, build_policies, parse_policy
from server.ratelimit.resp import RespConnection
from server.ratelimit.windows import RedisWindows
from server.runtime.embedded import EmbeddedRedis
from server.storage.redis_client import REDIS
from tests.conftest import OPEN_ROUTES
from tests.helpers import PYTHON, ROOT, free_port, replace, until, wait_ready

# ---------------------------------------------------------------- policies


@pytest.mark.parametrize(
    ("text", "windows"),
    [
        ("100/hour, 10/minute", [Window(10, 60), Window(100, 3600)]),
        ("5/30s", [Window(5, 30)]),
        ("1000 / day", [Window(1000, 86400)]),
        ("3/second,7/2m", [Window(3, 1), Window(7, 120)]),
    ],
)
def test_parse_policy(text: str, windows: list[Window]) -> None:
    policy = parse_policy("p", text)
    assert list(policy.windows) == windows
    assert policy.header.count(";q=") == len(windows)


@pytest.mark.parametrize("text", ["", "ten/minute", "10/fortnight", "0/minute", "10/0s", "10 per minute"])
def test_parse_policy_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_policy("p", text)


def test_build_policies_default_exempt_and_typos() -> None:
    routes = ["health", "protected", "users"]
    built = build_policies(routes, {"protected": "5/minute"}, "100/minute", ["health"])
    assert set(built) == {"protected", "users"}
    assert built["users"].name == "default"
    assert build_policies(routes, {"protected": "5/minute"}, "", ["health"]).keys() == {"protected"}
    with pytest.raises(ValueError, match="protcted"):
        build_policies(routes, {"protcted": "5/minute"}, "", [])


def test_routes_without_a_policy_do_not_carry_the_middleware(cfg: Any) -> None:
    assert ratelimit_middleware in chain_for("protected", cfg)
    assert ratelimit_middleware not in chain_for("health", cfg)
    assert ratelimit_middleware not in chain_for("users", cfg)
    with_default = replace(cfg, ratelimit={"default": "100/minute"})
    assert ratelimit_middleware in chain_for("users", with_default)
    assert ratelimit_middleware not in chain_for("health", with_default)  # exempt


# ---------------------------------------------------------------- identity

TRUSTED = ["127.0.0.1/32", "::1/128", "10.0.0.0/8"]


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        ("127.0.0.1", {}, "ip:127.0.0.1"),
        ("127.0.0.1", {"X-Forwarded-For": "203.0.113.7"}, "ip:203.0.113.7"),
        # walk right to left past trusted hops; what the client wrote on the left is ignored
        ("127.0.0.1", {"X-Forwarded-For": "198.51.100.1, 203.0.113.7, 10.1.2.3"}, "ip:203.0.113.7"),
        ("127.0.0.1", {"X-Forwarded-For": "10.0.0.5, 10.0.0.6"}, "ip:10.0.0.5"),  # all trusted: leftmost
        # an untrusted peer's header changes nothing
        ("198.51.100.9", {"X-Forwarded-For": "203.0.113.7"}, "ip:198.51.100.9"),
        ("127.0.0.1", {"Forwarded": "for=192.0.2.60;proto=http;by=203.0.113.43"}, "ip:192.0.2.60"),
        ("127.0.0.1", {"Forwarded": 'for="[2001:db8:cafe::17]:4711"'}, "ip:2001:db8:cafe::/64"),
        ("127.0.0.1", {"Forwarded": "for=192.0.2.43:8080, for=10.9.9.9"}, "ip:192.0.2.43"),
        ("2001:db8:1:2:3:4:5:6", {}, "ip:2001:db8:1:2::/64"),
        ("::ffff:192.0.2.1", {}, "ip:192.0.2.1"),
    ],
)
def test_client_identity(peer: str, headers: dict[str, str], expected: str) -> None:
    assert ClientIdentity(TRUSTED).identify(headers, peer) == expected


def test_a_key_header_alone_makes_no_identity() -> None:
    """Only the access layer's verified caller counts as a key (tests/ratelimit/test_keys.py):
    whatever else a client sends, the address decides."""
    ident = ClientIdentity(TRUSTED)
    assert ident.identify({"X-API-Key": "made-up", "Authorization": "Bearer made-up"}, "198.51.100.1") == (
        "ip:198.51.100.1"
    )


# ---------------------------------------------------------------- exactness in Redis


@pytest.fixture
async def windows(cfg: Any) -> AsyncIterator[RedisWindows]:
    rw = RedisWindows(RespConnection(cfg.redis.url))
    try:
        yield rw
    finally:
        await rw.close()


async def test_exactly_limit_allowed_under_concurrency(windows: RedisWindows) -> None:
    policy = parse_policy("p", "20/minute, 1000/hour")
    decisions = await asyncio.gather(*(windows.check("ip:192.0.2.1", policy) for _ in range(100)))
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == 20
    assert sorted(d.remaining for d in allowed) == list(range(20))  # every member counted once
    refused = [d for d in decisions if not d.allowed]
    assert all(0 < d.retry_after <= 60 for d in refused)
    assert all(d.window == Window(20, 60) and d.remaining == 0 for d in refused)
    assert windows.batches < 10  # coalesced: far fewer round trips than checks


async def test_both_windows_enforced_and_refill(windows: RedisWindows) -> None:
    policy = parse_policy("p", "3/1s, 5/minute")
    first = [await windows.check("c", policy) for _ in range(4)]
    assert [d.allowed for d in first] == [True, True, True, False]
    assert first[3].window.seconds == 1 and 0 < first[3].retry_after <= 1
    await asyncio.sleep(first[3].retry_after + 0.05)  # the 1 s window slides past
    second = [await windows.check("c", policy) for _ in range(3)]
    # two more fit in the minute window (5 in all), then the sustained window refuses
    assert [d.allowed for d in second] == [True, True, False]
    assert second[2].window.seconds == 60 and second[2].retry_after > 1


async def test_clients_and_policies_are_independent(windows: RedisWindows) -> None:
    a, b = parse_policy("a", "2/minute"), parse_policy("b", "2/minute")
    results = [await windows.check(who, pol) for who in ("x", "y") for pol in (a, b) for _ in range(3)]
    assert [r.allowed for r in results] == [True, True, False] * 4


def test_local_windows_divide_the_limit_by_processes() -> None:
    local = LocalWindows(processes=4)
    policy = parse_policy("p", "20/minute")
    assert [local.check("c", policy).allowed for _ in range(6)] == [True] * 5 + [False]
    assert LocalWindows(processes=50).check("c", parse_policy("p", "20/minute")).allowed  # never below 1


# ---------------------------------------------------------------- through HTTP


@pytest.fixture
async def limited(aiohttp_client: Any, cfg: Any) -> Any:
    config = replace(cfg, ratelimit={"policies": {"protected": "5/minute, 50/hour"}})
    return await aiohttp_client(create_app(config))


async def test_protected_endpoint_shape_and_headers(limited: Any) -> None:
    for i in range(5):
        resp = await limited.get("/protected-endpoint")
        assert resp.status == 200
        body = await resp.json()
        assert body["message"] == "Request successful"
        info = body["rate_info"]
        assert info["allowed"] is True and info["limit"] == 5 and info["remaining"] == 4 - i
        assert isinstance(info["reset_time"], int)
        assert resp.headers["RateLimit-Policy"] == '"protected-60s";q=5;w=60, "protected-3600s";q=50;w=3600'
        assert resp.headers["RateLimit"].startswith(f'"protected-60s";r={4 - i};t=')
        assert "Retry-After" not in resp.headers
    refused = await limited.get("/protected-endpoint")
    assert refused.status == 429
    assert refused.content_type == "application/problem+json"
    doc = await refused.json(content_type=None)
    assert doc["type"] == "/problems/rate-limited" and doc["rate_info"]["allowed"] is False
    retry = int(refused.headers["Retry-After"])
    assert 1 <= retry <= 60
    assert refused.headers["X-Rate-Limit"] == "5" and refused.headers["X-Rate-Remaining"] == "0"
    assert int(refused.headers["X-Rate-Reset"]) > 0
    assert refused.headers["RateLimit"].startswith('"protected-60s";r=0;')


async def test_unlimited_routes_pay_nothing(limited: Any) -> None:
    for _ in range(20):
        resp = await limited.get("/health")
        assert resp.status == 200 and "RateLimit" not in resp.headers


async def test_forwarded_clients_from_trusted_peer_are_separate(limited: Any) -> None:
    for client_ip in ("203.0.113.1", "203.0.113.2"):
        statuses = [
            (await limited.get("/protected-endpoint", headers={"X-Forwarded-For": client_ip})).status
            for _ in range(6)
        ]
        assert statuses == [200] * 5 + [429]


async def test_spoofed_header_from_untrusted_peer_is_ignored(aiohttp_client: Any, cfg: Any) -> None:
    config = replace(
        cfg, ratelimit={"policies": {"protected": "3/minute"}, "trusted_proxies": ("10.0.0.0/8",)}
    )
    client = await aiohttp_client(create_app(config))
    statuses = [
        (await client.get("/protected-endpoint", headers={"X-Forwarded-For": f"203.0.113.{i}"})).status
        for i in range(5)
    ]
    assert statuses == [200, 200, 200, 429, 429]  # all counted against the real peer


async def test_two_processes_share_one_exact_limit(cfg: Any, tmp_path: Path) -> None:
    limit = 7
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": cfg.database.url,
        "REDIS_URL": cfg.redis.url,
        "HOTPATH_RATELIMIT_POLICIES": f'{{ protected = "{limit}/minute" }}',
        **OPEN_ROUTES,  # callers without a key, counted by address
    }
    ports = [free_port(), free_port()]
    procs = []
    for i, port in enumerate(ports):
        with (tmp_path / f"p{i}.log").open("wb") as log:
            procs.append(
                await asyncio.create_subprocess_exec(
                    PYTHON,
                    "run.py",
                    "--workers",
                    "1",
                    "--port",
                    str(port),
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            )
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for port, proc in zip(ports, procs, strict=True):
                await wait_ready(session, f"http://127.0.0.1:{port}", proc)

            async def hit(i: int) -> int:
                async with session.get(f"http://127.0.0.1:{ports[i % 2]}/protected-endpoint") as resp:
                    return resp.status

            statuses = await asyncio.gather(*(hit(i) for i in range(5 * limit)))
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            await asyncio.wait_for(proc.wait(), 30)
    assert statuses.count(200) == limit
    assert statuses.count(429) == 4 * limit


# ---------------------------------------------------------------- Redis failing


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[EmbeddedRedis]:
    # a Redis of this test's own: the machine's shared one must keep running for other tests
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def limited_on(aiohttp_client: Any, cfg: Any, redis: EmbeddedRedis, mode: str) -> Any:
    config = replace(
        cfg,
        redis={"url": redis.url, "socket_timeout": 0.5, "connect_timeout": 0.5},
        ratelimit={
            "policies": {"protected": "4/minute"},
            "fail_mode": mode,
            "processes": 2,
            "retry_interval": 0.1,
        },
    )
    return await aiohttp_client(create_app(config))


async def statuses(client: Any, n: int, ip: str) -> list[int]:
    return [
        (await client.get("/protected-endpoint", headers={"X-Forwarded-For": ip})).status for _ in range(n)
    ]


async def back_to_exact(client: Any, redis: EmbeddedRedis) -> None:
    redis.start()
    limiter = client.app[RATE_LIMITER]
    # the app's own Redis client reconnects on its next command
    await asyncio.wait_for(client.app[REDIS].ping(), 5)
    # retry_interval (0.1 s) after the last failure the limiter tries Redis again
    await until(lambda: not limiter.redis_down, "the limiter to retry Redis", timeout=5)
    assert await statuses(client, 5, "198.51.100.99") == [200, 200, 200, 200, 429]
    assert not limiter.redis_down


async def test_fail_open_allows_while_redis_is_down(
    aiohttp_client: Any, cfg: Any, own_redis: EmbeddedRedis
) -> None:
    client = await limited_on(aiohttp_client, cfg, own_redis, "open")
    own_redis.stop()
    assert await statuses(client, 8, "192.0.2.10") == [200] * 8
    await back_to_exact(client, own_redis)


async def test_fail_closed_refuses_with_503(aiohttp_client: Any, cfg: Any, own_redis: EmbeddedRedis) -> None:
    client = await limited_on(aiohttp_client, cfg, own_redis, "closed")
    own_redis.stop()
    resp = await client.get("/protected-endpoint")
    assert resp.status == 503 and resp.headers["Retry-After"]
    assert (await client.get("/health")).status == 200  # unlimited routes are unaffected
    await back_to_exact(client, own_redis)


async def test_fail_local_limits_in_process(aiohttp_client: Any, cfg: Any, own_redis: EmbeddedRedis) -> None:
    client = await limited_on(aiohttp_client, cfg, own_redis, "local")
    own_redis.stop()
    # 4/minute shared by 2 processes: 2 each while Redis is away
    assert await statuses(client, 4, "192.0.2.20") == [200, 200, 429, 429]
    await back_to_exact(client, own_redis)


async def test_streaming_handlers_get_the_rate_limit_headers(aiohttp_client: Any, cfg: Any) -> None:
    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        stream_headers(request, resp)
        await resp.prepare(request)
        await resp.write(b"streamed")
        return resp

    limiter = RateLimiter(
        RedisWindows(RespConnection(cfg.redis.url)),
        {"stream": parse_policy("stream", "2/minute")},
        ClientIdentity(["127.0.0.1/32"]),
    )
    app = web.Application()
    app[RATE_LIMITER] = limiter
    app.router.add_get(
        "/stream", compose(stream, (request_context_middleware, ratelimit_middleware)), name="stream"
    )
    client = await aiohttp_client(app)
    try:
        first = await client.get("/stream")
        assert await first.read() == b"streamed"
        assert first.headers["RateLimit"].startswith('"stream-60s";r=1;')
        assert first.headers["X-Request-ID"]
        await client.get("/stream")
        refused = await client.get("/stream")
        assert refused.status == 429 and refused.headers["Retry-After"]
    finally:
        await limiter.close()
