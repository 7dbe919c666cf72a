"""Rate limits per verified client: a key counts as itself (its family), invented keys never get
a bucket, and a key's own rate (its tier) replaces the route's policy."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
import redis.asyncio as aioredis

from middlewares import chain_for
from middlewares.ratelimit import ratelimit_middleware
from server.access import ACCESS, KeyStore
from server.access.scopes import READ, USERS_WRITE
from server.app import create_app
from server.config import Config
from server.ratelimit import RATE_LIMITER
from server.ratelimit.policy import build_policies, key_policy
from server.ratelimit.windows import KEY_PREFIX
from server.storage.pool import DB
from tests.helpers import bearer, new_key, replace

ALIAS = "X-API-Key"


def invented_key() -> str:
    """A well-formed key (hp_<prefix>_<secret>) that no one ever made."""
    return f"hp_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"


def auth_on(cfg: Config, policies: dict[str, str], open_routes: tuple[str, ...] = ()) -> Config:
    return replace(
        cfg, auth={"open_routes": open_routes}, ratelimit={"policies": policies, "key_header": ALIAS}
    )


async def make_key(client: Any, name: str, scopes: tuple[str, ...], rate: str | None = None) -> str:
    _, token = await new_key(client.app, scopes, name, rate=rate)
    return token


async def buckets(cfg: Config) -> list[str]:
    r = aioredis.from_url(cfg.redis.url)
    try:
        return sorted(k.decode() for k in await r.keys(f"{KEY_PREFIX}:*"))
    finally:
        await r.aclose()


async def statuses(client: Any, path: str, n: int, headers: dict[str, str], method: str = "GET") -> list[int]:
    out = []
    for i in range(n):
        body = {"name": f"U{i}", "email": f"{secrets.token_hex(6)}@example.com"} if method == "POST" else None
        async with client.request(method, path, headers=headers, json=body) as resp:
            out.append(resp.status)
    return out


# ---------------------------------------------------------------- invented keys


@pytest.mark.parametrize("open_routes", [(), ("protected",)], ids=["key required", "open route"])
async def test_a_made_up_key_per_request_never_passes_the_rate_limit(
    aiohttp_client: Any, cfg: Config, open_routes: tuple[str, ...]
) -> None:
    """The bypass of old: a new key per request was a fresh bucket each time. Now each one is
    a 401 from the access layer before the limiter, sent as Bearer or under key_header alike,
    on a route that needs a key and on one open to callers without one."""
    client = await aiohttp_client(create_app(auth_on(cfg, {"protected": "5/minute"}, open_routes)))
    seen = []
    for i in range(20):
        key = invented_key()
        headers = bearer(key) if i % 2 else {ALIAS: key}
        async with client.get("/protected-endpoint", headers=headers) as resp:
            seen.append(resp.status)
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert "RateLimit" not in resp.headers
    assert seen == [401] * 20
    assert await buckets(cfg) == []  # the limiter never counted them: no bucket in Redis
    # the check looks where the buckets are: a real key's request makes one
    key = await make_key(client, "real", (READ,))
    assert await statuses(client, "/protected-endpoint", 1, bearer(key)) == [200]
    assert await buckets(cfg) != []


async def test_where_no_key_is_verified_the_address_counts(aiohttp_client: Any, cfg: Config) -> None:
    """Paths no route matches have no access check: a key header there is not verified, so it
    buys nothing; the default policy counts the caller's address."""
    config = replace(auth_on(cfg, {}), ratelimit={"policies": {}, "default": "3/minute", "key_header": ALIAS})
    client = await aiohttp_client(create_app(config))
    seen = [(await client.get("/no/such/path", headers={ALIAS: invented_key()})).status for _ in range(5)]
    assert seen == [404, 404, 404, 429, 429]
    assert all(k.endswith(":ip:127.0.0.1") for k in await buckets(cfg))


# ---------------------------------------------------------------- per key


async def test_each_key_has_its_own_bucket_whatever_header_carries_it(
    aiohttp_client: Any, cfg: Config
) -> None:
    client = await aiohttp_client(create_app(auth_on(cfg, {"protected": "2/minute"})))
    first, second, third = [await make_key(client, name, (READ,)) for name in ("first", "second", "third")]
    assert await statuses(client, "/protected-endpoint", 3, bearer(first)) == [200, 200, 429]
    assert await statuses(client, "/protected-endpoint", 3, {ALIAS: second}) == [200, 200, 429]
    # one key sent as Bearer and under the alias header: one bucket
    assert await statuses(client, "/protected-endpoint", 1, bearer(third)) == [200]
    assert await statuses(client, "/protected-endpoint", 2, {ALIAS: third}) == [200, 429]
    # three buckets, named by key family (its id), never by the secret
    keys = await buckets(cfg)
    assert len(keys) == 3 and all(k.startswith(f"{KEY_PREFIX}:protected:key:") for k in keys)
    assert not any(key in " ".join(keys) for key in (first, second, third))


async def test_a_rotated_key_shares_its_budget_with_its_replacement(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(auth_on(cfg, {"protected": "3/minute"})))
    store = KeyStore(client.app[DB])
    record, old = await store.create("test", "rotating", (READ,))
    await client.app[ACCESS].changed(record.id)
    assert await statuses(client, "/protected-endpoint", 2, bearer(old)) == [200, 200]
    _, new_record, new = await store.rotate("test", record.id, 3600)
    await client.app[ACCESS].changed(new_record.id)
    assert await statuses(client, "/protected-endpoint", 2, bearer(new)) == [200, 429]


# ---------------------------------------------------------------- tiers


async def test_a_keys_own_rate_replaces_the_routes_policy(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(auth_on(cfg, {"protected": "10/minute"})))
    tiered = await make_key(client, "tiered", (READ,), rate="3/minute")
    plain = await make_key(client, "plain", (READ,))
    async with client.get("/protected-endpoint", headers=bearer(tiered)) as resp:
        assert resp.status == 200
        assert resp.headers["RateLimit-Policy"] == '"tier-3per60s-60s";q=3;w=60'
        assert (await resp.json())["rate_info"]["limit"] == 3
    assert await statuses(client, "/protected-endpoint", 3, bearer(tiered)) == [200, 200, 429]
    # a key without a rate of its own keeps the route's 10/minute
    assert await statuses(client, "/protected-endpoint", 11, bearer(plain)) == [200] * 10 + [429]
    keys = await buckets(cfg)
    assert any(":tier-3per60s:key:" in k for k in keys)
    assert any(":protected:key:" in k for k in keys)


async def test_a_tier_bounds_every_write_and_is_one_budget(aiohttp_client: Any, cfg: Config) -> None:
    """POST /users has no policy in this config: anonymous callers and keys without a rate are
    not limited there, a key with a rate is, and its budget is the same one on every route."""
    client = await aiohttp_client(create_app(auth_on(cfg, {"protected": "10/minute"})))
    tiered = await make_key(client, "tiered", (READ, USERS_WRITE), rate="3/minute")
    plain = await make_key(client, "plain", (READ, USERS_WRITE))
    assert await statuses(client, "/users", 6, bearer(plain), "POST") == [201] * 6
    assert await statuses(client, "/users", 4, bearer(tiered), "POST") == [201, 201, 201, 429]
    assert await statuses(client, "/protected-endpoint", 1, bearer(tiered)) == [429]
    assert await statuses(client, "/protected-endpoint", 1, bearer(plain)) == [200]


def test_writes_carry_the_limiter_even_without_a_policy(cfg: Config) -> None:
    bare = replace(cfg, ratelimit={"policies": {}})
    assert ratelimit_middleware in chain_for("users_create", bare, "POST")
    assert ratelimit_middleware in chain_for("user_delete", bare, "DELETE")
    assert ratelimit_middleware not in chain_for("users", bare, "GET")
    off = replace(bare, ratelimit={"enabled": False})
    exempt = replace(bare, ratelimit={"exempt": ("users_create",)})
    assert ratelimit_middleware not in chain_for("users_create", off, "POST")
    assert ratelimit_middleware not in chain_for("users_create", exempt, "POST")


def test_tier_policies_are_named_by_their_windows() -> None:
    assert key_policy("1000/minute").name == "tier-1000per60s"
    assert (
        key_policy("100/hour, 10/minute").name
        == key_policy("10/60s,100/3600s").name
        == "tier-10per60s-100per3600s"
    )
    assert key_policy("3/minute") != key_policy("4/minute")
    with pytest.raises(ValueError, match="reserved"):
        build_policies(["tier-x"], {}, "1/minute", [])


async def test_tiers_are_kept_per_rate_and_a_bad_one_falls_back(client: Any) -> None:
    limiter = client.app[RATE_LIMITER]
    policy = limiter.tier("5/minute", "protected")
    assert limiter.tiers["5/minute"] is policy
    # a rate that no longer parses (a hand-edited row): the route's own policy
    assert limiter.tier("lots", "protected") is limiter.policies["protected"]
    assert "lots" not in limiter.tiers
    # so does a row made before windows were bounded (its limit past 64 bits answered 500s)
    huge = "999999999999999999999/second"
    assert limiter.tier(huge, "protected") is limiter.policies["protected"]
