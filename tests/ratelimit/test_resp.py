"""The rate limiter's lean Redis connection against a real Redis (and a silent peer)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions as redis_exc

from server.ratelimit.resp import RespConnection
from server.runtime.embedded import EmbeddedRedis


@pytest.fixture
async def conn(cfg: Any) -> AsyncIterator[RespConnection]:
    c = RespConnection(cfg.redis.url, timeout=2.0)
    yield c
    c.close()


async def test_pipelined_replies_reach_their_callers(conn: RespConnection) -> None:
    values = [f"v{i}" * (i % 7 + 1) for i in range(300)]
    replies = await asyncio.gather(*(conn.call("ECHO", v) for v in values))
    assert [r.decode() for r in replies] == values


async def test_selects_the_database_of_the_url(conn: RespConnection, cfg: Any) -> None:
    await conn.call("SET", "hotpath:test:resp", "here")
    other = aioredis.from_url(cfg.redis.url)
    try:
        assert await other.get("hotpath:test:resp") == b"here"
    finally:
        await other.aclose()


async def test_error_reply_is_response_error_and_connection_survives(conn: RespConnection) -> None:
    with pytest.raises(redis_exc.ResponseError):
        await conn.call("NOSUCHCOMMAND")
    assert await conn.call("PING") == b"PONG"


async def test_evalsha_loads_an_unknown_script(conn: RespConnection) -> None:
    script = "return tonumber(ARGV[1]) * 2"
    sha = hashlib.sha1(script.encode()).hexdigest()
    await conn.call("SCRIPT", "FLUSH")
    assert await conn.evalsha(sha, script, 21) == 42
    assert await conn.evalsha(sha, script, 5) == 10  # known now


async def test_dead_server_is_connection_error_then_recovers(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    conn = RespConnection(server.url, timeout=1.0)
    try:
        assert await conn.call("PING") == b"PONG"
        server.stop()
        with pytest.raises(redis_exc.ConnectionError):
            await conn.call("PING")
        with pytest.raises(redis_exc.ConnectionError):
            await conn.call("PING")  # reconnecting to nothing fails cleanly too
        server.start()
        assert await conn.call("PING") == b"PONG"
    finally:
        conn.close()
        server.stop()


async def test_silent_peer_times_out_and_fails_every_waiter() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # read nothing, answer nothing

    srv = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    conn = RespConnection(f"redis://127.0.0.1:{port}/0", timeout=0.3)
    try:
        results = await asyncio.gather(*(conn.call("PING") for _ in range(5)), return_exceptions=True)
        assert all(isinstance(r, redis_exc.TimeoutError | redis_exc.ConnectionError) for r in results)
    finally:
        conn.close()
        for w in accepted:
            w.close()
        srv.close()
        await srv.wait_closed()
