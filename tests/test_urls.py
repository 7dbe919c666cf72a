"""server/urls.py: a URL's database replaced for every scheme hotpath connects with."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import parse_url

from server.urls import mask_url, with_database


@pytest.mark.parametrize(
    ("url", "db", "expected"),
    [
        ("redis://127.0.0.1:6379/0", 3, "redis://127.0.0.1:6379/3"),
        ("redis://cache", 4, "redis://cache/4"),
        ("redis://:pw@cache:6379/1?db=9&socket_timeout=2", 5, "redis://:pw@cache:6379/5?socket_timeout=2"),
        (
            "rediss://localhost:6380/0?ssl_ca_certs=/etc/ca.pem",
            2,
            "rediss://localhost:6380/2?ssl_ca_certs=/etc/ca.pem",
        ),
        # the embedded Valkey's form: an empty authority, the socket as path, db in the query
        ("unix:///tmp/x/redis.sock?db=0", 7, "unix:///tmp/x/redis.sock?db=7"),
        ("unix:///run/redis.sock", 1, "unix:///run/redis.sock?db=1"),
        ("unix:///run/redis.sock?password=s&db=2&x=y", 3, "unix:///run/redis.sock?password=s&x=y&db=3"),
    ],
)
def test_redis_urls(url: str, db: int, expected: str) -> None:
    out = with_database(url, db)
    assert out == expected
    assert parse_url(out)["db"] == db  # what redis-py will actually select


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://postgres@127.0.0.1:5432/postgres", "postgresql://postgres@127.0.0.1:5432/app"),
        ("postgres://h", "postgres://h/app"),
        ("postgresql://u:p@h/db?sslmode=disable&dbname=z", "postgresql://u:p@h/app?sslmode=disable"),
        # embedded PostgreSQL: no host in the authority, the socket directory as ?host=
        ("postgresql://postgres:@/hotpath?host=/tmp/pg", "postgresql://postgres:@/app?host=/tmp/pg"),
        ("postgresql:///hotpath?host=/tmp/pg", "postgresql:///app?host=/tmp/pg"),
    ],
)
def test_postgres_urls(url: str, expected: str) -> None:
    assert with_database(url, "app") == expected


async def test_postgres_socket_url_connects(database_url: str) -> None:
    """The rewritten URL is one asyncpg accepts and that reaches the named database."""
    import asyncpg

    conn = await asyncpg.connect(with_database(database_url, "postgres"))
    try:
        assert await conn.fetchval("SELECT current_database()") == "postgres"
    finally:
        await conn.close()


def test_database_names_are_quoted() -> None:
    assert with_database("postgresql://h/x", "a b/c") == "postgresql://h/a%20b%2Fc"


@pytest.mark.parametrize(
    ("url", "db"), [("http://h/0", 1), ("redis:/h/0", 1), ("redis://h/0", "main"), ("no url", 1)]
)
def test_refused(url: str, db: str | int) -> None:
    with pytest.raises(ValueError):
        with_database(url, db)


def test_mask_url_keeps_the_socket_form() -> None:
    assert mask_url("postgresql://a:pw@/db?host=/s") == "postgresql://a:***@/db?host=/s"
    assert mask_url("unix://:pw@/run/redis.sock?db=0") == "unix://:***@/run/redis.sock?db=0"
    assert mask_url("unix:///run/redis.sock?db=0") == "unix:///run/redis.sock?db=0"
