"""Embedded-mode start-up time: launch `run.py` with no URLs until /ready answers 200.

    python -m bench.startup [--warm-runs N]

The first run is cold (an empty data dir: initdb, first start), the rest are warm (same data
dir). Prints each time and the warm median.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def time_to_ready(config: Path, port: int, timeout: float = 120.0) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "run.py", "--config", str(config), "--workers", "1"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while time.perf_counter() - started < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"run.py exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return time.perf_counter() - started
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.01)
        raise RuntimeError("run.py did not become ready")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.startup")
    parser.add_argument("--warm-runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hotpath-startup-") as tmp:
        port = free_port()
        config = Path(tmp) / "config.toml"
        config.write_text(f'[server]\nport = {port}\n[embedded]\ndata_dir = "{tmp}/var"\n')
        cold = time_to_ready(config, port)
        print(f"cold start (empty data dir) to /ready: {cold:.2f} s")
        warm = [time_to_ready(config, port) for _ in range(args.warm_runs)]
        print("warm starts to /ready: " + ", ".join(f"{w:.2f} s" for w in warm))
        print(f"warm median: {statistics.median(warm):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
