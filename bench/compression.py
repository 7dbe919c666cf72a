"""Compression benchmark: transfer sizes, and whether compressing big bodies stalls the loop.

    python -m bench.compression [--duration 10] [--connections 4]

1. Transfer size of GET /large-dataset per coding against identity (target: gzip <= 15%),
   and of a ~1 MiB /stream-json answer.
2. A ~1 MiB JSON answer compressed per request (gzip, /stream-json/11000) loaded by wrk
   while a second client polls GET /health one request at a time and records its latency:
   target p99 < 20 ms. Run twice: with the default batch size (pieces of ~90 KiB,
   compressed inline) and with one 1 MiB piece per request (compressed in the executor).
   The same load without compression is measured too: on one core a server kept busy with
   1 MiB answers delays /health by itself, compression or not.
   hotpath runs on CPU 0; wrk and the /health client share CPU 1.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.run import LOAD_CPU, OPEN_ROUTES, free_port, hotpath_env, parse_wrk, server, taskset

BIG_PATH = "/stream-json/11000"  # 0.92 MiB of JSON


async def sizes(base: str) -> None:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        for path in ("/large-dataset", BIG_PATH):
            got: dict[str, int] = {}
            for coding in ("identity", "gzip", "br", "zstd"):
                async with session.get(base + path, headers={"Accept-Encoding": coding}) as resp:
                    body = await resp.read()
                    got[resp.headers.get("Content-Encoding", "identity")] = len(body)
            ident = got["identity"]
            parts = ", ".join(f"{c} {n:,} B ({n / ident:.1%})" for c, n in got.items() if c != "identity")
            print(f"{path}: identity {ident:,} B; {parts}")


async def poll_health(base: str, until: float) -> list[float]:
    lat: list[float] = []
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < until:
            start = time.perf_counter()
            async with session.get(base + "/health") as resp:
                await resp.read()
            lat.append((time.perf_counter() - start) * 1000)
    return lat


def pct(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=1000)[int(p * 10) - 1] if len(values) > 10 else max(values)


def under_load(base: str, duration: float, connections: int, label: str, coding: str = "gzip") -> None:
    quiet = asyncio.run(poll_health(base, time.monotonic() + 2))
    cmd = [
        *taskset(LOAD_CPU),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration:g}s",
        "--latency",
        "-H",
        f"Accept-Encoding: {coding}",
        base + BIG_PATH,
    ]
    wrk = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)  # let the load start before measuring
    loaded = asyncio.run(poll_health(base, time.monotonic() + duration - 1))
    out, _ = wrk.communicate(timeout=duration + 60)
    sample = parse_wrk(out)
    print(
        f"{label}: {sample.rps:,.1f} req/s of {BIG_PATH} {coding} ({sample.rps * 0.92:,.0f} MiB/s of JSON, "
        f"wrk p99 {sample.p99_ms:.0f} ms, errors {sample.errors}); "
        f"/health alone p50 {pct(quiet, 50):.2f} ms p99 {pct(quiet, 99):.2f} ms; "
        f"/health during it: {len(loaded)} requests, p50 {pct(loaded, 50):.2f} ms, "
        f"p99 {pct(loaded, 99):.2f} ms, max {max(loaded):.1f} ms (target p99 < 20 ms)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compression")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=1)
    args = parser.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="hotpath-bench-") as tmp:
        env, config = hotpath_env(Path(tmp))
        env.update(OPEN_ROUTES)
        cmd = [sys.executable, "run.py", "--config", str(config), "--port", str(port)]
        with server(cmd, base + "/ready", env):
            asyncio.run(sizes(base))
            under_load(base, args.duration, args.connections, "for comparison, no compression", "identity")
            under_load(base, args.duration, args.connections, "pieces of ~90 KiB (inline)")
        one_piece = {**env, "HOTPATH_STREAMING_BATCH_RECORDS": "11000"}
        with server(cmd, base + "/ready", one_piece):
            under_load(base, args.duration, args.connections, "one 1 MiB piece (executor)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
