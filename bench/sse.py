"""Event-feed benchmark: one hotpath worker holding many idle SSE subscribers.

    python -m bench.sse [--subscribers 10000] [--clients 2] [--rounds 5]

Opens `--subscribers` streams (GET /events?channels=users) from `--clients` processes of raw
asyncio sockets (uvloop) on the load core, then measures
1. memory per idle subscriber: the server's RSS after they connected minus before, / count
   (target < 40 KiB);
2. delivery latency: POST /events with the publish time in the data; every subscriber notes
   when its bytes reached it (CLOCK_MONOTONIC is one clock for every process on the machine;
   the events are parsed after the round, so 5,000 streams sharing one client process do not
   queue behind each other's parsing); p50/p99/max over all subscribers and rounds (target
   p99 < 500 ms).
Loopback only; the server is pinned to CPU 0, the clients to CPU 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from multiprocessing.connection import Connection
from pathlib import Path

import uvloop

from bench.run import LOAD_CPU, OPEN_ROUTES, SERVER_CPU, _wait_http, free_port, hotpath_env, taskset

TOKEN = "bench-token"
REQUEST = b"GET /events?channels=users HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Tally:
    """Arrivals in one client process: (arrival time, the event's data line) noted as they
    come and parsed only when the round is over, so parsing one event never delays noting
    when the next one arrived. `done` is set when `want` events have arrived."""

    def __init__(self, want: int) -> None:
        self.want = want
        self.arrivals: list[tuple[float, bytes]] = []
        self.rounds: dict[int, list[float]] = {}
        self.done = asyncio.Event()

    def add(self, now: float, line: bytes) -> None:
        arrivals = self.arrivals
        arrivals.append((now, line))
        if len(arrivals) >= self.want:
            self.done.set()

    def take(self, round_no: int) -> list[float]:
        """Latencies of round `round_no` (publish time in the event -> arrival)."""
        for now, line in self.arrivals:
            doc = json.loads(line)
            self.rounds.setdefault(doc["round"], []).append(now - doc["t"])
        self.arrivals.clear()
        return self.rounds.pop(round_no, [])


class Subscriber(asyncio.Protocol):
    """Notes the opening frame (connected), then the arrival time of each event: the clock is
    read first thing, and the only work per event is finding its data line in the bytes (a
    real client on its own machine does not wait behind 4,999 others being parsed)."""

    def __init__(self, connected: asyncio.Event, tally: Tally) -> None:
        self.buf = b""
        self.connected = connected
        self.opened = False
        self.tally = tally
        self.lost = False

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if self.buf:
            data = self.buf + data
            self.buf = b""
        if not self.opened:
            if b": hotpath feed\n\n" not in data:
                self.buf = data[-4096:]
                return
            self.opened = True
            self.connected.set()
        tail = max(0, len(data) - 8)  # a marker cut in two by a read boundary: kept for the next
        at = data.find(b"\ndata: ")
        while at >= 0:
            end = data.find(b"\n", at + 7)
            if end < 0:
                tail = at  # an event cut by a read boundary has arrived when the rest of it has
                break
            self.tally.add(now, data[at + 7 : end])
            tail = max(tail, end)
            at = data.find(b"\ndata: ", end)
        self.buf = data[tail:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


def client_main(port: int, count: int, pipe: Connection) -> None:
    """One client process: open `count` streams, report, then report each round's latencies."""
    raise_nofile()
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {int(LOAD_CPU)})

    async def run() -> None:
        loop = asyncio.get_running_loop()
        tally = Tally(count)
        protos: list[Subscriber] = []
        sem = asyncio.Semaphore(200)  # the listen backlog is finite: do not SYN-flood it

        async def one() -> None:
            async with sem:
                ready = asyncio.Event()
                for attempt in range(20):
                    try:
                        transport, proto = await loop.create_connection(
                            lambda: Subscriber(ready, tally), "127.0.0.1", port
                        )
                        break
                    except OSError:
                        await asyncio.sleep(0.05 * (attempt + 1))
                else:
                    raise RuntimeError("could not connect")
                transport.write(REQUEST)
                await asyncio.wait_for(ready.wait(), 60)
                protos.append(proto)

        await asyncio.gather(*(one() for _ in range(count)))
        pipe.send(("connected", len(protos)))
        while True:
            msg = await loop.run_in_executor(None, pipe.recv)
            if msg == "stop":
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tally.done.wait(), 30)
            tally.done.clear()
            pipe.send(("round", tally.take(msg), sum(p.lost for p in protos)))

    # uvloop, as the server uses: the stock loop spends several times longer per read
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())


def publish(base: str, round_no: int) -> None:
    body = json.dumps(
        {"channel": "users", "event": "bench", "data": {"round": round_no, "t": time.monotonic()}}
    )
    req = urllib.request.Request(
        f"{base}/events",
        data=body.encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 201


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sse")
    parser.add_argument("--subscribers", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    raise_nofile()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="hotpath-sse-") as tmp:
        env, config = hotpath_env(Path(tmp))
        env.update(OPEN_ROUTES)
        env.update(
            {
                "HOTPATH_FEED_ADMIN_TOKEN": TOKEN,
                "HOTPATH_FEED_MAX_SUBSCRIBERS": str(args.subscribers + 100),
                "HOTPATH_FEED_TICKER": "false",
                "HOTPATH_FEED_KEY_PREFIX": f"hotpath:bench-sse-{os.getpid()}:",
                "HOTPATH_RATELIMIT_ENABLED": "false",
            }
        )
        cmd = [*taskset(SERVER_CPU), sys.executable, "run.py", "--config", str(config), "--port", str(port)]
        log = tempfile.TemporaryFile()  # noqa: SIM115 - read in the finally below
        proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent, env=env, stderr=log)
        try:
            asyncio.run(_wait_http(f"{base}/ready", proc))
            time.sleep(1.0)  # let start-up garbage settle before the baseline
            before = rss_kib(proc.pid)
            ctx = mp.get_context("spawn")
            per = [
                args.subscribers // args.clients + (i < args.subscribers % args.clients)
                for i in range(args.clients)
            ]
            pipes, workers = [], []
            started = time.perf_counter()
            for count in per:
                parent, child = ctx.Pipe()
                w = ctx.Process(target=client_main, args=(port, count, child))
                w.start()
                pipes.append(parent)
                workers.append(w)
            connected = sum(p.recv()[1] for p in pipes)
            took = time.perf_counter() - started
            time.sleep(1.0)
            after = rss_kib(proc.pid)
            per_sub = (after - before) / max(1, connected)
            print(
                f"{connected} subscribers connected in {took:.1f} s; server RSS {before / 1024:.1f} MiB -> "
                f"{after / 1024:.1f} MiB: {per_sub:.1f} KiB per idle subscriber (target < 40 KiB)"
            )
            latencies: list[float] = []
            for r in range(args.rounds):
                for p in pipes:
                    p.send(r)
                time.sleep(0.2)
                publish(base, r)
                got: list[float] = []
                lost = 0
                for p in pipes:
                    _, mine, gone = p.recv()
                    got += mine
                    lost += gone
                got.sort()
                latencies += got
                print(
                    f"round {r}: {len(got)}/{connected} delivered, "
                    f"p50 {statistics.median(got) * 1000:.0f} ms, "
                    f"p99 {got[int(len(got) * 0.99) - 1] * 1000:.0f} ms, max {got[-1] * 1000:.0f} ms"
                    f"{f', {lost} connections lost' if lost else ''}"
                )
            latencies.sort()
            print(f"fastest delivery {latencies[0] * 1000:.0f} ms (publish over HTTP + XADD + XREAD wake-up)")
            print(
                f"all rounds: p50 {statistics.median(latencies) * 1000:.0f} ms, "
                f"p99 {latencies[int(len(latencies) * 0.99) - 1] * 1000:.0f} ms, "
                f"max {latencies[-1] * 1000:.0f} ms over {len(latencies)} deliveries (target p99 < 500 ms)"
            )
            for p in pipes:
                p.send("stop")
            for w in workers:
                w.join(30)
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.seek(0)
            text = log.read().decode(errors="replace")
            if proc.returncode not in (0, -15):
                sys.stderr.write(text[-2000:])
            for line in text.splitlines():
                if "handed out" in line:
                    print("server:", line.split("hotpath.feed: ", 1)[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
