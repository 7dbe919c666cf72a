"""Prometheus metrics: cheap per-process accumulators, shared between workers through snapshots.

prometheus-client's own multi-process mode writes every observation into an mmap'ed file
under a lock: a labelled counter plus a histogram cost about 5 µs a request here, a quarter
of a small request's whole budget. hotpath counts in plain dicts instead (about 0.5 µs), and
each worker writes its totals as one JSON snapshot file every `metrics.flush_interval`
seconds. `GET /metrics`, on whichever worker answers, adds its own live totals to every
other worker's latest snapshot and renders them with prometheus-client's exposition code.
Counters and histograms of workers that have exited stay in the sum (so totals never go
backwards after a restart); gauges count only for workers still alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from bisect import bisect_right
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from server.config import CONFIG
from server.storage.db import Database
from server.storage.pool import DB

# Request duration buckets in seconds, from a cache hit to a slow export.
BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

# Method labels are bounded: aiohttp accepts any token as a method, the catch-all route answers it.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family a feature reports: name, kind, help, label names, samples."""

    name: str
    kind: str  # "counter" or "gauge"
    help: str
    labels: tuple[str, ...]
    samples: dict[tuple[str, ...], float]


Source = Callable[[], Iterable[Family]]

# Counters that code counts into with Metrics.inc(name, *labels): name -> (help, label names).
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "hotpath_ratelimit_decisions": ("Rate-limit decisions, by route and decision", ("route", "decision")),
    "hotpath_fetch_results": (
        "URLs fetched by POST /process-urls, by outcome (ok or error category)",
        ("outcome",),
    ),
}


@dataclass(slots=True)
class Metrics:
    """This process's request metrics, plus the feature sources read at snapshot time."""

    shared_dir: Path | None = None
    # (route, method, status) -> duration bucket counts (len(BUCKETS) + 1, the last for +Inf),
    # then the sum of seconds; counts and per-route histograms are derived from them when a
    # snapshot is taken.
    rows: dict[tuple[str, str, int], list[float]] = field(default_factory=dict)
    # (route, method, status) -> durations not yet counted into rows. The request layer only
    # appends to these (a dict lookup and a list append); fold() sorts each list and counts
    # its buckets with bisect, in C, at every snapshot and every metrics.flush_interval.
    # Counting each request into its bucket as it ended (bisect, two float additions and a
    # call) cost about 0.6 us a request in the running server.
    pending: dict[tuple[str, str, int], list[float]] = field(default_factory=dict)
    in_flight: int = 0
    counters: dict[str, dict[tuple[str, ...], float]] = field(default_factory=dict)
    sources: list[Source] = field(default_factory=list)
    # Read once per scrape on the answering worker only: values that are already
    # deployment-wide (job states from PostgreSQL, say) and must not be summed over workers.
    global_sources: list[Callable[[], Any]] = field(default_factory=list)

    def durations(self, route: str, method: str, status: int) -> list[float]:
        """The pending durations of (route, method, status), made on first use; a method
        outside the known ones counts as OTHER. The request layer looks a known key up in
        `pending` itself and comes here only on a miss."""
        if method not in _METHODS:
            method = "OTHER"
        key = (route, method, status)
        durations = self.pending.get(key)
        if durations is None:
            durations = self.pending[key] = []
        return durations

    def fold(self) -> None:
        """Count the pending durations into their rows' buckets (le: a duration equal to a
        bound counts in that bound's bucket) and sums, and empty them."""
        for key, durations in self.pending.items():
            if not durations:
                continue
            durations.sort()
            row = self.rows.get(key)
            if row is None:
                row = self.rows[key] = [0.0] * (len(BUCKETS) + 2)
            below = 0
            for i, bound in enumerate(BUCKETS):
                upto = bisect_right(durations, bound)
                row[i] += upto - below
                below = upto
            row[-2] += len(durations) - below
            row[-1] += sum(durations)
            durations.clear()

    def inc(self, name: str, *labels: str, n: float = 1) -> None:
        """Add `n` to a counter named in COUNTERS."""
        samples = self.counters.get(name)
        if samples is None:
            samples = self.counters[name] = {}
        samples[labels] = samples.get(labels, 0) + n

    def _counter_families(self) -> Iterator[Family]:
        for name, samples in self.counters.items():
            help_text, label_names = COUNTERS[name]
            yield Family(name, "counter", help_text, label_names, samples)

    def snapshot(self) -> dict[str, Any]:
        self.fold()
        families = [
            {
                "name": f.name,
                "kind": f.kind,
                "help": f.help,
                "labels": f.labels,
                "samples": list(f.samples.items()),
            }
            for source in (*self.sources, self._counter_families)
            for f in source()
        ]
        latency: dict[str, list[float]] = {}
        for (route, _, _), row in self.rows.items():
            acc = latency.get(route)
            if acc is None:
                latency[route] = list(row)
            else:
                for i, v in enumerate(row):
                    acc[i] += v
        return {
            "pid": os.getpid(),
            "requests": [[*k, sum(row[:-1])] for k, row in self.rows.items()],
            "latency": latency,
            "in_flight": self.in_flight,
            "families": families,
        }

    def write_snapshot(self) -> None:
        """Replace this worker's snapshot file atomically (readers never see half a file)."""
        if self.shared_dir is None:
            return
        final = self.shared_dir / f"worker-{os.getpid()}.json"
        tmp = final.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(self.snapshot()))
        os.replace(tmp, final)

    def _peer_snapshots(self) -> Iterator[dict[str, Any]]:
        if self.shared_dir is None:
            return
        own = f"worker-{os.getpid()}.json"
        for path in self.shared_dir.glob("worker-*.json"):
            if path.name == own:
                continue
            with contextlib.suppress(OSError, orjson.JSONDecodeError):
                yield orjson.loads(path.read_bytes())

    async def render(self) -> bytes:
        """The Prometheus text exposition of every worker's metrics."""
        registry = CollectorRegistry(auto_describe=False)
        global_families = [f for source in self.global_sources for f in await source()]
        registry.register(_Merged([self.snapshot(), *self._peer_snapshots()], global_families))
        return generate_latest(registry)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process reuses the pid
        return True
    return True


class _Merged(Collector):
    def __init__(self, snapshots: list[dict[str, Any]], global_families: list[Family]) -> None:
        self.snapshots = snapshots
        self.global_families = global_families

    def collect(self) -> Iterator[Metric]:
        live = [s for i, s in enumerate(self.snapshots) if i == 0 or _alive(int(s["pid"]))]
        requests = CounterMetricFamily(
            "hotpath_http_requests", "HTTP requests answered, by route, method and status",
            labels=("route", "method", "status"),
        )  # fmt: skip
        totals: dict[tuple[str, str, str], float] = {}
        for snap in self.snapshots:
            for route, method, status, n in snap["requests"]:
                key = (route, method, str(status))
                totals[key] = totals.get(key, 0) + n
        for key, n in sorted(totals.items()):
            requests.add_metric(list(key), n)
        yield requests

        latency = HistogramMetricFamily(
            "hotpath_http_request_duration_seconds",
            "Time until the handler finished (a stream: its whole body), by route",
            labels=("route",),
        )
        rows: dict[str, list[float]] = {}
        for snap in self.snapshots:
            for route, row in snap["latency"].items():
                acc = rows.setdefault(route, [0.0] * len(row))
                for i, v in enumerate(row):
                    acc[i] += v
        for route, row in sorted(rows.items()):
            cumulative, buckets = 0.0, []
            for bound, count in zip((*BUCKETS, float("inf")), row[:-1], strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            latency.add_metric([route], buckets, row[-1])
        yield latency

        in_flight = GaugeMetricFamily("hotpath_http_requests_in_flight", "Requests being answered now")
        in_flight.add_metric([], sum(s["in_flight"] for s in live))
        yield in_flight

        merged: dict[str, tuple[Family, dict[tuple[str, ...], float]]] = {}
        for snap in self.snapshots:
            is_live = any(snap is s for s in live)
            for raw in snap["families"]:
                fam = Family(raw["name"], raw["kind"], raw["help"], tuple(raw["labels"]), {})
                if fam.kind == "gauge" and not is_live:
                    continue
                _, sums = merged.setdefault(fam.name, (fam, {}))
                for labels, value in raw["samples"]:
                    key = tuple(labels)
                    sums[key] = sums.get(key, 0.0) + value
        for fam, sums in merged.values():
            yield _family(fam, sums)
        for fam in self.global_families:
            yield _family(fam, fam.samples)


def _family(fam: Family, samples: dict[tuple[str, ...], float]) -> Metric:
    out: Metric
    if fam.kind == "counter":
        out = CounterMetricFamily(fam.name, fam.help, labels=fam.labels)
    else:
        out = GaugeMetricFamily(fam.name, fam.help, labels=fam.labels)
    for labels, value in sorted(samples.items()):
        out.add_metric(list(labels), value)
    return out


log = logging.getLogger("hotpath.resources")

# None when metrics.enabled is off: the request middleware then counts nothing.
METRICS: web.AppKey[Metrics | None] = web.AppKey("hotpath.metrics")


def register(app: web.Application, families: Callable[[], list[Family]]) -> None:
    """Add a feature's gauges to /metrics when metrics are on (each feature's own context
    calls this, so this module knows none of them)."""
    metrics = app.get(METRICS)
    if metrics is not None:
        metrics.sources.append(families)


async def metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    """Feature gauges for /metrics, and the periodic snapshot other workers' /metrics read."""
    metrics = app[METRICS]
    if metrics is None:
        yield
        return
    metrics.sources.append(partial(_pool_families, app[DB]))
    interval = app[CONFIG].metrics.flush_interval

    async def flush_forever() -> None:
        while True:
            await asyncio.sleep(interval)
            metrics.fold()  # also where no other worker reads snapshots: the pending lists stay short
            try:
                metrics.write_snapshot()
            except OSError as exc:  # a full or vanished directory must not stop serving
                log.warning("metrics snapshot not written: %s", exc)

    flusher = asyncio.create_task(flush_forever(), name="hotpath-metrics-flush")
    yield
    flusher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await flusher
    with contextlib.suppress(OSError):
        metrics.write_snapshot()  # the final totals stay in the sum after this worker exits


def _pool_families(db: Database) -> list[Family]:
    pool = db.pool
    return [
        Family(
            "hotpath_db_pool_connections",
            "gauge",
            "PostgreSQL pool connections, by state",
            ("state",),
            {("open",): pool.get_size(), ("idle",): pool.get_idle_size(), ("max",): pool.get_max_size()},
        ),
        Family("hotpath_db_pool_waiting", "gauge", "Requests waiting for a connection", (), {(): db.waiting}),
        Family("hotpath_db_pool_timeouts", "counter", "Checkouts that gave up (503)", (), {(): db.timeouts}),
    ]
