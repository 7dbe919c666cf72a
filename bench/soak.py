"""Endurance and fault drills: mixed traffic on every worker for a bounded time, with Redis
restarted, PostgreSQL restarted and a worker killed along the way.

    python -m bench.soak [--duration S] [--workers N] [--concurrency C] [--quick]

hotpath runs with `--workers` against a PostgreSQL cluster and a Redis of this run's own
(on Unix sockets in a temporary directory: the drills stop and start them, never the
machine's shared servers). Reported: requests and statuses, 5xx count, per-worker RSS slope
after warm-up and file descriptors, and for each drill the errors clients saw, how long until
a whole second passed without one, and whether anything written before it was lost.
Written to bench/results/soak-<date>.md/json. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PG_BIN = (
    Path("/usr/lib/postgresql")
    / (sorted(os.listdir("/usr/lib/postgresql"))[-1] if Path("/usr/lib/postgresql").exists() else "none")
    / "bin"
)


def _as_postgres(argv: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root: run its tools as the Debian package's user.
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


class PrivatePostgres:
    """A throwaway cluster of the machine's PostgreSQL binaries, on a Unix socket only."""

    def __init__(self, base: Path) -> None:
        self.dir = base / "pg"
        self.data = self.dir / "data"

    def start(self) -> str:
        self.dir.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            os.chmod(base := self.dir.parent, 0o755)
            del base
        subprocess.run(
            _as_postgres([str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"]),
            check=True,
            capture_output=True,
        )
        self._ctl("start", "-w")
        subprocess.run(
            _as_postgres([str(PG_BIN / "createdb"), "-h", str(self.dir), "-U", "postgres", "hotpath"]),
            check=True,
            capture_output=True,
        )
        return f"postgresql://postgres@/hotpath?host={self.dir}"

    def _ctl(self, *args: str) -> None:
        opts = f"-k {self.dir} -c listen_addresses='' -c max_connections=200"
        subprocess.run(
            _as_postgres(
                [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), "-o", opts, *args]
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast", "-w")

    def stop(self) -> None:
        subprocess.run(
            _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "stop", "-m", "immediate"]),
            capture_output=True,
        )


class PrivateRedis:
    def __init__(self, base: Path) -> None:
        self.sock = base / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            from server.runtime.embedded import valkey_binary

            binary = str(valkey_binary())
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                "0",
                "--unixsocket",
                str(self.sock),
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self.sock.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("private Redis did not start")
            time.sleep(0.01)
        return f"unix://{self.sock}?db=0"

    def restart(self) -> None:
        self.stop()
        self.sock.unlink(missing_ok=True)
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return None
    return None


def fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return None


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    if len(points) < 3:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return statistics.linear_regression(xs, ys).slope * 60


@dataclass
class Outcome:
    at: float
    status: int  # 0 = connection error
    retry_after: bool


@dataclass
class Load:
    base: str
    outcomes: list[Outcome] = field(default_factory=list)
    created: list[int] = field(default_factory=list)  # user ids answered 201, with their time
    created_at: list[float] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def client_loop(
    load: Load, session: aiohttp.ClientSession, paths: set[str], rng: random.Random
) -> None:
    while not load.stop.is_set():
        roll = rng.random()
        method, url, body, headers = "GET", "/health", None, {}
        if roll < 0.25:
            url = "/products"
            headers = {"Accept": rng.choice(["application/json", "application/yaml", "application/xml"])}
        elif roll < 0.45 and load.created:
            url = f"/users/{rng.choice(load.created)}"
        elif roll < 0.55:
            n = rng.randrange(1 << 40)
            method, url, body = "POST", "/users", {"name": f"Soak {n}", "email": f"soak{n}@example.com"}
        elif roll < 0.62:
            url = f"/stream-json/{rng.randint(1, 2000)}"
        elif roll < 0.68:
            url = "/protected-endpoint"
            headers = {"X-Forwarded-For": f"198.51.100.{rng.randrange(256)}"}  # 256 clients
        elif roll < 0.74 and "/large-dataset" in paths:
            url, headers = "/large-dataset", {"Accept-Encoding": "gzip"}
        elif roll < 0.80 and "/expensive-calculation/{value}" in paths:
            url = f"/expensive-calculation/{rng.randint(1, 50)}"
        elif roll < 0.84 and "/send-notification" in paths:
            method, url = "POST", "/send-notification"
            body = {"recipient": "ops@example.com", "subject": "soak", "content": "hello"}
        try:
            async with session.request(method, load.base + url, json=body, headers=headers) as resp:
                data = await resp.read()
                at = time.monotonic()  # when the client saw the answer
                load.outcomes.append(Outcome(at, resp.status, "Retry-After" in resp.headers))
                if resp.status == 201 and url == "/users":
                    load.created.append(json.loads(data)["id"])
                    load.created_at.append(at)
                elif resp.status == 202 and url == "/send-notification":
                    load.jobs.append(json.loads(data)["task_id"])
        except (aiohttp.ClientError, TimeoutError):
            load.outcomes.append(Outcome(time.monotonic(), 0, False))


def drill_report(load: Load, name: str, at: float, until: float) -> dict[str, Any]:
    window = [o for o in load.outcomes if at <= o.at < until]
    bad = [o for o in window if o.status == 0 or o.status >= 500]
    statuses = Counter(str(o.status) if o.status else "connection error" for o in bad)
    first_bad = min((o.at for o in bad), default=at)
    last_bad = max((o.at for o in bad), default=at)
    return {
        "drill": name,
        "requests": len(window),
        "errors": dict(statuses),
        "errors_without_retry_after": sum(1 for o in bad if o.status >= 500 and not o.retry_after),
        # from the first error clients saw to the last: how long the fault was visible
        "errors_lasted_s": round(last_bad - first_bad, 2),
        "recovered_after_s": round(last_bad - at, 2) if bad else 0.0,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="hotpath-soak-"))
    pg, redis = PrivatePostgres(tmp), PrivateRedis(tmp)
    db_url, redis_url = pg.start(), redis.start()
    port = 18000 + os.getpid() % 1000
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "REDIS_URL": redis_url,
        "HOTPATH_RATELIMIT_POLICIES": '{ protected = "100000/minute" }',
        # every route open: the soak measures memory under a mixed load, not the access check
        "HOTPATH_AUTH_OPEN_ROUTES": '["*"]',
    }
    log = (tmp / "hotpath.log").open("wb")
    server = subprocess.Popen(  # noqa: ASYNC220 - started once, before any load
        [sys.executable, "run.py", "--port", str(port), "--workers", str(args.workers)],
        cwd=ROOT,
        env=env,
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    load = Load(base)
    samples: dict[int, list[tuple[float, float, int]]] = {}
    drills: list[dict[str, Any]] = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with session.get(base + "/ready") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"hotpath did not start; see {tmp / 'hotpath.log'}")
                await asyncio.sleep(0.1)
            async with session.get(base + "/openapi.json") as r:
                paths = set((await r.json())["paths"])
            rng = random.Random(1)
            start = time.monotonic()
            tasks = [
                asyncio.create_task(client_loop(load, session, paths, random.Random(rng.random())))
                for _ in range(args.concurrency)
            ]
            plan = {0.3: "redis restarted", 0.5: "postgres restarted", 0.7: "worker killed (SIGKILL)"}
            done_drills: set[float] = set()
            while (now := time.monotonic()) - start < args.duration:
                for pid in children(server.pid):
                    r, f = rss_mb(pid), fds(pid)
                    if r is not None and f is not None:
                        samples.setdefault(pid, []).append((now - start, r, f))
                for frac, name in plan.items():
                    if frac not in done_drills and now - start >= frac * args.duration:
                        done_drills.add(frac)
                        users_before = list(load.created)
                        at = time.monotonic()
                        if name.startswith("redis"):
                            await asyncio.to_thread(redis.restart)
                        elif name.startswith("postgres"):
                            await asyncio.to_thread(pg.restart)
                        else:
                            os.kill(children(server.pid)[0], signal.SIGKILL)
                        drills.append({"name": name, "at": at, "users_before": users_before})
                await asyncio.sleep(args.sample_every)
            load.stop.set()
            await asyncio.gather(*tasks)
            end = time.monotonic()

            # Nothing lost: every user answered 201 is still there; every accepted job finishes.
            async def exists(uid: int) -> bool:
                async with session.get(f"{base}/users/{uid}") as r:
                    return r.status == 200

            missing_users = [u for u in load.created if not await exists(u)]
            job_states: Counter[str] = Counter()
            job_deadline = time.monotonic() + 120
            pending = list(load.jobs)
            while pending and time.monotonic() < job_deadline:
                still = []
                for job in pending:
                    async with session.get(f"{base}/task-status/{job}") as r:
                        state = (await r.json()).get("status") if r.status == 200 else f"http {r.status}"
                    if state in ("completed", "failed", "cancelled") or str(state).startswith("http"):
                        job_states[str(state)] += 1
                    else:
                        still.append(job)
                pending = still
                if pending:
                    await asyncio.sleep(1)
            job_states["unfinished"] = len(pending)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
        log.close()
        redis.stop()
        pg.stop()

    reports = []
    bounds = [d["at"] for d in drills] + [end]
    for i, d in enumerate(drills):
        rep = drill_report(load, d["name"], d["at"], bounds[i + 1])
        rep["users_written_before_lost"] = sum(1 for u in d["users_before"] if u in set(missing_users))
        reports.append(rep)
    warm = args.duration * 0.2
    workers = []
    for pid, pts in samples.items():
        after = [(t, r) for t, r, _ in pts if t >= warm]
        workers.append(
            {
                "pid": pid,
                "seconds_sampled": round(pts[-1][0] - pts[0][0], 1),
                "rss_mb_first_last": [round(pts[0][1], 1), round(pts[-1][1], 1)],
                "rss_slope_mb_per_min_after_warmup": round(slope_per_minute(after), 3),
                "fds_min_max": [min(f for *_, f in pts), max(f for *_, f in pts)],
            }
        )
    statuses = Counter(str(o.status) if o.status else "connection error" for o in load.outcomes)
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "duration_s": args.duration,
        "workers": args.workers,
        "concurrency": args.concurrency,
        "requests": len(load.outcomes),
        "statuses": dict(sorted(statuses.items())),
        "5xx_outside_drills": sum(
            1
            for o in load.outcomes
            if (o.status >= 500 or o.status == 0) and not any(d["at"] <= o.at < d["at"] + 30 for d in drills)
        ),
        "users_created": len(load.created),
        "users_missing_at_end": len(missing_users),
        "jobs_accepted": len(load.jobs),
        "job_states_at_end": dict(job_states),
        "drills": reports,
        "workers_sampled": workers,
    }


def markdown(res: dict[str, Any]) -> str:
    out = [
        f"# Soak run {res['date']}",
        "",
        f"{res['machine']}; {res['workers']} workers, {res['concurrency']} concurrent clients, "
        f"{res['duration_s']} s.",
        "",
        f"Requests: {res['requests']:,}; statuses: {res['statuses']}; errors outside the 30 s after a drill: "
        f"{res['5xx_outside_drills']}.",
        f"Users created: {res['users_created']:,}, missing at the end: {res['users_missing_at_end']}. "
        f"Jobs accepted: {res['jobs_accepted']:,}, at the end: {res['job_states_at_end']}.",
        "",
        "| drill | requests until next | errors clients saw | 5xx without Retry-After | errors lasted "
        "| last error after drill began | writes lost |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for d in res["drills"]:
        out.append(
            f"| {d['drill']} | {d['requests']:,} | {d['errors'] or 'none'} "
            f"| {d['errors_without_retry_after']} "
            f"| {d['errors_lasted_s']} s | {d['recovered_after_s']} s | {d['users_written_before_lost']} |"
        )
    out += [
        "",
        "| worker pid | sampled s | RSS first → last MB | RSS slope after warm-up MB/min | fds min–max |",
        "|---|---:|---|---:|---|",
    ]
    for w in res["workers_sampled"]:
        out.append(
            f"| {w['pid']} | {w['seconds_sampled']} "
            f"| {w['rss_mb_first_last'][0]} → {w['rss_mb_first_last'][1]} "
            f"| {w['rss_slope_mb_per_min_after_warmup']} | {w['fds_min_max'][0]}–{w['fds_min_max'][1]} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--workers", type=int, default=max(1, len(os.sched_getaffinity(0))))
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--sample-every", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="60 s")
    args = parser.parse_args()
    if args.quick:
        args.duration = 60.0
    res = asyncio.run(run(args))
    text = markdown(res)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"soak-{stamp}.md").write_text(text)
    (RESULTS / f"soak-{stamp}.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
