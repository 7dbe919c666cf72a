"""The two-layer cache: the service on its own (real Redis), then through the app's routes."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from server.app import create_app
from server.cache import CACHE, Cache, cached, make_key
from server.calculation import sum_of_squares
from server.config import CacheConfig, Config, ConfigError, load_config
from server.errors import NotFound
from server.http.packing import pack, unpack
from server.products import CATALOGUE
from server.runtime.embedded import EmbeddedRedis
from tests.helpers import replace, until


async def until_time(moment: float) -> None:
    """Wait for the wall clock to pass `moment` (a TTL's end): waiting for time itself."""
    await until(lambda: time.time() > moment)


@pytest.fixture
async def redis(cfg: Config) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(cfg.redis.url)
    yield client
    await client.aclose()


def settings(channel: str, **changes: Any) -> CacheConfig:
    base = {"channel": channel, "retry_interval": 0.05, "lock_poll": 0.002}
    return dataclasses.replace(CacheConfig(), **{**base, **changes})


@pytest.fixture
async def make_cache(redis: aioredis.Redis) -> AsyncIterator[Callable[..., Awaitable[Cache]]]:
    caches: list[Cache] = []
    channel = f"hotpath:test:{secrets.token_hex(6)}"  # this test's own: pub/sub ignores db numbers

    async def make(client: aioredis.Redis | None = None, **changes: Any) -> Cache:
        cache = Cache(client or redis, settings(channel, **changes))
        await cache.start()
        await until(cache.subscribed.is_set)
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        await cache.close()


class Counter:
    """A loader that counts its runs and returns a new value each time."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.runs = 0
        self.started = asyncio.Event()
        self.gate = gate

    async def __call__(self) -> dict[str, Any]:
        self.runs += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        return {"run": self.runs}


# ----------------------------------------------------------------------------- serialization


def test_msgpack_round_trips_every_supported_type() -> None:
    value = {
        "none": None,
        "bool": True,
        "int": -(2**63),
        "big": 2**64 - 1,
        "float": 1.5,
        "str": "grüße ✓",
        "bytes": b"\x00\xff",
        "list": [1, "two", [3.0]],
        "aware": dt.datetime(2026, 11, 25, 14, 0, 1, 123456, tzinfo=dt.UTC),
        "offset": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
        "naive": dt.datetime(2026, 11, 25, 14, 0),
        "date": dt.date(2024, 1, 31),
        "decimal": Decimal("12345678901234567890.000000001"),
        "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "nested": {"when": [dt.date(2020, 2, 29), Decimal("-0.5")]},
    }
    back = unpack(pack(value))
    assert back == value
    assert type(back["date"]) is dt.date and type(back["aware"]) is dt.datetime
    assert back["aware"].tzinfo is not None and back["naive"].tzinfo is None
    assert unpack(pack((1, 2))) == [1, 2]  # tuples come back as lists (msgpack has no tuple)


@pytest.mark.parametrize("value", [{1, 2}, object(), dt.timedelta(seconds=1), 1 + 2j, Path("/x")])
def test_msgpack_refuses_unknown_types(value: Any) -> None:
    with pytest.raises(TypeError, match="cannot cache"):
        pack({"nested": [value]})


def test_keys_are_versioned_and_readable() -> None:
    key = make_key("calc", [5])
    assert key.startswith("hotpath:v1:calc:") and len(key.rsplit(":", 1)[1]) == 32
    assert key == make_key("calc", [5]) != make_key("calc", [6])


# ----------------------------------------------------------------------------- the service


async def test_ttl_expiry_never_serves_stale(make_cache: Any, redis: aioredis.Redis) -> None:
    cache = await make_cache()
    loader = Counter()
    first = await cache.get_or_load("t", ["k"], loader, ttl=0.2)
    assert (first.value, first.source) == ({"run": 1}, "miss")
    assert (await cache.get_or_load("t", ["k"], loader, ttl=0.2)).source == "hit-l1"
    entry = cache.local.entries[make_key("t", ["k"])]
    await until_time(entry.fresh_until)
    # L1 and L2 (whose key outlives the TTL by up to the jitter) both hold the old value: unused
    again = await cache.get_or_load("t", ["k"], loader, ttl=0.2)
    assert (again.value, again.source) == ({"run": 2}, "miss")
    assert loader.runs == 2
    assert await redis.pttl(make_key("t", ["k"])) > 0


async def test_l2_fills_l1_of_another_process(make_cache: Any) -> None:
    a, b = await make_cache(), await make_cache()
    loader = Counter()
    await a.get_or_load("t", ["shared"], loader, ttl=30)
    hit = await b.get_or_load("t", ["shared"], loader, ttl=30)
    assert (hit.value, hit.source) == ({"run": 1}, "hit-l2")
    assert (await b.get_or_load("t", ["shared"], loader, ttl=30)).source == "hit-l1"
    assert loader.runs == 1 and b.stats.hits_l2 == 1 and b.stats.hits_l1 == 1


async def test_lru_is_bounded_by_entries(make_cache: Any) -> None:
    cache = await make_cache(max_entries=3)
    for i in range(3):
        await cache.set("lru", [i], i)
    assert (await cache.get("lru", [0])) is not None  # 0 is now the most recently used
    await cache.set("lru", [3], 3)
    await cache.set("lru", [4], 4)
    assert cache.l1_size == 3 and cache.stats.evictions == 2
    kept = {k for k, _ in cache.local.entries.items()}
    assert kept == {make_key("lru", [i]) for i in (0, 3, 4)}


async def test_lru_is_bounded_by_bytes(make_cache: Any) -> None:
    cache = await make_cache(max_bytes=2000)
    for i in range(10):
        await cache.set("big", [i], "x" * 500)
    assert cache.l1_bytes <= 2000 and cache.l1_size == 3
    assert cache.stats.evictions == 7
    too_big = "y" * 5000
    await cache.set("big", ["huge"], too_big)  # larger than all of L1: kept in Redis only
    assert cache.l1_size == 3
    hit = await cache.get("big", ["huge"])
    assert hit is not None and hit.source == "hit-l2" and hit.value == too_big


async def test_single_flight_in_process_1000_callers_one_load(make_cache: Any) -> None:
    cache = await make_cache()
    gate = asyncio.Event()
    loader = Counter(gate)
    calls = [asyncio.ensure_future(cache.get_or_load("sf", ["cold"], loader)) for _ in range(1000)]
    await loader.started.wait()
    await until(lambda: cache.stats.misses_l1 == 1000)  # every caller has asked
    gate.set()
    hits = await asyncio.gather(*calls)
    assert loader.runs == 1 and cache.stats.loads == 1
    assert {h.value["run"] for h in hits} == {1}


async def test_single_flight_across_processes(make_cache: Any) -> None:
    a, b = await make_cache(), await make_cache()
    gate = asyncio.Event()
    loader_a, loader_b = Counter(gate), Counter()
    first = asyncio.ensure_future(a.get_or_load("sf", ["x"], loader_a))
    await loader_a.started.wait()  # a holds the Redis lock and is loading
    second = asyncio.ensure_future(b.get_or_load("sf", ["x"], loader_b))
    await until(lambda: b.stats.lock_waits == 1)
    gate.set()
    assert (await first).source == "miss"
    hit = await second
    assert (hit.value, hit.source) == ({"run": 1}, "hit-l2")
    assert loader_b.runs == 0 and a.stats.loads + b.stats.loads == 1


async def test_waiters_load_themselves_when_the_lock_holder_is_too_slow(make_cache: Any) -> None:
    a, b = await make_cache(), await make_cache(lock_wait=0.05)
    gate = asyncio.Event()
    stuck = Counter(gate)
    first = asyncio.ensure_future(a.get_or_load("slow", ["x"], stuck))
    await stuck.started.wait()
    hit = await b.get_or_load("slow", ["x"], Counter())
    assert hit.source == "miss" and b.stats.lock_wait_timeouts == 1
    gate.set()
    await first


async def test_invalidation_reaches_every_process_before_returning(make_cache: Any) -> None:
    a, b = await make_cache(), await make_cache()
    version = {"n": 1}

    async def load() -> int:
        return version["n"]

    for cache in (a, b):
        assert (await cache.get_or_load("inv", ["k"], load)).value == 1
        assert (await cache.get_or_load("inv", ["k"], load)).source == "hit-l1"
    version["n"] = 2
    await a.invalidate("inv", ["k"])
    # no waiting: b acknowledged before invalidate() returned
    assert (await b.get_or_load("inv", ["k"], load)).value == 2
    assert b.stats.invalidations_received >= 1


async def test_groups_drop_every_variant(make_cache: Any, redis: aioredis.Redis) -> None:
    a, b = await make_cache(), await make_cache()
    for variant in ("json", "xml"):
        for cache in (a, b):
            await cache.get_or_load("resp", [variant], Counter(), group="user:id=1")
    await cache.get_or_load("resp", ["other"], Counter(), group="user:id=2")
    await a.invalidate_groups("user:id=1")
    assert b.l1_size == 1 and a.l1_size == 0
    assert await redis.exists(make_key("resp", ["json"]), make_key("resp", ["xml"])) == 0
    assert await redis.exists(make_key("resp", ["other"])) == 1


async def test_negative_caching(make_cache: Any) -> None:
    cache = await make_cache()
    runs = 0

    async def missing() -> None:
        nonlocal runs
        runs += 1
        raise NotFound("user 9 does not exist")

    for _ in range(3):
        with pytest.raises(NotFound, match="user 9"):
            await cache.get_or_load("neg", [9], missing, negative_ttl=0.2)
    assert runs == 1 and cache.stats.negative_stored == 1
    entry = cache.local.entries[make_key("neg", [9])]
    await until_time(entry.stale_until)
    with pytest.raises(NotFound):
        await cache.get_or_load("neg", [9], missing, negative_ttl=0.2)
    assert runs == 2
    with pytest.raises(NotFound):  # negative_ttl 0: not remembered
        await cache.get_or_load("neg", [10], missing, negative_ttl=0)
    with pytest.raises(NotFound):
        await cache.get_or_load("neg", [10], missing, negative_ttl=0)
    assert runs == 4


async def test_stale_while_revalidate_refreshes_once_in_the_background(make_cache: Any) -> None:
    cache = await make_cache()
    gate = asyncio.Event()
    loader = Counter()
    await cache.get_or_load("swr", ["k"], loader, ttl=0.1, grace=30)
    await until_time(cache.local.entries[make_key("swr", ["k"])].fresh_until)
    loader.gate = gate
    for _ in range(20):
        hit = await cache.get_or_load("swr", ["k"], loader, ttl=0.1, grace=30)
        assert (hit.value, hit.source) == ({"run": 1}, "hit-l1")  # the stale value, at once
    await until(lambda: loader.runs == 2)
    gate.set()
    await until(lambda: cache.local.entries[make_key("swr", ["k"])].value == {"run": 2})
    assert loader.runs == 2 and cache.stats.stale_served == 20


async def test_loader_errors_are_not_cached(make_cache: Any) -> None:
    cache = await make_cache()
    fail = True

    async def flaky() -> str:
        if fail:
            raise RuntimeError("upstream down")
        return "ok"

    with pytest.raises(RuntimeError):
        await cache.get_or_load("err", [1], flaky)
    fail = False
    assert (await cache.get_or_load("err", [1], flaky)).value == "ok"
    assert cache.stats.load_errors == 1


async def test_decorator_takes_the_cache_from_the_caller(make_cache: Any) -> None:
    cache = await make_cache()
    runs: list[tuple[int, str]] = []

    @cached("deco", ttl=30)
    async def lookup(n: int, label: str = "x") -> dict[str, Any]:
        runs.append((n, label))
        return {"n": n, "label": label}

    assert await lookup(cache, 1) == {"n": 1, "label": "x"}
    assert await lookup(cache, 1) == {"n": 1, "label": "x"}
    assert (await lookup.fetch(cache, 1)).source == "hit-l1"
    assert await lookup(cache, 1, label="y") == {"n": 1, "label": "y"}
    assert runs == [(1, "x"), (1, "y")]
    await lookup.invalidate(cache, 1)
    assert (await lookup.fetch(cache, 1)).source == "miss"


async def test_redis_stopping_degrades_then_recovers(make_cache: Any, tmp_path: Path) -> None:
    # A Redis of this test's own: the machine's shared one must keep running for everyone else.
    own = EmbeddedRedis(tmp_path / "redis")
    own.start()
    client = aioredis.from_url(own.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        cache = await make_cache(client)
        assert (await cache.get_or_load("d", ["before"], Counter())).source == "miss"
        # several idle pooled connections to the server about to go: none may fail once more
        # after Redis is back (each such failure would count as another outage)
        await asyncio.gather(*(client.ping() for _ in range(4)))
        own.stop()
        for i in range(5):  # no errors reach callers; one outage counted however many failures
            hit = await cache.get_or_load("d", ["during", i], Counter())
            assert hit.source == "miss" and hit.value == {"run": 1}
        assert (await cache.get_or_load("d", ["before"], Counter())).source == "hit-l1"
        await cache.invalidate("d", ["before"])  # invalidation still clears this process
        assert cache.l1_size == 5
        assert cache.degraded and cache.stats.degraded == 1 and cache.stats.redis_errors >= 1
        own.start()

        async def recovered() -> bool:
            await cache.get_or_load("d", ["after", time.monotonic()], Counter())
            return not cache.degraded

        await until(recovered)
        await until(cache.subscribed.is_set)  # the subscription is back too
        await cache.get_or_load("d", ["stored"], Counter())
        assert await client.exists(make_key("d", ["stored"])) == 1
        assert cache.stats.degraded == 1
    finally:
        await client.aclose()
        own.stop()


# ----------------------------------------------------------------------------- through the app


@pytest.fixture
async def two_clients(aiohttp_client: Any, cfg: Config) -> tuple[Any, Any]:
    """Two app instances sharing PostgreSQL and Redis, as two worker processes would."""
    first = await aiohttp_client(create_app(cfg))
    second = await aiohttp_client(create_app(cfg))
    for c in (first, second):
        await until(c.app[CACHE].subscribed.is_set)
    return first, second


async def new_user(client: Any, name: str = "Ada") -> int:
    resp = await client.post("/users", json={"name": name, "email": f"{secrets.token_hex(4)}@example.com"})
    assert resp.status == 201
    return int((await resp.json())["id"])


async def test_x_cache_values_on_a_cached_route(two_clients: tuple[Any, Any]) -> None:
    first, second = two_clients
    uid = await new_user(first)
    resp = await first.get(f"/users/{uid}")
    assert resp.status == 200 and resp.headers["X-Cache"] == "miss"
    assert (await first.get(f"/users/{uid}")).headers["X-Cache"] == "hit-l1"
    assert (await second.get(f"/users/{uid}")).headers["X-Cache"] == "hit-l2"
    assert (await second.get(f"/users/{uid}")).headers["X-Cache"] == "hit-l1"
    fresh = await first.get(f"/users/{uid}", headers={"Cache-Control": "no-cache"})
    assert fresh.headers["X-Cache"] == "bypass" and (await fresh.json())["id"] == uid
    head = await first.head(f"/users/{uid}")
    assert head.status == 200 and head.headers["X-Cache"] == "hit-l1"
    # routes without a policy carry no X-Cache (and run no cache code at all)
    assert "X-Cache" not in (await first.get("/users")).headers


async def test_representations_and_encodings_never_swap(client: Any) -> None:
    uid = await new_user(client)
    as_json = await client.get(f"/users/{uid}", headers={"Accept": "application/json"})
    as_xml = await client.get(f"/users/{uid}", headers={"Accept": "application/xml"})
    assert as_json.headers["X-Cache"] == as_xml.headers["X-Cache"] == "miss"
    assert as_xml.content_type == "application/xml" and (await as_xml.text()).startswith("<")
    assert (await client.get(f"/users/{uid}", headers={"Accept": "application/xml"})).content_type == (
        "application/xml"
    )
    gz = await client.get(f"/users/{uid}", headers={"Accept-Encoding": "gzip"})
    plain = await client.get(f"/users/{uid}", headers={"Accept-Encoding": "identity"})
    assert gz.headers["X-Cache"] == "miss" and plain.headers["X-Cache"] == "miss"
    same = await client.get(f"/users/{uid}", headers={"Accept-Encoding": "gzip;q=1.0"})
    assert same.headers["X-Cache"] == "hit-l1"
    by_query = await client.get(f"/users/{uid}?format=yaml")
    assert by_query.headers["X-Cache"] == "miss" and by_query.content_type == "application/yaml"


async def test_second_process_never_serves_the_old_user_after_a_patch(two_clients: tuple[Any, Any]) -> None:
    first, second = two_clients
    uid = await new_user(first, "v0")
    for i in range(1, 21):
        for c in (second, second, first):  # warm both layers and both processes
            assert (await c.get(f"/users/{uid}")).status == 200
        patched = await first.patch(f"/users/{uid}", json={"name": f"v{i}"})
        assert patched.status == 200
        for c in (second, first):
            body = await (await c.get(f"/users/{uid}")).json()
            assert body["name"] == f"v{i}"
        profile = await (await second.get(f"/users/{uid}/profile")).json()
        assert profile["name"] == f"v{i}"
    assert (await first.delete(f"/users/{uid}")).status == 204
    gone = await second.get(f"/users/{uid}")
    assert gone.status == 404 and gone.content_type == "application/problem+json"


async def test_negative_caching_of_404_and_creation_clears_it(client: Any) -> None:
    miss = await client.get("/users/1")
    assert miss.status == 404 and miss.headers["X-Cache"] == "miss"
    hit = await client.get("/users/1")
    assert hit.status == 404 and hit.headers["X-Cache"] == "hit-l1"
    assert hit.content_type == "application/problem+json" and "user 1" in (await hit.json())["detail"]
    assert client.app[CACHE].stats.loads == 1
    assert await new_user(client) == 1  # ids restart at 1 each test
    found = await client.get("/users/1")
    assert found.status == 200 and found.headers["X-Cache"] == "miss"


async def test_etag_and_304(client: Any) -> None:
    uid = await new_user(client)
    resp = await client.get(f"/users/{uid}")
    etag = resp.headers["ETag"]
    assert etag.startswith('"') and resp.headers["Cache-Control"] == "no-cache"
    again = await client.get(f"/users/{uid}")
    assert again.headers["ETag"] == etag
    not_modified = await client.get(f"/users/{uid}", headers={"If-None-Match": f'"nope", W/{etag}'})
    assert not_modified.status == 304 and await not_modified.read() == b""
    assert not_modified.headers["ETag"] == etag and not_modified.headers["X-Cache"] == "hit-l1"
    await client.patch(f"/users/{uid}", json={"name": "Changed"})
    changed = await client.get(f"/users/{uid}", headers={"If-None-Match": etag})
    assert changed.status == 200 and changed.headers["ETag"] != etag


async def test_expensive_calculation(client: Any, cfg: Config) -> None:
    resp = await client.get("/expensive-calculation/7")
    body = await resp.json()
    assert resp.status == 200 and resp.headers["X-Cache"] == "miss"
    assert body["input"] == 7 and body["result"] == sum(i * i for i in range(7000)) == sum_of_squares(7)
    assert dt.datetime.fromisoformat(body["timestamp"]).tzinfo is not None
    again = await client.get("/expensive-calculation/7")
    assert again.headers["X-Cache"] == "hit-l1" and await again.json() == body
    limit = cfg.cache.expensive_max
    assert (await client.get(f"/expensive-calculation/{limit}")).status == 200
    too_big = await client.get(f"/expensive-calculation/{limit + 1}")
    assert too_big.status == 422 and too_big.content_type == "application/problem+json"


async def test_1000_concurrent_requests_for_a_cold_key_run_one_loader(client: Any) -> None:
    responses = await asyncio.gather(*(client.get("/expensive-calculation/300") for _ in range(1000)))
    assert {r.status for r in responses} == {200}
    assert {r.headers["X-Cache"] for r in responses} <= {"miss", "hit-l1"}
    assert len({(await r.json())["timestamp"] for r in responses}) == 1
    stats = await (await client.get("/cache/stats")).json()
    assert stats["loads"] == 1


async def test_cold_key_on_two_instances_loads_once(two_clients: tuple[Any, Any]) -> None:
    first, second = two_clients
    both = await asyncio.gather(
        *(c.get("/expensive-calculation/900") for _ in range(50) for c in (first, second))
    )
    assert len({(await r.json())["timestamp"] for r in both}) == 1
    assert first.app[CACHE].stats.loads + second.app[CACHE].stats.loads == 1


async def test_cache_stats(client: Any) -> None:
    await client.get("/expensive-calculation/1")
    await client.get("/expensive-calculation/1")
    stats = await (await client.get("/cache/stats")).json()
    assert stats["hits_l1"] == 1 and stats["misses_l1"] == 1 and stats["misses_l2"] == 1
    assert stats["l1_entries"] >= 1 and stats["l1_bytes"] > 0 and stats["degraded"] == 0
    assert {"evictions", "loads", "hits_l2"} <= set(stats)


async def test_product_responses_drop_when_the_catalogue_changes(aiohttp_client: Any, cfg: Config) -> None:
    routes = {**cfg.cache.routes, "products": {"ttl": 300.0}}
    client = await aiohttp_client(create_app(replace(cfg, cache={"routes": routes})))
    cache = client.app[CACHE]
    # the catalogue's first reload once it listens invalidates product responses: let it pass
    await until(lambda: client.app[CATALOGUE].version >= 2 and not cache._tasks)
    first = await client.get("/products?limit=200")
    assert first.headers["X-Cache"] == "miss"
    assert (await client.get("/products?limit=200")).headers["X-Cache"] == "hit-l1"
    conn = await asyncpg.connect(cfg.database.url)
    try:
        new_id = await conn.fetchval(
            "INSERT INTO products (name, price, category) VALUES ('Cached gadget', 3.5, 'test') RETURNING id"
        )

        async def visible() -> bool:
            items = (await (await client.get("/products?limit=200")).json())["items"]
            return any(p["id"] == new_id for p in items)

        await until(visible)  # well within the 300 s TTL: the reload invalidated it
        await conn.execute("DELETE FROM products WHERE id = $1", new_id)
    finally:
        await conn.close()


def _cache_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_coro().__qualname__.startswith("Cache.")]


async def test_a_closed_cache_starts_no_background_work(make_cache: Any) -> None:
    # A task started after close() is awaited by nobody: the Redis connection it opens once the
    # pools are closed was left open when the loop ended (a ResourceWarning in a later test).
    cache = await make_cache()
    await cache.close()
    cache.invalidate_group_soon("products:")
    assert _cache_tasks() == []


async def test_catalogue_reloads_at_shutdown_reach_no_closed_cache(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(cfg))
    catalogue = client.app[CATALOGUE]
    assert len(catalogue.on_change) == 1  # the cache's
    await client.close()
    # the catalogue closes after the cache, and until then a reload may still run its callbacks
    assert catalogue.on_change == []


async def test_uncacheable_requests_pass_untouched(client: Any) -> None:
    await new_user(client)
    bad = await client.get("/users/1?format=nonsense")
    assert bad.status == 400 and bad.headers["X-Cache"] == "miss"
    assert (await client.get("/users/1?format=nonsense")).headers["X-Cache"] == "miss"
    not_acceptable = await client.get("/users/1", headers={"Accept": "image/png"})
    assert not_acceptable.status == 406


async def test_process_urls_reuses_successes_per_url(
    aiohttp_client: Any, aiohttp_server: Any, cfg: Config
) -> None:
    hits = {"ok": 0, "fail": 0}

    async def ok(request: web.Request) -> web.Response:
        hits["ok"] += 1
        return web.json_response({"n": hits["ok"]})

    async def fail(request: web.Request) -> web.Response:
        hits["fail"] += 1
        return web.Response(status=503, text="busy")

    upstream_app = web.Application()
    upstream_app.router.add_get("/ok", ok)
    upstream_app.router.add_get("/fail", fail)
    upstream = await aiohttp_server(upstream_app, host="127.0.0.1")
    config = replace(cfg, fetch={"allow": ("127.0.0.1/32",), "cache_ttl": 30.0})
    client = await aiohttp_client(create_app(config))
    urls = [f"http://127.0.0.1:{upstream.port}/ok", f"http://127.0.0.1:{upstream.port}/fail", 42]
    for _ in range(3):
        doc = await (await client.post("/process-urls", json=urls)).json()
        assert [r["url"] for r in doc["results"]] == urls
        assert doc["results"][0]["data"] == {"n": 1}  # fetched once, then reused
        assert doc["results"][1]["error"] == "http_error" and doc["results"][2]["error"] == "invalid"
    assert hits == {"ok": 1, "fail": 3}  # failures are never kept
    off = await aiohttp_client(create_app(replace(cfg, fetch={"allow": ("127.0.0.1/32",)})))
    doc = await (await off.post("/process-urls", json=urls[:1])).json()
    assert doc["results"][0]["data"] == {"n": 2} and hits["ok"] == 2  # cache_ttl 0: always fetched


async def test_app_keeps_answering_while_redis_is_down(
    aiohttp_client: Any, cfg: Config, tmp_path: Path
) -> None:
    own = EmbeddedRedis(tmp_path / "redis")  # this test's own Redis, never the machine's
    own.start()
    try:
        config = replace(cfg, redis={"url": own.url, "socket_timeout": 0.5}, cache={"retry_interval": 0.05})
        client = await aiohttp_client(create_app(config))
        cache = client.app[CACHE]
        uid = await new_user(client)
        assert (await client.get(f"/users/{uid}")).headers["X-Cache"] == "miss"
        own.stop()
        assert (await client.get(f"/users/{uid}")).headers["X-Cache"] == "hit-l1"
        patched = await client.patch(f"/users/{uid}", json={"name": "Offline"})
        assert patched.status == 200
        after = await client.get(f"/users/{uid}")
        assert after.status == 200 and (await after.json())["name"] == "Offline"
        calc = await client.get("/expensive-calculation/3")
        assert calc.status == 200 and calc.headers["X-Cache"] == "miss"
        assert cache.degraded and cache.stats.degraded == 1
        own.start()

        async def recovered() -> bool:
            await client.get(f"/expensive-calculation/{int(time.monotonic() * 1000) % 900}")
            return not cache.degraded

        await until(recovered)
        assert (await (await client.get("/cache/stats")).json())["degraded"] == 1
    finally:
        own.stop()


def test_route_policies_are_validated_and_settable_from_the_environment() -> None:
    base = {"DATABASE_URL": "postgresql://u@127.0.0.1/db", "REDIS_URL": "redis://127.0.0.1/2"}
    cfg = load_config(env={**base, "HOTPATH_CACHE_ROUTES": "{ user = { ttl = 5, grace = 2, max_age = 1 } }"})
    assert cfg.cache.routes == {"user": {"ttl": 5.0, "grace": 2.0, "max_age": 1.0}}
    for bad, key in (
        ("{ user = { ttl = 0 } }", "cache.routes.user"),
        ("{ user = { ttl = 5, often = 1 } }", "cache.routes.user"),
        ("{ user = { ttl = -1 } }", "cache.routes.user"),
        ("{ user = 5 }", "cache.routes.user"),
    ):
        with pytest.raises(ConfigError) as info:
            load_config(env={**base, "HOTPATH_CACHE_ROUTES": bad})
        assert info.value.key == key


@pytest.mark.parametrize(
    "hostile",
    [
        "gzip;q=1;q=0, identity;q=0",  # a repeated q: a coding's first q decides, not its last
        "*;q=1;q=0, identity;q=0",
        "gzip;q=0;q=1",
        "GZIP;Q=1;q=0 , identity;q=0",
    ],
)
async def test_accept_encoding_cannot_poison_the_shared_cache(
    two_clients: tuple[Any, Any], hostile: str
) -> None:
    """The key is the coding the compression layer chose: whatever the header says, a client
    that sent no Accept-Encoding (here or in another process, from Redis) gets identity bytes."""
    first, second = two_clients
    uid = await new_user(first)
    attack = await first.get(f"/users/{uid}", headers={"Accept-Encoding": hostile})
    assert attack.status in (200, 406)
    for c in (first, second):
        plain = await c.get(f"/users/{uid}", skip_auto_headers=["Accept-Encoding"])
        assert plain.status == 200
        assert "Content-Encoding" not in plain.headers, (hostile, plain.headers)
        assert (await plain.read()).startswith(b"{")
        asked = await c.get(f"/users/{uid}", headers={"Accept-Encoding": "identity"})
        assert "Content-Encoding" not in asked.headers
    # and the attacker's own variant is only served to a client whose header chooses the same
    gz = await second.get(f"/users/{uid}", headers={"Accept-Encoding": "gzip"})
    assert gz.headers.get("Content-Encoding") in (None, "gzip")
