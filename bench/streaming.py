"""Streaming benchmark: records per second, MB/s and the server's peak RSS.

    python -m bench.streaming [--records 1000000] [--runs 3]

Synthetic /stream-json, NDJSON and /stream-csv, then /users/export of as many users (JSON,
NDJSON, CSV) after seeding them with one INSERT ... generate_series (needs DATABASE_URL and
REDIS_URL; skipped otherwise). hotpath runs on CPU 0, curl reads on CPU 1 into /dev/null.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import asyncpg

from bench.run import LOAD_CPU, OPEN_ROUTES, free_port, hotpath_env, server, taskset


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def server_pid(port: int) -> int:
    out = subprocess.run(["pgrep", "-f", f"run.py --config .* --port {port}"], capture_output=True, text=True)
    return int(out.stdout.split()[0])


def fetch(url: str, pid: int) -> tuple[float, int, int]:
    """(seconds, bytes, peak RSS KiB of the server while it ran) for one curl download."""
    peak = rss_kib(pid)
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_kib(pid))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.perf_counter()
    out = subprocess.run(
        [*taskset(LOAD_CPU), "curl", "-s", "-o", "/dev/null", "-w", "%{size_download} %{http_code}", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    took = time.perf_counter() - start
    done.set()
    watcher.join()
    if out[1] != "200":
        raise RuntimeError(f"{url} answered {out[1]}")
    return took, int(out[0]), peak


def report(name: str, n: int, runs: list[tuple[float, int, int]], base_rss: int, target: str) -> None:
    took = statistics.median(r[0] for r in runs)
    size = runs[0][1]
    peak = max(r[2] for r in runs)
    print(
        f"{name}: {n / took:,.0f} rows/s, {size / took / 1e6:,.0f} MB/s, {size / 1e6:.0f} MB in {took:.2f} s "
        f"(median of {len(runs)}); server RSS {base_rss / 1024:.0f} MB -> peak {peak / 1024:.0f} MB "
        f"(+{(peak - base_rss) / 1024:.1f} MB)  [{target}]",
        flush=True,
    )


async def seed_users(url: str, n: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE users RESTART IDENTITY")
        await conn.execute(
            "INSERT INTO users (name, email) SELECT 'User ' || g, 'user' || g || '@example.com' "
            "FROM generate_series(1, $1::int) g",
            n,
        )
        await conn.execute("VACUUM ANALYZE users")
    finally:
        await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.streaming")
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    n = args.records
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="hotpath-stream-") as tmp:
        env, config = hotpath_env(Path(tmp))
        env.update(OPEN_ROUTES)
        env["HOTPATH_STREAMING_MAX_RECORDS"] = str(max(n, 1_000_000))
        cmd = [sys.executable, "run.py", "--config", str(config), "--port", str(port), "--workers", "1"]
        with server(cmd, f"http://127.0.0.1:{port}/ready", env):
            pid = server_pid(port)
            base = f"http://127.0.0.1:{port}"
            fetch(f"{base}/stream-json/1000", pid)  # warm up
            for name, path, target in (
                ("stream-json", f"/stream-json/{n}", ">= 300,000/s"),
                ("stream-json ndjson", f"/stream-json/{n}?format=ndjson", ">= 300,000/s"),
                ("stream-csv", f"/stream-csv/{n}", ">= 300,000/s"),
            ):
                base_rss = rss_kib(pid)
                report(name, n, [fetch(base + path, pid) for _ in range(args.runs)], base_rss, target)
            if "DATABASE_URL" not in env:
                print("users export skipped: set DATABASE_URL and REDIS_URL to seed the users")
                return 0
            asyncio.run(seed_users(env["DATABASE_URL"], n))
            for name, fmt, target in (
                ("users/export csv", "csv", ">= 300,000/s, RSS +< 30 MB"),
                ("users/export json", "json", ">= 150,000/s, RSS +< 30 MB"),
                ("users/export ndjson", "ndjson", ">= 150,000/s, RSS +< 30 MB"),
            ):
                base_rss = rss_kib(pid)
                runs = [fetch(f"{base}/users/export?format={fmt}", pid) for _ in range(args.runs)]
                report(name, n, runs, base_rss, target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
