"""/health (no I/O) and /ready (real PostgreSQL and Redis checks), including Redis going away."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.app import create_app
from server.runtime.embedded import EmbeddedRedis
from tests.helpers import replace


async def test_health_is_ok(client: Any) -> None:
    resp = await client.get("/health")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}
    head = await client.head("/health")
    assert head.status == 200


async def test_ready_reports_each_check(client: Any) -> None:
    resp = await client.get("/ready")
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "ready"
    for name in ("postgres", "redis"):
        assert body["checks"][name]["ok"] is True
        assert body["checks"][name]["latency_ms"] >= 0


async def test_ready_is_503_naming_redis_when_it_stops(aiohttp_client: Any, cfg: Any, tmp_path: Path) -> None:
    # A Redis of this test's own: stopping the machine's shared one would break other tests.
    own = EmbeddedRedis(tmp_path / "redis")
    own.start()
    try:
        app = create_app(replace(cfg, redis={"url": own.url}, health={"check_timeout": 0.5}))
        client = await aiohttp_client(app)
        assert (await client.get("/ready")).status == 200
        own.stop()
        resp = await client.get("/ready")
        assert resp.status == 503
        assert resp.content_type == "application/problem+json"
        doc = await resp.json(content_type=None)
        assert "redis" in doc["detail"] and "postgres" not in doc["detail"]
        assert doc["checks"]["redis"]["ok"] is False
        assert doc["checks"]["postgres"]["ok"] is True
        assert resp.headers["Retry-After"]
        assert (await client.get("/health")).status == 200  # liveness does no I/O
        own.start()
        assert (await client.get("/ready")).status == 200  # and recovers by itself
    finally:
        own.stop()
