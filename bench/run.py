"""Benchmark runner: hotpath (one worker) and the bare floor, each pinned to one core, loaded
in turn by wrk pinned to the other core, the floor measured right before each scenario so
drift hits both alike.

    python -m bench [--quick] [--duration S] [--rounds N] [--connections C]

Prints a table (req/s median of rounds, p50/p99 latency, ratio to the floor, errors) and
writes it as Markdown and JSON under bench/results/. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from server.config import RateLimitConfig
from server.urls import with_database

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SERVER_CPU, LOAD_CPU = "0", "1"
ALL_CPUS = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
SEED_USERS = 1000


@dataclass
class Scenario:
    name: str
    server: str  # a key of the servers dict built in main(): "floor", "hotpath", ...
    path: str
    lua: str | None = None
    target: str = ""
    headers: tuple[str, ...] = ()
    key: bool = True  # sends the bench's API key (every scope); Lua scripts get it as KEY


@dataclass
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


@dataclass
class Result:
    scenario: Scenario
    samples: list[Sample] = field(default_factory=list)
    floor_samples: list[Sample] = field(default_factory=list)  # the floor, measured just before each

    @property
    def rps(self) -> float:
        return statistics.median(s.rps for s in self.samples)

    @property
    def p50(self) -> float:
        return statistics.median(s.p50_ms for s in self.samples)

    @property
    def p99(self) -> float:
        return statistics.median(s.p99_ms for s in self.samples)

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.samples)


# Lua scripts that build their own requests send `KEY` (the bench's API key, set by run_wrk):
# wrk.format() does not add -H headers to the headers a script gives it.
RANDOM_USER_LUA = f"""
math.randomseed(os.time())
request = function()
  return wrk.format("GET", "/users/" .. math.random(1, {SEED_USERS}), {{["Authorization"] = KEY}})
end
"""

# Every request a new user: a per-run random prefix keeps emails unique across rounds.
CREATE_USER_LUA = """
math.randomseed(os.time())
local prefix = math.random(1, 1000000000)
local counter = 0
request = function()
  counter = counter + 1
  local body = string.format('{"name":"Bench %d","email":"b%d-%d@example.com"}', counter, prefix, counter)
  return wrk.format("POST", "/users", {["Content-Type"] = "application/json", ["Authorization"] = KEY}, body)
end
"""

# Every request one of API_KEYS verified keys (KEYS, set by run_wrk), each counted apart.
API_KEYS = 1000
RANDOM_API_KEY_LUA = """
math.randomseed(os.time())
request = function()
  return wrk.format("GET", "/protected-endpoint", {["Authorization"] = KEYS[math.random(1, #KEYS)]})
end
"""
# Allowed path: 10^3 clients (keys) under a policy none of them exceeds during a run. The
# hotpath servers' writes get policies no run exceeds either (bench_config): POST /users
# measures the write, with the limiter's check.
RATELIMIT_ENV = {"HOTPATH_RATELIMIT_POLICIES": '{ protected = "1000000/minute, 100000/second" }'}

# Sends back the ETag it was last given, as a client holding the dataset does (304s).
ETAG_LUA = """
local etag = nil
request = function()
  if etag then
    return wrk.format("GET", "/large-dataset", {["Accept-Encoding"] = "gzip", ["If-None-Match"] = etag})
  end
  return wrk.format("GET", "/large-dataset", {["Accept-Encoding"] = "gzip"})
end
response = function(status, headers, body)
  if headers["ETag"] then etag = headers["ETag"] end
end
"""

# Database-heavy scenarios last: PostgreSQL keeps working for a while after them, which
# would otherwise land on the scenario that follows.
SCENARIOS = [
    Scenario("floor GET /json", "floor", "/json"),
    Scenario(
        "hotpath GET /health (whole stack, trivial route)",
        "hotpath",
        "/health",
        target=">= 0.85x (issue 12)",
        key=False,
    ),
    Scenario(
        "hotpath GET /health, JSON access log on",
        "hotpath-accesslog",
        "/health",
        target="cost of the access log",
        key=False,
    ),
    Scenario(
        "hotpath GET /products JSON (in-memory catalogue)",
        "hotpath",
        "/products",
        target=">= 0.85x (issue 3)",
        headers=("Accept: application/json",),
        key=False,
    ),
    Scenario(
        "hotpath GET /products msgpack",
        "hotpath",
        "/products",
        headers=("Accept: application/vnd.msgpack",),
        key=False,
    ),
    Scenario(
        "hotpath GET /products YAML", "hotpath", "/products", headers=("Accept: application/yaml",), key=False
    ),
    Scenario(
        "hotpath GET /products XML", "hotpath", "/products", headers=("Accept: application/xml",), key=False
    ),
    # issue 4: the cached, pre-compressed dataset (transfer size: python -m bench.compression)
    Scenario(
        "hotpath GET /large-dataset, Accept-Encoding gzip (cached compressed bytes)",
        "hotpath",
        "/large-dataset",
        target=">= 0.6x (issue 4)",
        headers=("Accept-Encoding: gzip",),
        key=False,
    ),
    Scenario(
        "hotpath GET /large-dataset, gzip + If-None-Match (304)",
        "hotpath",
        "/large-dataset",
        ETAG_LUA,
        ">= 0.6x (issue 4)",
        headers=("Accept-Encoding: gzip",),
        key=False,
    ),
    Scenario(
        "hotpath GET /protected-endpoint with a valid key, allowed (keys verified, Redis sliding windows, "
        "10^3 keys)",
        "hotpath-ratelimit",
        "/protected-endpoint",
        RANDOM_API_KEY_LUA,
        ">= 0.5x (issues 6, 20)",
    ),
    Scenario(
        "hotpath GET /users/{id} (PostgreSQL, no cache)",
        "hotpath-nocache",
        "/users/1",
        RANDOM_USER_LUA,
        ">= 0.35x",
    ),
    Scenario(
        "hotpath GET /users/{id}, batch_reads off (one query per request)",
        "hotpath-nobatch",
        "/users/1",
        RANDOM_USER_LUA,
        "for comparison",
    ),
    Scenario(
        "hotpath GET /products JSON, all cores (workers unpinned, wrk shares a core)",
        "hotpath-allcores",
        "/products",
        target="scaling across workers",
        headers=("Accept: application/json",),
        key=False,
    ),
    Scenario(
        "hotpath GET /users/{id}, all cores (workers unpinned, wrk shares a core)",
        "hotpath-allcores",
        "/users/1",
        RANDOM_USER_LUA,
        "scaling across workers",
    ),
    # issue 5: the two-layer cache (GET /users/{id} is cached whole by default)
    Scenario(
        "hotpath GET /users/{id}, cache L1 hit (with a key)",
        "hotpath",
        "/users/1",
        target=">= 0.8x (issue 5)",
    ),
    Scenario(
        "hotpath GET /products JSON, with a key (a public read)",
        "hotpath",
        "/products",
        target="-2 points at most (issue 20)",
        headers=("Accept: application/json",),
    ),
    Scenario("hotpath GET /users/{id}, random of 1000, cached", "hotpath", "/users/1", RANDOM_USER_LUA),
    Scenario(
        "hotpath GET /expensive-calculation/1000, cache hit",
        "hotpath",
        "/expensive-calculation/1000",
        key=False,
    ),
    # last: it writes, and PostgreSQL keeps working (WAL, autovacuum) for a while after it
    Scenario("hotpath POST /users (one INSERT each)", "hotpath", "/users", CREATE_USER_LUA, "for reference"),
]
# The cache off, for the scenarios that measure PostgreSQL itself.
NOCACHE_ENV = {"HOTPATH_CACHE_ENABLED": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def taskset(cpu: str) -> list[str]:
    return ["taskset", "-c", cpu] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if m is None:
        raise ValueError(f"cannot parse latency {text!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def parse_wrk(out: str) -> Sample:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(x) for x in m.groups())
    return Sample(rps, p50, p99, errors)


def run_wrk(
    url: str,
    duration: float,
    connections: int,
    lua: str | None,
    headers: tuple[str, ...] = (),
    keys: list[str] | None = None,
) -> Sample:
    """wrk on `url`; with `keys`, the first is sent as Authorization (and as KEY to a Lua
    script), and a script gets them all as KEYS."""
    cmd = [*taskset(LOAD_CPU), "wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency"]
    for header in headers:
        cmd += ["-H", header]
    if keys:
        cmd += ["-H", f"Authorization: Bearer {keys[0]}"]
        if lua:
            quoted = ", ".join(f'"Bearer {k}"' for k in keys)
            lua = f'KEY = "Bearer {keys[0]}"\nKEYS = {{{quoted}}}\n{lua}'
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        if lua:
            f.write(lua)
    try:
        if lua:
            cmd += ["-s", f.name]
        out = subprocess.run(
            [*cmd, url], capture_output=True, text=True, check=True, timeout=duration + 60
        ).stdout
    finally:
        os.unlink(f.name)
    return parse_wrk(out)


async def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


@contextmanager
def server(
    cmd: list[str], ready_url: str, env: dict[str, str], cpu: str = SERVER_CPU
) -> Iterator[subprocess.Popen[bytes]]:
    # stderr to a file: servers with the access log on write a line per request there
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [*taskset(cpu), *cmd], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log
        )
        try:
            try:
                asyncio.run(_wait_http(ready_url, proc))
            except RuntimeError:
                log.seek(0)
                sys.stderr.write(log.read()[-4000:].decode(errors="replace"))
                raise
            yield proc  # taskset execs: proc.pid is the server's own
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def make_keys(env: dict[str, str], workdir: Path, count: int) -> list[str]:
    """`count` keys with every scope. On the configured servers they are made in the bench's
    database and announced (as `run.py keys create` does); on embedded ones, the development
    key the embedded start made is the only one."""
    if not env.get("DATABASE_URL"):
        return [(workdir / "var" / "dev-key").read_text().strip()]
    import asyncpg
    import redis.asyncio as aioredis

    from server.access.apikeys import KeyStore
    from server.access.scopes import SCOPES
    from server.config import load_config
    from server.storage.db import Database

    channel = load_config(env={}).auth.channel
    pool = await asyncpg.create_pool(env["DATABASE_URL"], min_size=1, max_size=4)
    r = aioredis.from_url(env["REDIS_URL"])
    try:
        store = KeyStore(Database(pool, 10.0, 4))
        keys = []
        for i in range(count):
            record, key = await store.create("bench", f"bench {i}", list(SCOPES))
            await r.publish(f"{channel}:14", json.dumps({"key": record.id}))
            keys.append(key)
        return keys
    finally:
        await r.aclose()
        await pool.close()


async def seed_users(base: str, count: int, key: str) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        sem = asyncio.Semaphore(32)

        async def one(i: int) -> None:
            async with (
                sem,
                session.post(
                    f"{base}/users", json={"name": f"Bench {i}", "email": f"bench{i}@example.com"}
                ) as resp,
            ):
                if resp.status not in (201, 409):
                    raise RuntimeError(f"seeding failed: {resp.status} {await resp.text()}")

        await asyncio.gather(*(one(i) for i in range(count)))


async def _recreate_database(url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(with_database(url, "postgres"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


# The benches of one capability (bodies, compression, fan-out, streaming, the feed, jobs, the
# soak) serve every route without keys: they measure that capability, and the cost of the access
# check is measured by this module's rows, which send keys.
OPEN_ROUTES = {"HOTPATH_AUTH_OPEN_ROUTES": '["*"]'}


def bench_config(workdir: Path) -> str:
    """The config file of a benchmarked hotpath: its data dir under `workdir`, and the shipped
    rate-limit policies with every limit raised past what a bench sends. A bench is one client
    (wrk, or a loop of POSTs: the seeding, the fan-out, the jobs' enqueueing) sending far more
    than a client is allowed: it measures the limiter's check on the routes it guards, never
    its 429s."""
    policies = ", ".join(f'{route} = "1000000000/minute"' for route in RateLimitConfig().policies)
    return f'[embedded]\ndata_dir = "{workdir / "var"}"\n\n[ratelimit]\npolicies = {{ {policies} }}\n'


def hotpath_env(workdir: Path) -> tuple[dict[str, str], Path]:
    """Environment and config for hotpath: a fresh bench database on the configured servers,
    or embedded servers in a temporary data dir."""
    env = dict(os.environ)
    config = workdir / "config.toml"
    text = bench_config(workdir)
    if env.get("DATABASE_URL") and env.get("REDIS_URL"):
        asyncio.run(_recreate_database(env["DATABASE_URL"], "hotpath_bench"))
        env["DATABASE_URL"] = with_database(env["DATABASE_URL"], "hotpath_bench")
        env["REDIS_URL"] = with_database(env["REDIS_URL"], 14)  # the bench's own db
    else:
        env.pop("DATABASE_URL", None)
        env.pop("REDIS_URL", None)
    config.write_text(text)
    return env, config


def machine() -> dict[str, str]:
    import aiohttp as _a

    cpu = ""
    with suppress(OSError, StopIteration), open("/proc/cpuinfo") as info:
        cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    wrk = wrk.split(" Copyright")[0]
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "aiohttp": _a.__version__,
        "wrk": wrk.strip(),
    }


def paired_ratio(result: Result, floor: Result) -> float:
    """Median over samples of (this scenario's req/s / the floor's req/s measured just before it).

    These VMs drift by a third within minutes: a ratio of two medians, or a pairing with a
    floor taken minutes earlier in the round, can pair a fast floor with a slow scenario.
    """
    if result is floor:
        return 1.0
    pairs = [s.rps / f.rps for s, f in zip(result.samples, result.floor_samples, strict=True) if f.rps]
    return statistics.median(pairs) if pairs else 0.0


def render(results: list[Result], floor: Result, meta: dict[str, str], args: argparse.Namespace) -> str:
    lines = [
        f"# hotpath benchmarks, {meta['date']}",
        "",
        f"{meta['cpu']} ({meta['cores']} cores), Python {meta['python']}, "
        f"aiohttp {meta['aiohttp']}, {meta['wrk']}.",
        f"Server pinned to CPU {SERVER_CPU}, wrk (1 thread, {args.connections} connections) "
        f"to CPU {LOAD_CPU}; "
        f"{args.rounds} rounds of {args.duration:g} s each, medians shown; the floor is measured "
        "right before each scenario, and the ratio is the median over rounds of the scenario's "
        "req/s over that floor's.",
        "",
        "| scenario | req/s | p50 ms | p99 ms | ratio to floor | target | errors |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.scenario.name} | {r.rps:,.0f} | {r.p50:.2f} | {r.p99:.2f} | {paired_ratio(r, floor):.2f}x "
            f"| {r.scenario.target} | {r.errors} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="short runs (about a minute in all)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per scenario")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="run only scenarios whose name contains this text; repeat for several (the floor always runs)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds, args.warmup = 3.0, 2, 1.0
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install -y wrk)", file=sys.stderr)
        return 2

    floor_port, hot_port = free_port(), free_port()
    wanted = [text.lower() for text in args.only]
    scenarios = [
        s for i, s in enumerate(SCENARIOS) if i == 0 or not wanted or any(w in s.name.lower() for w in wanted)
    ]
    results = {s.name: Result(s) for s in scenarios}
    with tempfile.TemporaryDirectory(prefix="hotpath-bench-") as tmp:
        env, config = hotpath_env(Path(tmp))
        floor_cmd = [sys.executable, "bench/floor.py", "--port", str(floor_port)]
        hot_cmd = [
            sys.executable,
            "run.py",
            "--config",
            str(config),
            "--port",
            str(hot_port),
            "--workers",
            "1",
        ]
        # seed once, in a hotpath of its own, so measured rounds only read
        with server(hot_cmd, f"http://127.0.0.1:{hot_port}/ready", env):
            keys = asyncio.run(make_keys(env, Path(tmp), API_KEYS))
            asyncio.run(seed_users(f"http://127.0.0.1:{hot_port}", SEED_USERS, keys[0]))
        all_cores = [*hot_cmd[:-1], "auto"]  # one worker per core, the default deployment
        servers = {
            "floor": (floor_cmd, floor_port, "/json", env, SERVER_CPU),
            "hotpath": (hot_cmd, hot_port, "/ready", env, SERVER_CPU),
            "hotpath-accesslog": (
                hot_cmd,
                hot_port,
                "/ready",
                {**env, "HOTPATH_SERVER_ACCESS_LOG": "true"},
                SERVER_CPU,
            ),
            "hotpath-ratelimit": (hot_cmd, hot_port, "/ready", {**env, **RATELIMIT_ENV}, SERVER_CPU),
            "hotpath-nobatch": (
                hot_cmd,
                hot_port,
                "/ready",
                {**env, "HOTPATH_DATABASE_BATCH_READS": "false", **NOCACHE_ENV},
                SERVER_CPU,
            ),
            "hotpath-nocache": (hot_cmd, hot_port, "/ready", {**env, **NOCACHE_ENV}, SERVER_CPU),
            # every core: the workers are not pinned, and share CPU 1 with wrk
            "hotpath-allcores": (all_cores, hot_port, "/ready", env, ALL_CPUS),
        }
        floor_cmd_, floor_port_, floor_ready, floor_env, floor_cpus = servers["floor"]
        floor_url = f"http://127.0.0.1:{floor_port_}/json"
        floor_result = results[SCENARIOS[0].name]

        def measure(name: str, url: str, s: Scenario, round_: int) -> Sample:
            sent = keys if s.key and s.server != "floor" else None
            run_wrk(url, args.warmup, args.connections, s.lua, s.headers, sent)
            sample = run_wrk(url, args.duration, args.connections, s.lua, s.headers, sent)
            print(
                f"round {round_ + 1}: {name}: {sample.rps:,.0f} req/s, "
                f"p50 {sample.p50_ms:.2f} ms, p99 {sample.p99_ms:.2f} ms, errors {sample.errors}",
                flush=True,
            )
            return sample

        for round_ in range(args.rounds):
            # The floor stays up for the whole round (idle while a hotpath is loaded) and is
            # measured right before each scenario: its pair, taken seconds apart, not minutes.
            with server(floor_cmd_, f"http://127.0.0.1:{floor_port_}{floor_ready}", floor_env, floor_cpus):
                if len(scenarios) == 1:
                    floor_result.samples.append(measure(SCENARIOS[0].name, floor_url, SCENARIOS[0], round_))
                for kind, (cmd, port, ready, server_env, cpus) in servers.items():
                    if kind == "floor" or not any(s.server == kind for s in scenarios):
                        continue
                    with server(cmd, f"http://127.0.0.1:{port}{ready}", server_env, cpus):
                        # A process just started pays for its heap growing (page faults) in its
                        # first seconds of load: warm it up before the first scenario's pair.
                        first = next(s for s in scenarios if s.server == kind)
                        run_wrk(
                            f"http://127.0.0.1:{port}{first.path}",
                            5.0,
                            args.connections,
                            first.lua,
                            first.headers,
                            keys if first.key else None,
                        )
                        for s in scenarios:
                            if s.server != kind:
                                continue
                            pair = measure(SCENARIOS[0].name, floor_url, SCENARIOS[0], round_)
                            floor_result.samples.append(pair)
                            results[s.name].floor_samples.append(pair)
                            url = f"http://127.0.0.1:{port}{s.path}"
                            results[s.name].samples.append(measure(s.name, url, s, round_))
    ordered = [results[s.name] for s in scenarios]
    floor = results[SCENARIOS[0].name]
    meta = machine()
    table = render(ordered, floor, meta, args)
    print()
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"{stamp}.md").write_text(table)
    (RESULTS / f"{stamp}.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "settings": vars(args),
                "results": [
                    {
                        "scenario": r.scenario.name,
                        "target": r.scenario.target,
                        "rps_median": r.rps,
                        "p50_ms": r.p50,
                        "p99_ms": r.p99,
                        "ratio_to_floor": paired_ratio(r, floor),
                        "errors": r.errors,
                        "samples": [vars(s) for s in r.samples],
                    }
                    for r in ordered
                ],
            },
            indent=2,
        )
    )
    print(f"written to bench/results/{stamp}.md and .json")
    return 0 if all(r.errors == 0 for r in ordered) else 1
