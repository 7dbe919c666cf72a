"""KeyBatcher on its own (real PostgreSQL behind it) and through the users API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import asyncpg
import pytest

from server import users
from server.app import create_app
from server.storage.batching import KeyBatcher
from server.storage.db import Database
from server.storage.migrations import apply_migrations
from tests.helpers import replace


@pytest.fixture
async def db(cfg: Any) -> AsyncIterator[Database]:
    pool = await asyncpg.create_pool(cfg.database.url, min_size=1, max_size=4)
    try:
        database = Database(pool, 2.0, 4)
        async with database.acquire() as conn:
            await apply_migrations(conn)
        yield database
    finally:
        await pool.close()


class CountingLoader:
    """users.get_users_by_ids on the real database, recording each batch it is given."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.batches: list[list[int]] = []

    async def __call__(self, ids: list[int]) -> Mapping[int, dict[str, Any]]:
        self.batches.append(sorted(ids))
        return await users.get_users_by_ids(self.db, ids)


async def test_concurrent_loads_share_one_query(db: Database) -> None:
    made = [await users.create_user(db, f"U{i}", f"u{i}@example.com") for i in range(5)]
    loader = CountingLoader(db)
    batcher: KeyBatcher[int, dict[str, Any]] = KeyBatcher(loader)
    ids = [u["id"] for u in made] + [made[0]["id"], 999_999]
    got = await asyncio.gather(*(batcher.load(i) for i in ids))
    assert [g["email"] if g else None for g in got] == [u["email"] for u in made] + [made[0]["email"], None]
    assert loader.batches == [sorted({*ids})]  # one query, duplicates asked once
    await batcher.close()


async def test_max_batch_splits_batches(db: Database) -> None:
    loader = CountingLoader(db)
    batcher: KeyBatcher[int, dict[str, Any]] = KeyBatcher(loader, max_batch=3)
    await asyncio.gather(*(batcher.load(i) for i in range(1, 8)))
    assert [len(b) for b in loader.batches] == [3, 3, 1]
    await batcher.close()


async def test_error_reaches_every_caller_of_the_batch() -> None:
    async def failing(keys: list[int]) -> Mapping[int, str]:
        raise ConnectionRefusedError("database went away")

    batcher: KeyBatcher[int, str] = KeyBatcher(failing)
    results = await asyncio.gather(*(batcher.load(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ConnectionRefusedError) for r in results)
    await batcher.close()


async def test_cancelling_one_caller_leaves_the_others() -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow(keys: list[int]) -> Mapping[int, str]:
        started.set()
        await release.wait()
        return {k: f"v{k}" for k in keys}

    batcher: KeyBatcher[int, str] = KeyBatcher(slow)
    first = asyncio.ensure_future(batcher.load(1))
    second = asyncio.ensure_future(batcher.load(1))
    other = asyncio.ensure_future(batcher.load(2))
    await started.wait()
    first.cancel()
    release.set()
    assert await second == "v1"
    assert await other == "v2"
    with pytest.raises(asyncio.CancelledError):
        await first
    await batcher.close()


async def test_close_waits_for_batches_in_flight_and_refuses_new_keys() -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow(keys: list[int]) -> Mapping[int, int]:
        started.set()
        await release.wait()
        return {k: k * 10 for k in keys}

    batcher: KeyBatcher[int, int] = KeyBatcher(slow)
    pending = asyncio.ensure_future(batcher.load(4))
    await started.wait()
    closing = asyncio.ensure_future(batcher.close())
    await asyncio.sleep(0)
    assert not closing.done()
    release.set()
    await closing
    assert await pending == 40
    with pytest.raises(RuntimeError):
        await batcher.load(5)


async def test_many_concurrent_reads_through_the_api_are_each_right(client: Any) -> None:
    made = []
    for i in range(30):
        resp = await client.post("/users", json={"name": f"N{i}", "email": f"n{i}@example.com"})
        made.append(await resp.json())
    wanted = [u["id"] for u in made] * 3 + [10**9]
    responses = await asyncio.gather(*(client.get(f"/users/{i}") for i in wanted))
    by_id = {u["id"]: u for u in made}
    for user_id, resp in zip(wanted, responses, strict=True):
        if user_id in by_id:
            assert resp.status == 200
            assert await resp.json() == by_id[user_id]
        else:
            assert resp.status == 404


async def test_read_after_write_sees_the_write(client: Any) -> None:
    user = await (await client.post("/users", json={"name": "Old", "email": "rw@example.com"})).json()
    for i in range(20):
        patch, _ = await asyncio.gather(
            client.patch(f"/users/{user['id']}", json={"name": f"New {i}"}),
            client.get(f"/users/{user['id']}"),  # concurrent read: old or new, both fine
        )
        assert patch.status == 200
        after = await (await client.get(f"/users/{user['id']}")).json()
        assert after["name"] == f"New {i}"  # a read that starts after the write returned


async def test_batching_can_be_switched_off(aiohttp_client: Any, cfg: Any) -> None:
    client = await aiohttp_client(create_app(replace(cfg, database={"batch_reads": False})))
    user = await (await client.post("/users", json={"name": "A", "email": "off@example.com"})).json()
    assert (await (await client.get(f"/users/{user['id']}")).json()) == user
    assert (await client.get("/users/777")).status == 404
