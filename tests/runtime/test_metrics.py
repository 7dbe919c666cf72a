"""GET /metrics: Prometheus text that parses, counts what happened, and is not for everyone."""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.config import Config
from server.runtime.metrics import BUCKETS, Metrics
from tests.helpers import replace


def samples(text: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def value(found: dict[str, list[Any]], name: str, **labels: str) -> float:
    return sum(s.value for s in found.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


async def test_requests_latency_and_gauges_are_counted(client: Any) -> None:
    for _ in range(7):
        assert (await client.get("/health")).status == 200
    assert (await client.get("/users/424242")).status == 404
    assert (await client.get("/no/such/thing")).status == 404
    assert (await client.request("PROPFIND", "/health")).status == 405
    for _ in range(3):
        await client.get("/protected-endpoint")

    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    found = samples(await resp.text())

    assert value(found, "hotpath_http_requests_total", route="health", method="GET", status="200") == 7
    assert value(found, "hotpath_http_requests_total", route="user", status="404") == 1
    assert value(found, "hotpath_http_requests_total", route="unmatched", status="404") == 1
    # methods outside the usual few share one label, so a client cannot invent label values
    assert value(found, "hotpath_http_requests_total", route="unmatched", method="OTHER", status="405") == 1
    assert value(found, "hotpath_http_request_duration_seconds_count", route="health") == 7
    assert value(found, "hotpath_http_request_duration_seconds_bucket", route="health", le="+Inf") == 7
    assert value(found, "hotpath_http_request_duration_seconds_sum", route="health") > 0
    assert value(found, "hotpath_ratelimit_decisions_total", route="protected", decision="allowed") == 3
    # the scrape itself is in flight while it renders
    assert value(found, "hotpath_http_requests_in_flight") == 1
    assert value(found, "hotpath_db_pool_connections", state="max") == 10
    assert value(found, "hotpath_db_pool_connections", state="open") >= 1
    assert "hotpath_db_pool_waiting" in found


def test_folded_durations_land_in_their_le_buckets() -> None:
    metrics = Metrics()
    seen = [0.0001, 0.0005, 0.0005001, 0.001, 0.3, 10.0, 11.5, 0.0002]
    for seconds in seen[:5]:
        metrics.durations("r", "GET", 200).append(seconds)
    metrics.fold()  # a second batch adds to the first one's counts
    for seconds in seen[5:]:
        metrics.durations("r", "GET", 200).append(seconds)
    metrics.durations("r", "BREW", 418).append(0.002)  # an unknown method counts as OTHER
    snap = metrics.snapshot()
    expected = [0.0] * (len(BUCKETS) + 2)
    for seconds in seen:  # what counting each request as it ended gave: le, then +Inf
        expected[bisect_left(BUCKETS, seconds)] += 1
    expected[-1] = sum(seen)
    row = metrics.rows[("r", "GET", 200)]
    assert row[:-1] == expected[:-1] and row[-1] == pytest.approx(expected[-1])
    assert sorted(map(tuple, snap["requests"])) == [("r", "GET", 200, 8.0), ("r", "OTHER", 418, 1.0)]
    assert all(not durations for durations in metrics.pending.values())


async def test_token_protects_metrics(aiohttp_client: Any, cfg: Config) -> None:
    """metrics.token is an alias of a key with the metrics scope (the route is not open)."""
    closed = replace(cfg, metrics={"token": "s3cret"}, auth={"open_routes": ()})
    client = await aiohttp_client(create_app(closed))
    resp = await client.get("/metrics")
    assert resp.status == 401
    assert resp.headers["Content-Type"] == "application/problem+json"
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="hotpath"'
    resp = await client.get("/metrics", headers={"Authorization": "Bearer wrong"})
    assert resp.status == 401
    assert "invalid_token" in resp.headers["WWW-Authenticate"]
    assert (await client.get("/metrics", headers={"Authorization": "Bearer s3cret"})).status == 200


async def test_metrics_need_a_key_even_from_loopback(aiohttp_client: Any, cfg: Config) -> None:
    """Without metrics.token, /metrics needs a key with the metrics scope: being a loopback
    peer is no credential (nginx on the same host is one too)."""
    client = await aiohttp_client(create_app(replace(cfg, auth={"open_routes": ()})))
    resp = await client.get("/metrics")
    assert resp.status == 401
    assert (await resp.json())["status"] == 401


async def test_disabled_metrics_are_not_served(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(replace(cfg, metrics={"enabled": False})))
    assert (await client.get("/health")).status == 200
    assert (await client.get("/metrics")).status == 404


async def test_docs_page_lists_every_operation(client: Any) -> None:
    resp = await client.get("/docs")
    assert resp.status == 200 and resp.content_type == "text/html"
    page = await resp.text()
    spec = await (await client.get("/openapi.json")).json()
    for path, item in spec["paths"].items():
        for method in item.keys() - {"parameters", "summary", "description", "servers"}:
            assert f"{method.upper()} {path}" in page
    assert "<script" not in page  # self-contained and static


async def test_feed_and_job_gauges(aiohttp_client: Any, cfg: Config, tmp_path: Any) -> None:
    from tests.jobs.test_jobs import FAST, truncate_jobs

    await truncate_jobs(cfg)
    client = await aiohttp_client(create_app(replace(cfg, jobs=FAST, embedded={"data_dir": str(tmp_path)})))
    stream = await client.get("/events?channels=users")
    note = {"recipient": "ops@example.com", "subject": "s", "content": "c"}
    task_id = (await (await client.post("/send-notification", json=note)).json())["task_id"]
    await (await client.get(f"/tasks/{task_id}/events")).read()  # ends when the task is final
    found = samples(await (await client.get("/metrics")).text())
    assert value(found, "hotpath_feed_subscribers") == 1
    assert value(found, "hotpath_jobs", state="completed") == 1
    assert value(found, "hotpath_jobs", state="queued") == 0
    stream.close()
    await truncate_jobs(cfg)


async def test_cache_counters(client: Any) -> None:
    await client.post("/users", json={"name": "M", "email": "m@example.com"})
    for _ in range(3):
        assert (await client.get("/users/1")).status == 200
    found = samples(await (await client.get("/metrics")).text())
    assert value(found, "hotpath_cache_lookups_total", layer="l1", result="hit") >= 2
    assert value(found, "hotpath_cache_events_total", event="loads") >= 1
    assert value(found, "hotpath_cache_l1", unit="entries") >= 1
