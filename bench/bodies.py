"""Worst-case request bodies, each at its cap: how long until hotpath refuses or has parsed
it, and how long GET /health waits meanwhile (what the event loop is kept from doing).

    python -m bench.bodies [--repeat 5]

One worker (run.py --workers 1) on every CPU, so the YAML child process may take another
core, as in production. For each case the body is sent `repeat` times, one at a time, while
a second connection asks GET /health back to back; reported: the body's median and worst
answer time, and the worst /health answer seen while bodies were in flight (~1 ms when the
loop is free). JSON/msgpack/YAML go to POST /users (a valid parse of a list or of unknown
fields ends in a 422, after the whole body was parsed), bulk bodies to POST /bulk-process
(10,001 rows: parsed in full, then 413), forms to POST /send-notification.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import aiohttp
import msgpack

from bench.run import ALL_CPUS, OPEN_ROUTES, free_port, hotpath_env, server

KiB, MiB = 1024, 1024 * 1024
Case = tuple[str, str, dict[str, str], Callable[[], bytes]]


def fill(unit: bytes, size: int, head: bytes = b"[", tail: bytes = b"0]") -> bytes:
    return head + unit * ((size - len(head) - len(tail)) // len(unit)) + tail


def multipart(parts: list[tuple[str, bytes]]) -> bytes:
    out = b"".join(
        b'--B\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (n.encode(), v) for n, v in parts
    )
    return out + b"--B--\r\n"


def csv_rows(rows: int, width: int) -> bytes:
    return b"name,email\n" + b"".join(b"%s,u%d@example.com\n" % (b"n" * width, i) for i in range(rows))


def bulk_json(rows: int, width: int) -> bytes:
    record = b'{"name":"%s","email":"u%%d@example.com"}' % (b"n" * width)
    return b"[" + b",".join(record % i for i in range(rows)) + b"]"


def many_keys(n: int) -> bytes:
    return b"{" + b",".join(b'"k%d":0' % i for i in range(n)) + b"}"


JSON = {"Content-Type": "application/json"}
PACK = {"Content-Type": "application/vnd.msgpack"}
YAML = {"Content-Type": "application/yaml"}
GZ_YAML = {**YAML, "Content-Encoding": "gzip"}
CSV = {"Content-Type": "text/csv"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
MULTI = {"Content-Type": "multipart/form-data; boundary=B"}
USERS, BULK, NOTIFY = "/users", "/bulk-process", "/send-notification"

CASES: list[Case] = [
    # JSON: 1 MiB (server.client_max_size), 4,096 arrays/objects, 65,536 values, 16 fields
    (
        "JSON 65,536 short strings, then text to 1 MiB",
        USERS,
        JSON,
        lambda: b'["' + b'a","' * 65_535 + b"a" * 750_000 + b'"]',
    ),
    (
        "JSON 4,096 arrays of 15 integers",
        USERS,
        JSON,
        lambda: b"[" + b",".join([b"[" + b"0," * 14 + b"0]"] * 4095) + b"]",
    ),
    ("JSON 1 MiB of integers (refused by count)", USERS, JSON, lambda: fill(b"0,", MiB)),
    ("JSON 1 MiB string of \\u escapes", USERS, JSON, lambda: b'["' + b"\\u00e9" * (MiB // 6 - 1) + b'"]'),
    (
        "JSON object of 16 fields of 64 KiB",
        USERS,
        JSON,
        lambda: many_keys(15)[:-1] + b',"x":"' + b"a" * 900_000 + b'"}',
    ),
    ("JSON object of 90,000 keys (refused by count)", USERS, JSON, lambda: many_keys(90_000)),
    ("JSON 1,000 deep (refused after parsing)", USERS, JSON, lambda: b"[" * 1000 + b"]" * 1000),
    ("JSON 349,525 arrays (refused by count)", USERS, JSON, lambda: fill(b"[],", MiB, tail=b"[]]")),
    # msgpack: the same bounds
    ("msgpack 65,535 integers", USERS, PACK, lambda: msgpack.packb([2**40] * 65_535)),
    ("msgpack 65,535 short strings", USERS, PACK, lambda: msgpack.packb(["a"] * 65_535)),
    (
        "msgpack 4,095 maps of 7 keys",
        USERS,
        PACK,
        lambda: msgpack.packb([{f"k{i}": 1 for i in range(7)}] * 4095),
    ),
    ("msgpack 1 MiB of integers (refused)", USERS, PACK, lambda: msgpack.packb([1] * (MiB - 8))),
    ("msgpack 1 MiB of maps (refused at the 4,097th)", USERS, PACK, lambda: msgpack.packb([{}] * (MiB - 8))),
    # YAML: 64 KiB (server.yaml_max_size)
    ("YAML 1 KiB of integers (inline)", USERS, YAML, lambda: fill(b"1,", KiB, tail=b"1]")),
    ("YAML 64 KiB of integers (child)", USERS, YAML, lambda: fill(b"1,", 64 * KiB, tail=b"1]")),
    ("YAML 64 KiB of strings (child)", USERS, YAML, lambda: fill(b"a,", 64 * KiB, tail=b"a]")),
    ("YAML 64 KiB block list of 16,000 items (child)", USERS, YAML, lambda: b"- a\n" * 16_000),
    ("YAML 64 KiB of '[' (refused by the byte check)", USERS, YAML, lambda: b"[" * (64 * KiB)),
    ("YAML 64 KiB, 21-digit integers (refused)", USERS, YAML, lambda: b"- 123456789012345678901\n" * 2700),
    ("YAML 200 KB (refused while reading)", USERS, YAML, lambda: b"- item\n" * (200 * KiB // 7)),
    (
        "YAML 8 MB in 8 KB of gzip (refused)",
        USERS,
        GZ_YAML,
        lambda: gzip.compress(b"- " + b"a" * (8 * MiB), 9),
    ),
    # bulk: 2 MiB (jobs.bulk_max_size), 10,000 rows (jobs.bulk_max_rows)
    ("bulk JSON 10,001 records in 2 MiB", BULK, JSON, lambda: bulk_json(10_001, 165)),
    ("bulk CSV 10,001 rows in 2 MiB (child)", BULK, CSV, lambda: csv_rows(10_001, 180)),
    ("bulk CSV 2 MiB of blank lines (refused)", BULK, CSV, lambda: b"name,email\n" + b"\n" * (2 * MiB - 12)),
    ("bulk CSV 2 MiB of ',\\n' (refused)", BULK, CSV, lambda: b"name,email\n" + b",\n" * (MiB - 6)),
    # forms: 1 MiB, 16 fields (server.body_max_fields)
    (
        "form 16 fields of 64 KiB",
        NOTIFY,
        FORM,
        lambda: b"&".join(b"f%d=%s" % (i, b"%41" * 21_000) for i in range(16)),
    ),
    ("form 1 MiB of '&' (refused by count)", NOTIFY, FORM, lambda: b"&" * MiB),
    (
        "multipart 16 parts of 64 KiB",
        NOTIFY,
        MULTI,
        lambda: multipart([(f"f{i}", b"x" * 64_000) for i in range(16)]),
    ),
    (
        "multipart 17 parts (refused at the 17th)",
        NOTIFY,
        MULTI,
        lambda: multipart([(f"f{i}", b"x") for i in range(17)]),
    ),
]


async def health_poller(base: str, stop: asyncio.Event, worst: list[float]) -> None:
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            start = time.perf_counter()
            async with session.get(base + "/health") as resp:
                await resp.read()
            worst[0] = max(worst[0], time.perf_counter() - start)


async def measure(base: str, repeat: int) -> None:
    print(f"{'case':52} {'status':>6} {'bytes':>9} {'median':>9} {'worst':>9} {'/health worst':>14}")
    async with aiohttp.ClientSession() as session:
        for name, path, headers, make in CASES:
            body = make()
            times: list[float] = []
            status = 0
            worst = [0.0]
            stop = asyncio.Event()
            poller = asyncio.create_task(health_poller(base, stop, worst))
            await asyncio.sleep(0.05)
            worst[0] = 0.0
            for _ in range(repeat):
                start = time.perf_counter()
                async with session.post(base + path, data=body, headers=headers) as resp:
                    await resp.read()
                    status = resp.status
                times.append(time.perf_counter() - start)
            stop.set()
            await poller
            print(
                f"{name:52} {status:>6} {len(body):>9,} {statistics.median(times) * 1000:>7.1f}ms "
                f"{max(times) * 1000:>7.1f}ms {worst[0] * 1000:>12.1f}ms"
            )
        query = "&".join(f"f{i}={quote('x')}" for i in range(1100))  # within the 8 KiB request line
        start = time.perf_counter()
        async with session.post(f"{base}/send-notification?{query}") as resp:
            await resp.read()
        took = (time.perf_counter() - start) * 1000
        print(f"{'query of 1,100 parameters':52} {resp.status:>6} {len(query):>9,} {took:>7.1f}ms")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bodies")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="hotpath-bench-") as tmp:
        env, config = hotpath_env(Path(tmp))
        env.update(OPEN_ROUTES)
        env["HOTPATH_JOBS_CONCURRENCY"] = "0"
        cmd = [sys.executable, "run.py", "--config", str(config), "--port", str(port), "--workers", "1"]
        with server(cmd, base + "/ready", env, cpu=ALL_CPUS):
            asyncio.run(measure(base, args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
