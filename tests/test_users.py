"""Users API through the real app on a real PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from server.app import create_app
from server.errors import Unavailable
from server.storage.db import Database
from server.storage.pool import DB
from tests.helpers import replace, until
from tests.pgproxy import Relay

PROBLEM = "application/problem+json"


async def make_user(client: Any, name: str = "Ann", email: str = "ann@example.com") -> dict[str, Any]:
    resp = await client.post("/users", json={"name": name, "email": email})
    assert resp.status == 201, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def problem(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == PROBLEM
    doc = await resp.json(content_type=PROBLEM)
    assert doc["status"] == status
    assert doc["title"]
    assert "Traceback" not in str(doc)
    return doc  # type: ignore[no-any-return]


async def test_create_then_get(client: Any) -> None:
    resp = await client.post("/users", json={"name": "  Ann Lee ", "email": "ann@example.com"})
    assert resp.status == 201
    user = await resp.json()
    assert resp.headers["Location"] == f"/users/{user['id']}"
    assert user["name"] == "Ann Lee"
    assert user["email"] == "ann@example.com"
    created = datetime.fromisoformat(user["created_at"])
    assert created.tzinfo is not None
    got = await client.get(resp.headers["Location"])
    assert got.status == 200
    assert await got.json() == user


async def test_get_missing_is_404_problem(client: Any) -> None:
    doc = await problem(await client.get("/users/12345"), 404)
    assert "12345" in doc["detail"]
    # beyond bigint: cannot exist, must not reach the driver as an overflow
    await problem(await client.get("/users/99999999999999999999999"), 404)
    await problem(await client.get("/users/abc"), 404)


async def test_patch_updates_fields_and_updated_at(client: Any) -> None:
    user = await make_user(client)
    resp = await client.patch(f"/users/{user['id']}", json={"name": "Ann B."})
    assert resp.status == 200
    updated = await resp.json()
    assert updated["name"] == "Ann B."
    assert updated["email"] == user["email"]
    assert updated["created_at"] == user["created_at"]
    assert datetime.fromisoformat(updated["updated_at"]) > datetime.fromisoformat(user["updated_at"])
    assert (await (await client.get(f"/users/{user['id']}")).json())["name"] == "Ann B."


async def test_patch_missing_and_conflict(client: Any) -> None:
    await problem(await client.patch("/users/999", json={"name": "X"}), 404)
    a = await make_user(client, "A", "a@example.com")
    await make_user(client, "B", "b@example.com")
    doc = await problem(await client.patch(f"/users/{a['id']}", json={"email": "B@EXAMPLE.com"}), 409)
    assert "B@EXAMPLE.com" in doc["detail"]
    await problem(await client.patch(f"/users/{a['id']}", json={}), 422)


async def test_delete(client: Any) -> None:
    user = await make_user(client)
    resp = await client.delete(f"/users/{user['id']}")
    assert resp.status == 204
    assert await resp.read() == b""
    await problem(await client.get(f"/users/{user['id']}"), 404)
    await problem(await client.delete(f"/users/{user['id']}"), 404)


async def test_duplicate_email_is_409_case_insensitive(client: Any) -> None:
    await make_user(client, "A", "Same@Example.com")
    doc = await problem(await client.post("/users", json={"name": "B", "email": "same@example.COM"}), 409)
    assert doc["type"] == "/problems/conflict"


async def test_duplicate_email_under_concurrent_inserts(client: Any) -> None:
    responses = await asyncio.gather(
        *(client.post("/users", json={"name": f"U{i}", "email": "race@example.com"}) for i in range(20))
    )
    statuses = sorted(r.status for r in responses)
    assert statuses == [201] + [409] * 19
    listing = await (await client.get("/users")).json()
    assert [u["email"] for u in listing["items"]] == ["race@example.com"]


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({}, {"name", "email"}),
        ({"name": "A"}, {"email"}),
        ({"email": "a@example.com"}, {"name"}),
        ({"name": "", "email": "a@example.com"}, {"name"}),
        ({"name": "   ", "email": "a@example.com"}, {"name"}),
        ({"name": "x" * 201, "email": "a@example.com"}, {"name"}),
        ({"name": "a\x00b", "email": "a@example.com"}, {"name"}),
        ({"name": 5, "email": "a@example.com"}, {"name"}),
        ({"name": "A", "email": "not-an-email"}, {"email"}),
        ({"name": "A", "email": "a@b"}, {"email"}),
        ({"name": "A", "email": "a b@example.com"}, {"email"}),
        ({"name": "A", "email": ["a@example.com"]}, {"email"}),
        ({"name": "A", "email": "a@example.com", "admin": True}, {"admin"}),
        ({"name": None, "email": None, "id": 3}, {"name", "email", "id"}),
    ],
)
async def test_validation_errors_name_every_field(
    client: Any, body: dict[str, Any], fields: set[str]
) -> None:
    doc = await problem(await client.post("/users", json=body), 422)
    assert doc["type"] == "/problems/validation"
    assert {e["field"] for e in doc["errors"]} == fields
    assert all(e["message"] for e in doc["errors"])


async def test_name_of_exactly_200_chars_is_accepted(client: Any) -> None:
    user = await make_user(client, "x" * 200, "long@example.com")
    assert len(user["name"]) == 200


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"42", b"null"])
async def test_non_object_json_is_422(client: Any, body: bytes) -> None:
    resp = await client.post("/users", data=body, headers={"Content-Type": "application/json"})
    await problem(resp, 422)


@pytest.mark.parametrize("body", [b"", b"   ", b"{bad json", b'{"name": "A",}', b"\xff\xfe", b"NaN"])
async def test_malformed_or_missing_body_is_400(client: Any, body: bytes) -> None:
    resp = await client.post("/users", data=body, headers={"Content-Type": "application/json"})
    await problem(resp, 400)


async def test_wrong_content_type_is_415(client: Any) -> None:
    resp = await client.post(
        "/users", data=b"name=A", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    doc = await problem(resp, 415)
    assert "application/json" in doc["detail"]


async def test_body_over_limit_is_413(aiohttp_client: Any, cfg: Any) -> None:
    client = await aiohttp_client(create_app(replace(cfg, server={"client_max_size": 2048})))
    body = {"name": "A", "email": "a@example.com", "pad": "x" * 4096}
    await problem(await client.post("/users", json=body), 413)
    assert (await client.get("/users")).status == 200


async def test_wrong_method_is_405_with_allow(client: Any) -> None:
    resp = await client.put("/users/1", json={})
    await problem(resp, 405)
    assert set(resp.headers["Allow"].split(",")) >= {"GET", "PATCH", "DELETE"}


async def test_pagination_walks_every_user_once(client: Any) -> None:
    created = [await make_user(client, f"U{i}", f"u{i}@example.com") for i in range(7)]
    seen: list[int] = []
    url = "/users?limit=3"
    pages = 0
    while url:
        resp = await client.get(url)
        assert resp.status == 200
        page = await resp.json()
        assert page["limit"] == 3
        seen += [u["id"] for u in page["items"]]
        url = page["next"]
        if url:
            assert resp.headers["Link"] == f'<{url}>; rel="next"'
        pages += 1
    assert seen == [u["id"] for u in created]
    assert pages == 3


async def test_pagination_edges(client: Any) -> None:
    empty = await (await client.get("/users")).json()
    assert empty == {"items": [], "limit": 50, "next": None}
    users = [await make_user(client, f"U{i}", f"u{i}@example.com") for i in range(4)]
    # a page that ends exactly at the last user still offers a next link, which is empty
    full = await (await client.get("/users?limit=4")).json()
    assert len(full["items"]) == 4
    last = await (await client.get(full["next"])).json()
    assert last == {"items": [], "limit": 4, "next": None}
    after = await (await client.get(f"/users?after={users[1]['id']}")).json()
    assert [u["id"] for u in after["items"]] == [u["id"] for u in users[2:]]
    for after_max in ("9223372036854775807", "99999999999999999999"):
        beyond = await (await client.get(f"/users?after={after_max}")).json()
        assert beyond["items"] == []


async def test_pagination_limit_capped_and_validated(client: Any, cfg: Any) -> None:
    capped = await (await client.get("/users?limit=100000")).json()
    assert capped["limit"] == cfg.users.max_limit
    for query in ("limit=0", "limit=-1", "limit=abc", "after=-5", "after=1.5"):
        doc = await problem(await client.get(f"/users?{query}"), 422)
        assert doc["errors"][0]["field"] == query.split("=")[0]


async def test_profile_has_derived_fields(client: Any) -> None:
    user = await make_user(client, "Ann", "ann@Example.org")
    resp = await client.get(f"/users/{user['id']}/profile")
    assert resp.status == 200
    profile = await resp.json()
    for key in ("id", "name", "email", "created_at"):
        assert profile[key] == user[key]
    assert profile["email_domain"] == "Example.org"
    assert profile["account_age_days"] == 0
    assert profile["member_since"] == user["created_at"][:10]
    assert profile["has_been_updated"] is False
    await problem(await client.get("/users/424242/profile"), 404)


async def test_starved_pool_answers_503_with_retry_after(aiohttp_client: Any, cfg: Any) -> None:
    app = create_app(replace(cfg, database={"min_size": 1, "max_size": 1, "acquire_timeout": 0.2}))
    client = await aiohttp_client(app)
    async with app[DB].acquire():  # hold the only connection
        resp = await client.get("/users/1")
        doc = await problem(resp, 503)
    assert resp.headers["Retry-After"].isdigit()
    assert doc["type"] == "/problems/unavailable"
    assert (await client.get("/users/1")).status == 404  # pool free again: back to normal


async def test_database_socket_gone_is_503_not_500(tmp_path: Path) -> None:
    """While PostgreSQL restarts its Unix socket does not exist: a new connection fails with a
    plain OSError (FileNotFoundError), which must read as "unavailable", not as a bug."""
    pool = await asyncpg.create_pool(f"postgresql://postgres@/x?host={tmp_path}", min_size=0, max_size=1)
    try:
        db = Database(pool, acquire_timeout=2.0, max_size=1)
        with pytest.raises(Unavailable):
            await db.fetchval("SELECT 1")
        with pytest.raises(Unavailable):  # and the gate was released: a second try gets as far
            await db.fetchval("SELECT 1")
    finally:
        await pool.close()


async def test_connection_killed_mid_statement_is_503_and_not_reused(aiohttp_client: Any, cfg: Any) -> None:
    """The soak's PostgreSQL-restart drill gave one client a 500: the server's FATAL reached
    asyncpg between a statement's Parse and Bind, and asyncpg raised InternalClientError. The
    relay makes that timing certain. The request gets 503 + Retry-After, and the pool (one
    connection, no reset query on release) never hands that connection out again: asyncpg
    aborted it, PoolConnectionHolder.release() sees it closed and drops it."""
    async with Relay(cfg.database.url) as relay:
        app = create_app(replace(cfg, database={"url": relay.url, "min_size": 1, "max_size": 1}))
        client = await aiohttp_client(app)
        admin = await asyncpg.connect(cfg.database.url)
        try:
            relay.hold_after(b"FROM users WHERE id = ANY")
            pending = asyncio.create_task(client.get("/users/1"))
            await until(relay.described, "the server's answer to the query's Describe, held")
            sql = (
                "SELECT pid FROM pg_stat_activity"
                " WHERE pid <> pg_backend_pid() AND query LIKE '%FROM users WHERE id = ANY%'"
            )
            victim = await admin.fetchval(sql)
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", victim)
            resp = await pending
            doc = await problem(resp, 503)
            assert doc["type"] == "/problems/unavailable" and resp.headers["Retry-After"] == "1"
            await problem(await client.get("/users/1"), 404)  # the same pool slot, a new connection
            async with app[DB].acquire() as conn:
                assert conn.get_server_pid() != victim
        finally:
            await admin.close()
            await client.close()  # while the relay still carries its connections
