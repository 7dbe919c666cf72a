"""Per-request cost through aiohttp's whole server path, in one process, without sockets.

    python -m bench.inprocess [--repeats N] [--calls] [--origin URL]

wrk's req/s on these shared VMs moves by a third from one minute to the next; this does not
need a quiet machine to compare two versions of the code. It builds the bare floor app
(bench/floor.py) and hotpath's app (started for real: PostgreSQL, Redis, the catalogue, the
cache) in one process, and for each route feeds batches of pipelined requests into aiohttp's
RequestHandler (for hotpath, the subclass run.py serves with, server/runtime/protocol.py) over an
in-memory transport, timing until every response is written.
That is everything aiohttp and hotpath do per request (parsing, routing, middlewares,
handler, response headers and body) except the kernel's socket work, which is the same for
both apps. Routes are measured in turn, round after round; a route's figure is the best of
its rounds (each round: the 10th percentile of its batches), so a burst of noise from a
neighbour costs a round, not the result. With --calls, cProfile also counts the Python
function calls per request: a figure that does not move with the machine at all. With
--origin, hotpath runs with that origin in cors.allow_origins and every request to it sends it
as its Origin header (the cost of CORS on a cross-origin request).

Needs DATABASE_URL and REDIS_URL (a database `hotpath_bench` is recreated, Redis db 14 used).
Loopback only; nothing listens on a port.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import pstats
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web

from bench.floor import json_handler
from bench.run import hotpath_env

BATCH = 32  # pipelined requests per batch
BATCHES = 60  # batches per round


class _Transport(asyncio.Transport):
    """Counts the responses aiohttp writes and wakes the waiter when a batch is complete."""

    def __init__(self) -> None:
        super().__init__()
        self.responses = 0
        self.wanted = 0
        self.done: asyncio.Future[None] | None = None

    def write(self, data: Any) -> None:
        self._seen(data)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self._seen(data)

    def _seen(self, data: Any) -> None:
        self.responses += bytes(data).count(b"HTTP/1.1 ")
        if self.done is not None and self.responses >= self.wanted and not self.done.done():
            self.done.set_result(None)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False


@dataclass
class Route:
    name: str
    runner: web.AppRunner
    path: str
    headers: tuple[str, ...] = ()
    guarded: bool = True  # through hotpath's own protocol (server/runtime/protocol.py), as run.py serves

    def request(self) -> bytes:
        lines = [f"GET {self.path} HTTP/1.1", "Host: 127.0.0.1", *self.headers, "", ""]
        return "\r\n".join(lines).encode()


async def one_round(route: Route, batches: int = BATCHES) -> float:
    """µs per request: the 10th percentile over `batches` batches of BATCH pipelined requests."""
    server = route.runner.server
    assert server is not None
    if route.guarded:
        from server.config import CONFIG
        from server.runtime.protocol import GuardedRequestHandler

        srv = route.runner.app[CONFIG].server
        protocol: Any = GuardedRequestHandler(
            server,
            loop=asyncio.get_running_loop(),
            site=None,
            header_timeout=srv.client_header_timeout,
            body_timeout=srv.client_body_timeout,
            keepalive_timeout=srv.keepalive_timeout,
        )
    else:
        protocol = server()
    transport = _Transport()
    protocol.connection_made(transport)
    data = route.request() * BATCH
    loop = asyncio.get_running_loop()
    times = []
    for _ in range(batches):
        transport.responses, transport.wanted = 0, BATCH
        transport.done = loop.create_future()
        started = time.perf_counter()
        protocol.data_received(data)
        await transport.done
        times.append((time.perf_counter() - started) / BATCH * 1e6)
    protocol.connection_lost(None)
    times.sort()
    return times[len(times) // 10]


async def calls_per_request(route: Route) -> float:
    profile = cProfile.Profile()
    profile.enable()
    await one_round(route, batches=10)
    profile.disable()
    return pstats.Stats(profile).total_calls / (10 * BATCH)  # type: ignore[attr-defined,no-any-return]


async def measure(
    repeats: int, count_calls: bool, origin: str | None = None
) -> list[tuple[Route, float, float | None]]:
    from server.app import create_app
    from server.config import load_config

    floor_app = web.Application()
    floor_app.router.add_get("/json", json_handler)
    floor = web.AppRunner(floor_app, access_log=None)
    await floor.setup()
    config = load_config(overrides={"cors": {"allow_origins": [origin]}} if origin else None)
    hot = web.AppRunner(create_app(config), access_log=None)
    await hot.setup()
    try:
        await _seed(hot)
        gc.freeze()  # as run.py does once the app has started (freeze_startup_heap)
        key = f"Authorization: Bearer {await _key(hot)}"
        routes = [
            Route("floor GET /json", floor, "/json", guarded=False),
            Route("hotpath GET /health", hot, "/health"),
            Route("hotpath GET /products JSON", hot, "/products", ("Accept: application/json",)),
            Route(
                "hotpath GET /products JSON, with a key", hot, "/products", ("Accept: application/json", key)
            ),
            Route("hotpath GET /products msgpack", hot, "/products", ("Accept: application/vnd.msgpack",)),
            Route("hotpath GET /users/{id}, cache L1 hit (key with users:read)", hot, "/users/1", (key,)),
            Route("hotpath GET /expensive-calculation/1000, cache hit", hot, "/expensive-calculation/1000"),
            Route("hotpath GET /large-dataset gzip", hot, "/large-dataset", ("Accept-Encoding: gzip",)),
        ]
        if origin:
            for route in routes[1:]:
                route.headers = (*route.headers, f"Origin: {origin}")
        for route in routes:  # warm: caches filled, code paths taken once
            await one_round(route, batches=10)
        best = {route.name: float("inf") for route in routes}
        for _ in range(repeats):
            for route in routes:
                best[route.name] = min(best[route.name], await one_round(route))
        calls = {route.name: await calls_per_request(route) for route in routes} if count_calls else {}
        return [(route, best[route.name], calls.get(route.name)) for route in routes]
    finally:
        await hot.cleanup()
        await floor.cleanup()


async def _seed(runner: web.AppRunner) -> None:
    """User 1, which the L1-hit route reads."""
    from server.storage.pool import DB

    db = runner.app[DB]
    await db.execute(
        "INSERT INTO users (name, email) VALUES ('Bench', 'bench@example.com')"
    )  # a fresh database: id 1


async def _key(runner: web.AppRunner) -> str:
    """A key with every scope, made the way `run.py keys create` makes one."""
    from server.access import ACCESS
    from server.access.scopes import SCOPES

    access = runner.app[ACCESS]
    assert access.store is not None
    record, key = await access.store.create("bench", "bench", list(SCOPES))
    await access.changed(record.id)
    return key


def render(results: list[tuple[Route, float, float | None]]) -> str:
    floor_us = results[0][1]
    floor_calls = results[0][2]
    lines = [
        "| route | us per request | over the floor | ratio to floor | Python calls per request |",
        "|---|---:|---:|---:|---:|",
    ]
    for route, us, calls in results:
        extra = f"{calls:.0f} (+{calls - floor_calls:.0f})" if calls is not None and floor_calls else "-"
        lines.append(f"| {route.name} | {us:.2f} | +{us - floor_us:.2f} | {floor_us / us:.2f}x | {extra} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="rounds over all routes")
    parser.add_argument("--calls", action="store_true", help="also count Python calls per request")
    parser.add_argument("--origin", help="allow this CORS origin and send it with every request to hotpath")
    args = parser.parse_args(argv)
    if not (os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL")):
        print("bench.inprocess needs DATABASE_URL and REDIS_URL", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="hotpath-inprocess-") as tmp:
        env, _config = hotpath_env(Path(tmp))  # a fresh bench database, Redis db 14
        os.environ.update({"DATABASE_URL": env["DATABASE_URL"], "REDIS_URL": env["REDIS_URL"]})
        results = uvloop.run(measure(args.repeats, args.calls, args.origin))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
