"""Quick answers (middlewares/request_context.py): the outermost layer tries the next layer's
synchronous answer first, and such an answer is counted, timed, given its id and turned into
a problem on error like any other."""

from __future__ import annotations

import secrets
from typing import Any

from aiohttp import web

from middlewares import bind, compose
from middlewares.cache import cache_middleware
from middlewares.compression import compression_middleware
from middlewares.ratelimit import ratelimit_middleware
from middlewares.request_context import request_context_middleware
from server.cache import CACHE
from server.config import CONFIG, Config
from server.runtime.metrics import METRICS


def _quick_of(bound: tuple[Any, ...]) -> Any:
    return getattr(bound[0], "quick", None)


def test_only_the_next_layer_answers_quickly(cfg: Config) -> None:
    app = web.Application()
    app[CONFIG] = cfg

    def handler_quick(request: web.Request) -> None:
        return None

    cached = bind((request_context_middleware, cache_middleware, compression_middleware), "user", app)
    assert _quick_of(cached) is not None and _quick_of(cached).func.__name__ == "_fresh"
    # a rate limit between them: the limiter must decide first, so no quick answer
    limited = bind((request_context_middleware, ratelimit_middleware, cache_middleware), "user", app)
    assert _quick_of(limited) is None
    # the handler comes next: its own quick answer; with a middleware in between, none
    assert _quick_of(bind((request_context_middleware,), "products", app, handler_quick)) is handler_quick
    inner = bind((request_context_middleware, compression_middleware), "products", app, handler_quick)
    assert _quick_of(inner) is None
    # not request_context outermost: nothing bound for quick answers at all
    assert bind((cache_middleware,), "user", app)[0].func.__name__ == "_cached"


async def test_a_quick_answer_gets_id_metrics_and_problems(aiohttp_client: Any) -> None:
    from server.runtime.metrics import Metrics

    calls: list[str] = []

    def quick(request: web.Request) -> web.Response | None:
        if request.query.get("q") == "boom":
            raise ValueError("broken quick answer")
        if request.query.get("q") == "yes":
            return web.Response(text="quick")
        return None

    async def handler(request: web.Request) -> web.Response:
        calls.append(request.query.get("q", ""))
        return web.Response(text="slow")

    app = web.Application()
    app[METRICS] = Metrics()
    app.router.add_get("/x", compose(handler, (request_context_middleware,)), name="x")
    app.router.add_get(
        "/y",
        compose(handler, bind((request_context_middleware,), "y", app, quick)),
        name="y",
    )
    client = await aiohttp_client(app)
    resp = await client.get("/y?q=yes", headers={"X-Request-ID": "abc-123"})
    assert await resp.text() == "quick" and resp.headers["X-Request-ID"] == "abc-123"
    resp = await client.get("/y?q=no")
    assert await resp.text() == "slow" and len(resp.headers["X-Request-ID"]) == 24
    assert calls == ["no"]  # the quick answer declined once, answered once
    resp = await client.get("/y?q=boom")
    assert resp.status == 500 and resp.content_type == "application/problem+json"
    body = await resp.json()
    assert "broken" not in str(body) and body["request_id"] == resp.headers["X-Request-ID"]
    app[METRICS].fold()
    rows = app[METRICS].rows
    assert sum(rows[("y", "GET", 200)][:-1]) == 2 and sum(rows[("y", "GET", 500)][:-1]) == 1
    assert app[METRICS].in_flight == 0


async def test_cached_route_hit_is_answered_once_and_counted(client: Any) -> None:
    resp = await client.post("/users", json={"name": "Q", "email": f"{secrets.token_hex(4)}@example.com"})
    uid = (await resp.json())["id"]
    assert (await client.get(f"/users/{uid}")).headers["X-Cache"] == "miss"
    stats = client.app[CACHE].stats
    before = stats.hits_l1
    hit = await client.get(f"/users/{uid}", headers={"X-Request-ID": "req-1"})
    assert hit.headers["X-Cache"] == "hit-l1" and hit.headers["X-Request-ID"] == "req-1"
    assert (await hit.json())["id"] == uid
    assert stats.hits_l1 == before + 1
    client.app[METRICS].fold()
    assert sum(client.app[METRICS].rows[("user", "GET", 200)][:-1]) == 2
    # a conditional request on the quick path: 304 with the validator
    again = await client.get(f"/users/{uid}", headers={"If-None-Match": hit.headers["ETag"]})
    assert again.status == 304 and again.headers["X-Cache"] == "hit-l1" and "X-Request-ID" in again.headers


async def test_products_quick_answer_matches_the_handler(client: Any) -> None:
    first = await client.get("/products", headers={"Accept": "application/json"})  # renders, keeps
    kept = await client.get("/products", headers={"Accept": "application/json"})  # the kept answer
    assert first.status == kept.status == 200
    assert await first.read() == await kept.read()
    for name in ("Content-Type", "Vary", "ETag", "Content-Length"):
        assert first.headers[name] == kept.headers[name]
    assert first.headers["X-Request-ID"] != kept.headers["X-Request-ID"]
    head = await client.head("/products", headers={"Accept": "application/json"})
    assert head.status == 200 and await head.read() == b""
    assert head.headers["Content-Length"] == kept.headers["Content-Length"]
    client.app[METRICS].fold()
    assert sum(client.app[METRICS].rows[("products", "GET", 200)][:-1]) == 2
