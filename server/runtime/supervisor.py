"""Worker processes sharing one listening socket: started, watched, restarted, rolled, stopped.

`python run.py --workers N` makes this process a supervisor. It binds the socket once and
hands the same file descriptor to N `run.py serve --listen-fd` children, so the kernel's one
accept queue feeds them all: when a worker stops accepting (shutdown, restart), connections
already queued wait for the others instead of being reset, which SO_REUSEPORT's per-socket
queues would not give us. Workers are fresh interpreters (not forks), so no loop, pool or
client ever crosses a fork. A `Board` shared the same way tells each worker which others are
at their connection cap (server/runtime/site.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import mmap
import os
import signal
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from server.runtime.embedded import die_with_parent

log = logging.getLogger("hotpath.supervisor")

# A worker that exits before it ever listened with one of these codes hit a configuration or
# start-up error (run.py's EXIT_CONFIG / EXIT_STARTUP): restarting it cannot help.
FATAL_AT_START = {1, 2}


def listening_socket(host: str, port: int, backlog: int, *, inheritable: bool = True) -> socket.socket:
    """The one socket every worker accepts on, inheritable by children."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=backlog)
    sock.set_inheritable(inheritable)
    return sock


class Board:
    """One byte per worker slot, in a file the supervisor shares with its workers: 1 = full.

    A worker reaching its cap marks its byte and reads the others under one lock, so of two
    workers filling at once exactly one sees that everybody is full (and answers 503s). A
    worker without a supervisor has a board of its own, one byte long.
    """

    def __init__(self, fd: int | None = None, slot: int = 0) -> None:
        self._fd = fd
        self._slot = slot
        self._bytes: bytearray | mmap.mmap = bytearray(1) if fd is None else mmap.mmap(fd, 0)

    @staticmethod
    def create(slots: int) -> int:
        """A new board file for `slots` workers, everybody accepting: its descriptor."""
        fd = os.memfd_create("hotpath-board") if hasattr(os, "memfd_create") else _temporary_fd()
        os.ftruncate(fd, slots)
        return fd

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._fd is None:
            yield
            return
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def mark(self, full: bool) -> bool:
        """Set this worker's byte; True when every worker is full now."""
        with self._locked():
            self._bytes[self._slot] = 1 if full else 0
            return self.everyone_full()

    def everyone_full(self) -> bool:
        return self._bytes.find(b"\0") == -1

    def close(self) -> None:
        if isinstance(self._bytes, mmap.mmap):
            self._bytes.close()


def _temporary_fd() -> int:  # pragma: no cover - platforms without memfd_create
    fd, path = tempfile.mkstemp(prefix="hotpath-board-")
    os.unlink(path)
    return fd


@dataclass(eq=False)
class Worker:
    slot: int
    proc: asyncio.subprocess.Process
    ready: asyncio.Future[bool]
    started: float = field(default_factory=time.monotonic)
    stopping: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid


class Supervisor:
    """Keeps `count` workers running until told to stop.

    SIGTERM/SIGINT: every worker gets SIGTERM (each finishes its in-flight requests within
    server.shutdown_timeout), then we exit 0. SIGHUP: a rolling restart, one slot at a time,
    each replacement listening before its predecessor is asked to stop. A worker that dies is
    restarted after a backoff; `crash_limit` crashes within `crash_window` seconds stop
    everything with exit 1.
    """

    def __init__(
        self,
        worker_argv: Sequence[str],
        count: int,
        sock: socket.socket,
        *,
        env: dict[str, str] | None = None,
        shutdown_timeout: float = 10.0,
        start_timeout: float = 60.0,
        crash_limit: int = 5,
        crash_window: float = 60.0,
        board_fd: int | None = None,
    ) -> None:
        self.worker_argv = list(worker_argv)
        self.board_fd = board_fd
        self.count = count
        self.sock = sock
        self.env = env
        self.shutdown_timeout = shutdown_timeout
        self.start_timeout = start_timeout
        self.crash_limit = crash_limit
        self.crash_window = crash_window
        self.workers: dict[int, Worker] = {}  # slot -> current worker
        self._retired: set[Worker] = set()  # replaced during a roll, still finishing
        self._crashes: list[float] = []
        self._stop = asyncio.Event()
        self._exit_code = 0
        self._rolling: asyncio.Task[None] | None = None
        self._watchers: set[asyncio.Task[None]] = set()

    async def _spawn(self, slot: int) -> Worker:
        read_fd, write_fd = os.pipe()
        argv = [*self.worker_argv, "--listen-fd", str(self.sock.fileno()), "--ready-fd", str(write_fd)]
        fds = [self.sock.fileno(), write_fd]
        if self.board_fd is not None:  # where this worker says it is at its connection cap
            argv += ["--board-fd", str(self.board_fd), "--slot", str(slot)]
            fds.append(self.board_fd)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                pass_fds=fds,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                preexec_fn=die_with_parent,  # a kill -9 of the supervisor takes the workers along
                # Out of the terminal's process group: Ctrl-C reaches the supervisor only, which
                # then sends each worker one SIGTERM (a second signal would cut its shutdown short).
                start_new_session=True,
            )
        finally:
            os.close(write_fd)
        loop = asyncio.get_running_loop()
        # The child writes one byte once it listens; EOF (it died first) means "never ready".
        ready: asyncio.Future[bool] = loop.run_in_executor(None, _read_ready, read_fd)
        worker = Worker(slot, proc, ready)
        watcher = asyncio.create_task(self._watch(worker))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return worker

    async def _watch(self, worker: Worker) -> None:
        code = await worker.proc.wait()
        self._retired.discard(worker)
        if worker.stopping or self._stop.is_set():
            log.info("worker %d (pid %d) exited with %d", worker.slot, worker.pid, code)
            return
        was_ready = worker.ready.done() and worker.ready.result()
        if not was_ready and code in FATAL_AT_START:
            log.error("worker %d exited with %d before it listened; stopping", worker.slot, code)
            self._exit_code = code
            self._stop.set()
            return
        now = time.monotonic()
        self._crashes = [t for t in self._crashes if now - t < self.crash_window] + [now]
        if len(self._crashes) >= self.crash_limit:
            log.error(
                "worker %d (pid %d) died with %d: %d crashes within %g s, giving up",
                worker.slot, worker.pid, code, len(self._crashes), self.crash_window,
            )  # fmt: skip
            self._exit_code = 1
            self._stop.set()
            return
        backoff = min(0.25 * 2 ** (len(self._crashes) - 1), 10.0)
        log.warning(
            "worker %d (pid %d) died with %d; restarting in %.2f s", worker.slot, worker.pid, code, backoff
        )
        await asyncio.sleep(backoff)
        if not self._stop.is_set() and self.workers.get(worker.slot) is worker:
            self.workers[worker.slot] = await self._spawn(worker.slot)

    async def _wait_ready(self, worker: Worker) -> bool:
        try:
            return await asyncio.wait_for(asyncio.shield(worker.ready), self.start_timeout)
        except TimeoutError:
            return False

    async def _roll(self) -> None:
        """Replace each worker in turn; the old one stops only once the new one listens."""
        log.info("rolling restart of %d workers", len(self.workers))
        for slot in sorted(self.workers):
            if self._stop.is_set():
                return
            old = self.workers[slot]
            new = await self._spawn(slot)
            if not await self._wait_ready(new):
                log.error("replacement for worker %d did not start; keeping pid %d", slot, old.pid)
                new.stopping = True
                _signal(new, signal.SIGKILL)
                continue
            self.workers[slot] = new
            self._retired.add(old)
            old.stopping = True
            _signal(old, signal.SIGTERM)
            await old.proc.wait()
        log.info("rolling restart done")

    def _on_hup(self) -> None:
        if self._rolling is None or self._rolling.done():
            self._rolling = asyncio.create_task(self._roll())

    async def run(self) -> int:
        """Start the workers, wait for a stop signal or a fatal failure, stop them all."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        try:
            for slot in range(self.count):
                self.workers[slot] = await self._spawn(slot)
            started = await asyncio.gather(*(self._wait_ready(w) for w in self.workers.values()))
            if all(started):
                log.info(
                    "%d workers listening (pids %s)",
                    self.count,
                    ", ".join(str(w.pid) for w in self.workers.values()),
                )
            else:
                # A worker that died before listening closes its ready pipe a moment before
                # its exit is reaped: let its watcher see the exit code and name the cause.
                dead = [w.proc.wait() for w, ok in zip(self.workers.values(), started, strict=True) if not ok]
                await asyncio.wait([asyncio.ensure_future(d) for d in dead], timeout=5.0)
                for _ in range(3):
                    await asyncio.sleep(0)
                if not self._stop.is_set():
                    log.error("not every worker started within %g s", self.start_timeout)
                    self._exit_code = 1
                    self._stop.set()
            await self._stop.wait()
        finally:
            await self._stop_all()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        return self._exit_code

    async def _stop_all(self) -> None:
        self._stop.set()
        if self._rolling is not None:
            self._rolling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rolling
        everyone = [*self.workers.values(), *self._retired]
        for worker in everyone:
            worker.stopping = True
            _signal(worker, signal.SIGTERM)
        # Workers need shutdown_timeout for in-flight requests, plus closing pools.
        grace = self.shutdown_timeout + 5.0
        waits = [asyncio.create_task(w.proc.wait()) for w in everyone]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=grace)
            for worker in everyone:
                if worker.proc.returncode is None:
                    log.warning(
                        "worker %d (pid %d) did not stop in %g s; killing it", worker.slot, worker.pid, grace
                    )
                    _signal(worker, signal.SIGKILL)
            if pending:
                await asyncio.wait(pending)
        for task in list(self._watchers):
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)


def _signal(worker: Worker, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        worker.proc.send_signal(sig)


def _read_ready(fd: int) -> bool:
    try:
        return os.read(fd, 1) == b"R"
    finally:
        os.close(fd)


def resolve_workers(value: int) -> int:
    """0 means one worker per CPU this process may run on."""
    if value > 0:
        return value
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
