"""The access check of every route: five callers against each protected route, keys verified
from memory, revocation seen by another process within a second, nothing secret stored."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from server.access import ACCESS, GUARDS
from server.access.apikeys import KeyStore, split_key
from server.access.scopes import SCOPES
from server.app import create_app
from server.config import Config, ConfigError
from server.errors import Unauthorized
from server.routes import API
from server.runtime.embedded import EmbeddedRedis
from server.storage.pool import DB
from tests.helpers import PYTHON, ROOT, free_port, new_key, replace, until, wait_ready

CLOSED: dict[str, Any] = {"open_routes": (), "public_reads": False}


def closed(cfg: Config, **auth: Any) -> Config:
    """The shipped access rules (nothing open), public reads closed too unless asked."""
    return replace(cfg, auth={**CLOSED, **auth})


async def make_key(app: Any, scopes: list[str], name: str = "test", **kw: Any) -> tuple[int, str]:
    record, key = await new_key(app, scopes, name, **kw)
    return record.id, key


def count_lookups(access: Any) -> list[str]:
    """The prefixes `access` looks up in PostgreSQL from now on, as they are asked."""
    store = access.store
    real, asked = store.by_prefix, []

    async def counted(prefix: str) -> Any:
        asked.append(prefix)
        return await real(prefix)

    store.by_prefix = counted
    return asked


def _path(route: Any) -> str:
    """The route's path with every number variable set to 1."""
    return "".join(p if isinstance(p, str) else "1" for p in route.path.parts)


PROTECTED = [route for route in API if route.operation.scopes]


def test_every_write_job_fetch_admin_and_operator_route_needs_a_scope() -> None:
    open_ = {route.name for route in API if not route.operation.scopes}
    assert open_ == {"health", "ready", "openapi", "docs", "feed"}
    for route in API:
        if route.method != "GET" or route.name in ("metrics", "cache_stats", "task_status", "tasks"):
            assert not route.operation.public, route.name  # only reads of public data may be open
        for scope in route.operation.scopes:
            assert scope in SCOPES


async def test_five_callers_against_every_protected_route(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(closed(cfg)))
    app = client.app
    revoked_id, revoked = await make_key(app, ["admin", *SCOPES])
    await app[ACCESS].store.revoke("test", revoked_id)
    await app[ACCESS].changed(revoked_id)
    for route in PROTECTED:
        scopes = app[GUARDS][route.name].scopes
        also = list(route.operation.also)
        _, without = await make_key(app, [s for s in SCOPES if s not in scopes], f"not {route.name}")
        _, holder = await make_key(app, [scopes[0], *also], f"for {route.name}")
        path = _path(route)
        body = {} if route.method in ("POST", "PATCH") else None
        answers = {}
        for who, header in (
            ("no key", None),
            ("malformed", "Bearer not-a-key"),
            ("revoked", f"Bearer {revoked}"),
            ("without the scope", f"Bearer {without}"),
            ("with the scope", f"Bearer {holder}"),
        ):
            headers = {"Authorization": header} if header else {}
            async with client.request(route.method, path, json=body, headers=headers) as resp:
                answers[who] = resp.status
                if resp.status in (401, 403):
                    assert resp.content_type == "application/problem+json", (route.name, who)
                    challenge = resp.headers["WWW-Authenticate"]
                    assert challenge.startswith('Bearer realm="hotpath"'), (route.name, who)
                    if resp.status == 403:
                        assert 'error="insufficient_scope"' in challenge
                        assert (await resp.json())["scope"] == " ".join(scopes)
        assert answers["no key"] == 401, (route.name, answers)
        assert answers["malformed"] == 401, (route.name, answers)
        assert answers["revoked"] == 401, (route.name, answers)
        assert answers["without the scope"] == 403, (route.name, answers)
        assert answers["with the scope"] not in (401, 403), (route.name, answers)
        if also:  # one of the scopes without what is needed as well: 403 naming what is missing
            _, partial = await make_key(app, [scopes[0]], f"partly for {route.name}")
            resp = await client.request(
                route.method, path, json=body, headers={"Authorization": f"Bearer {partial}"}
            )
            assert resp.status == 403, route.name
            assert (await resp.json())["scope"] == " ".join(also)


async def test_public_reads_open_and_open_routes(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(closed(cfg, public_reads=True, open_routes=("user",))))
    assert (await client.get("/products")).status == 200
    assert (await client.get("/large-dataset")).status == 200
    assert (await client.get("/users/1")).status == 404  # opened for the migration
    assert (await client.get("/users")).status == 401  # not opened
    # an open route still checks a key that is sent: a bad one is refused, not passed
    resp = await client.get("/products", headers={"Authorization": "Bearer hp_000000000000_" + "A" * 43})
    assert resp.status == 401
    resp = await client.get("/products", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert resp.status == 401


async def test_wildcard_opens_every_route(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(closed(cfg, open_routes=("*",))))
    assert (await client.get("/users")).status == 200
    assert (await client.get("/metrics")).status == 200


async def test_the_database_never_holds_a_secret(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(closed(cfg)))
    key_id, key = await make_key(client.app, ["users:read"], "secretive")
    await client.app[ACCESS].store.rotate("test", key_id, 60)
    assert (await client.get("/users", headers={"Authorization": f"Bearer {key}"})).status == 200
    await client.app[ACCESS]._record_use()
    parts = split_key(key)
    assert parts is not None
    secret = parts[1]
    conn = await asyncpg.connect(cfg.database.url)
    try:
        for table in ("api_keys", "audit_log"):
            dump = await conn.fetchval(f"SELECT string_agg(t::text, ' ') FROM {table} t")
            assert dump and secret not in dump and key not in dump, table
            hexed = await conn.fetchval(
                f"SELECT encode(string_agg(t::text, ' ')::bytea, 'hex') FROM {table} t"
            )
            assert secret.encode().hex() not in hexed
        row = await conn.fetchrow(
            "SELECT last_used_at, length(digest) AS n FROM api_keys WHERE id = $1", key_id
        )
        assert row["last_used_at"] is not None and row["n"] == 32
    finally:
        await conn.close()


async def test_invented_keys_cost_no_database_lookup(aiohttp_client: Any, cfg: Config) -> None:
    """While the key table is complete (subscribed), an unknown prefix is refused from memory."""
    client = await aiohttp_client(create_app(closed(cfg)))
    access = client.app[ACCESS]
    await until(lambda: access.live, "the key table to be live")
    lookups = count_lookups(access)
    for i in range(200):
        key = f"hp_{i:012x}_" + "B" * 43
        resp = await client.get("/users", headers={"Authorization": f"Bearer {key}"})
        assert resp.status == 401
    assert lookups == []
    # and an invented key sent again is refused from the memo of unknown keys, before any lookup
    with pytest.raises(Unauthorized):
        await access.verify(f"hp_{0:012x}_" + "B" * 43)
    assert lookups == []


async def test_padded_headers_cannot_fill_the_memos(aiohttp_client: Any, cfg: Config) -> None:
    """The memo of verified credentials is keyed by the header's text: a key sent padded with
    spaces, or in another case of "Bearer", is the same key under many texts. Each padded text
    used to be kept (100,000 of up to 8 KiB each, 800 MB per process, from one key of any
    scope); now only the unpadded forms are, and unknown keys are kept by the key itself."""
    client = await aiohttp_client(create_app(closed(cfg, public_reads=True)))
    access = client.app[ACCESS]
    await until(lambda: access.live, "the key table to be live")
    _, key = await make_key(client.app, ["read"])
    for pad in range(2, 302):
        scheme = "bearer" if pad % 2 else "Bearer"
        resp = await client.get("/products", headers={"Authorization": f"{scheme}{' ' * pad}{key}"})
        assert resp.status == 200
    assert (await client.get("/products", headers={"Authorization": f"Bearer {key}"})).status == 200
    assert list(access.memo) == [f"Bearer {key}"]  # what a client sends is still kept
    invented = "hp_" + "0" * 12 + "_" + "C" * 43
    for pad in range(1, 101):
        resp = await client.get("/products", headers={"Authorization": f"Bearer{' ' * (pad * 50)}{invented}"})
        assert resp.status == 401
        resp = await client.get("/products", headers={"Authorization": f"Bearer {pad:08d}" + "x" * 4000})
        assert resp.status == 401
    assert list(access._unknown) == [invented]


async def test_a_revoked_key_is_refused_at_once_here(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(closed(cfg)))
    key_id, key = await make_key(client.app, ["users:read"])
    auth = {"Authorization": f"Bearer {key}"}
    assert (await client.get("/users", headers=auth)).status == 200
    await client.app[ACCESS].store.revoke("test", key_id)
    await client.app[ACCESS].changed(key_id)
    assert (await client.get("/users", headers=auth)).status == 401


async def test_an_expired_key_is_refused(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(closed(cfg)))
    store = KeyStore(client.app[DB])
    conn = await asyncpg.connect(cfg.database.url)
    try:
        soon = await conn.fetchval("SELECT now() + interval '1 second'")
    finally:
        await conn.close()
    record, key = await store.create("test", "short-lived", ["users:read"], expires_at=soon)
    await client.app[ACCESS].changed(record.id)
    auth = {"Authorization": f"Bearer {key}"}
    assert (await client.get("/users", headers=auth)).status == 200
    await until(lambda: time.time() > soon.timestamp(), "the expiry")
    resp = await client.get("/users", headers=auth)
    assert resp.status == 401 and "expired" in (await resp.json())["detail"]


async def test_rotation_keeps_the_old_key_for_its_overlap(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(closed(cfg)))
    access = client.app[ACCESS]
    old_id, old = await make_key(client.app, ["users:read"])
    _, new, token = await access.store.rotate("test", old_id, 3600)
    await access.changed(old_id)
    await access.changed(new.id)
    for key in (old, token):
        assert (await client.get("/users", headers={"Authorization": f"Bearer {key}"})).status == 200
    assert new.owner == old_id  # what the old key owns, the new one owns
    _, _, _ = await access.store.rotate("test", new.id, 0)
    await access.changed(new.id)
    assert (await client.get("/users", headers={"Authorization": f"Bearer {token}"})).status == 401


@pytest.mark.slow
async def test_a_revoke_reaches_another_process_within_a_second(aiohttp_client: Any, cfg: Config) -> None:
    here = await aiohttp_client(create_app(closed(cfg)))
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": cfg.database.url,
        "REDIS_URL": cfg.redis.url,
        "HOTPATH_AUTH_OPEN_ROUTES": "[]",
        "HOTPATH_FEED_TICKER": "false",
    }
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "run.py", "--port", str(port), "--workers", "1", cwd=ROOT, env=env,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{port}"
            await wait_ready(session, base, proc, timeout=60)
            key_id, key = await make_key(here.app, ["users:read"])
            auth = {"Authorization": f"Bearer {key}"}

            async def status() -> int:
                async with session.get(f"{base}/users", headers=auth) as resp:
                    return resp.status

            await until(lambda: _is(status(), 200), "the other process to know the new key", 5)
            await here.app[ACCESS].store.revoke("test", key_id)
            revoked_at = time.monotonic()
            await here.app[ACCESS].changed(key_id)
            await until(lambda: _is(status(), 401), "the other process to refuse the revoked key", 1.0)
            assert time.monotonic() - revoked_at < 1.0
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


async def test_a_hung_redis_is_noticed_and_a_revoke_still_holds_within_a_second(
    aiohttp_client: Any, cfg: Config, tmp_path: Path
) -> None:
    """A Redis that stops answering (stopped, or behind a network that drops packets) raises
    nothing on a quiet subscription: the other process kept trusting its table and its memo, and
    served a revoked key for as long as Redis hung (40 s and more). Now the subscription is
    probed, found silent, and the process verifies against PostgreSQL within a second."""
    redis = EmbeddedRedis(tmp_path / "redis")  # our own: the machine's must keep running
    redis.start()
    try:
        config = closed(replace(cfg, redis={"url": redis.url, "socket_timeout": 0.5, "connect_timeout": 0.5}))
        here = await aiohttp_client(create_app(config))
        there = await aiohttp_client(create_app(config))
        access = there.app[ACCESS]
        await until(lambda: here.app[ACCESS].live and access.live, "both to hear key changes")
        key_id, key = await make_key(here.app, ["users:read"])
        auth = {"Authorization": f"Bearer {key}"}

        async def status() -> int:
            async with there.get("/users", headers=auth) as resp:
                return resp.status

        await until(lambda: _is(status(), 200), "the other app to know the new key", 5)
        assert redis.proc is not None
        redis.proc.send_signal(signal.SIGSTOP)
        try:
            # its announcement could not get through: only the other side's own check can see it
            await here.app[ACCESS].store.revoke("test", key_id)
            revoked_at = time.monotonic()
            await until(lambda: _is(status(), 401), "the other app to refuse the revoked key", 1.5)
            assert time.monotonic() - revoked_at < 1.5
            assert not access.live
            # meanwhile the table reloaded from PostgreSQL about once a second answers: a flood of
            # invented keys costs no query each
            lookups = count_lookups(access)
            for i in range(100):
                invented = {"Authorization": f"Bearer hp_{i:012x}_" + "C" * 43}
                assert (await there.get("/users", headers=invented)).status == 401
            assert len(lookups) <= 5, lookups
        finally:
            redis.proc.send_signal(signal.SIGCONT)
        await until(lambda: access.live, "the subscription to be back", 10)
        assert await status() == 401
    finally:
        redis.stop()


async def _is(status: Any, expected: int) -> bool:
    return bool(await status == expected)


async def test_docs_show_each_operations_scopes(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(closed(cfg)))
    page = await (await client.get("/docs")).text()
    section = page[page.index('<section id="process_urls">') :]
    section = section[: section.index("</section>")]
    assert "<code>fetch</code>" in section
    products = page[page.index('<section id="products">') :]
    assert "open without a key while auth.public_reads is on" in products[: products.index("</section>")]
    health = page[page.index('<section id="health">') :]
    assert "Open: no key needed." in health[: health.index("</section>")]


def test_open_routes_must_name_routes(cfg: Config) -> None:
    with pytest.raises(ConfigError, match=r"auth\.open_routes"):
        create_app(closed(cfg, open_routes=("user", "no_such_route")))


async def test_admin_routes_are_never_open(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(closed(cfg, open_routes=("*",))))
    assert (await client.get("/users")).status == 200
    assert (await client.get("/admin/keys")).status == 401
    with pytest.raises(ConfigError, match="never open"):
        create_app(closed(cfg, open_routes=("admin_keys",)))
