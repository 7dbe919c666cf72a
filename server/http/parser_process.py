"""Bodies too costly to parse on the event loop go to a child process: YAML and bulk CSV.

Within server.yaml_max_size (64 KiB) a YAML body costs up to ~100 ms of CPU (libyaml composes
in C but holds the GIL throughout, and resolving and constructing each value is Python); 10,000
rows of bulk CSV ~15-60 ms of Python. A thread would hold the GIL against the loop just the
same (in a thread the CSV rows delayed GET /health by 48 ms). The child (`python -m
server.http.parser_process`, started on first use, one per worker process) takes one body at a
time over a pipe and answers with the value as msgpack, which the loop unpacks in C; a body
that takes longer than server.parser_timeout gets the child killed (and a 413), so a hostile
document costs a bounded amount of one other core, never the worker's loop. The child leaves
when its stdin closes, which is also what happens when the worker dies.

Frames: the child first writes one READY byte (its imports done: the timeout is the parse's
alone). Then parent -> child: format (YAML, CSV), limits (containers, items, rows), length,
body; child -> parent: kind (OK, BAD, TOO_LARGE), length, payload (the packed value, or the
error message).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import struct
import sys
from pathlib import Path
from typing import Any, BinaryIO

from server.http import bodies, packing

log = logging.getLogger("hotpath.parser")

_REQUEST = struct.Struct(">BIIII")  # format, containers, items, rows, length
_ANSWER = struct.Struct(">BI")  # kind, length
YAML, CSV = 1, 2
OK, BAD, TOO_LARGE = 0, 1, 2
READY = b"R"
_START_TIMEOUT = 30.0  # a cold interpreter on a loaded machine; a child never ready is killed
_ROOT = Path(__file__).resolve().parents[2]  # where `server` is importable from


class ParseTimeout(bodies.BodyTooLarge):
    """The body took longer than the timeout to parse (the child was killed)."""


class ParserUnavailable(Exception):
    """The child process could not be started (the server's fault, not the body's: 503)."""


class ParserProcess:
    """The child process that parses costly bodies for one app, started when first needed."""

    def __init__(self, *, timeout: float) -> None:
        self.timeout = timeout
        self.started = 0  # children started so far (a killed one is replaced on next use)
        self.parsed = 0  # bodies the child answered
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def yaml(self, body: bytes, limits: bodies.Limits) -> Any:
        """bodies.parse_yaml(body, limits), in the child."""
        return await self._parse(YAML, body, limits, 0)

    async def csv(self, body: bytes, max_rows: int) -> list[dict[str, str]]:
        """bodies.parse_csv_records(body, max_rows), in the child."""
        records: list[dict[str, str]] = await self._parse(CSV, body, bodies.Limits(), max_rows)
        return records

    async def _parse(self, fmt: int, body: bytes, limits: bodies.Limits, rows: int) -> Any:
        """The value of `body` parsed in the child.

        BodyError / BodyTooLarge as the parser raises them; ParseTimeout (a BodyTooLarge) when
        the child does not answer within the timeout; BodyError when it died on the body;
        ParserUnavailable when no child could be started.
        """
        async with self._lock:
            proc = await self._child()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                async with asyncio.timeout(self.timeout):
                    head = _REQUEST.pack(fmt, limits.containers, limits.items, rows, len(body))
                    proc.stdin.write(head + body)
                    await proc.stdin.drain()
                    kind, size = _ANSWER.unpack(await proc.stdout.readexactly(_ANSWER.size))
                    payload = await proc.stdout.readexactly(size)
            except TimeoutError:
                await self._kill()
                raise ParseTimeout(
                    f"the body takes more than {self.timeout:g} s to parse (server.parser_timeout)"
                ) from None
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                await self._kill()
                log.error("the parser process died on a body of %d bytes: %r", len(body), exc)
                raise bodies.BodyError("the body could not be parsed") from None
            except BaseException:
                # cancelled mid-exchange: the child's answer would be read as the next body's
                await self._kill()
                raise
            self.parsed += 1
        if kind == OK:
            return packing.unpack(payload)
        error = bodies.BodyTooLarge if kind == TOO_LARGE else bodies.BodyError
        raise error(payload.decode("utf-8", "replace"))

    async def _child(self) -> asyncio.subprocess.Process:
        if self._proc is not None and self._proc.returncode is None:
            return self._proc
        if self._proc is not None:
            await self._kill()  # reap the one that died
        self._proc = proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server.http.parser_process",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=_ROOT,
        )
        self.started += 1
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(_START_TIMEOUT):
                ready = await proc.stdout.readexactly(len(READY))
        except (TimeoutError, asyncio.IncompleteReadError) as exc:
            await self._kill()
            log.error("the parser process did not start: %r", exc)
            raise ParserUnavailable("parsing this body is unavailable, retry shortly") from None
        except BaseException:
            await self._kill()
            raise
        if ready != READY:  # pragma: no cover - something else wrote to the child's stdout
            await self._kill()
            raise ParserUnavailable(f"the parser process started with {ready!r}")
        return proc

    async def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        # shielded: a cancelled request still reaps the child it had killed
        await asyncio.shield(proc.wait())

    async def close(self) -> None:
        """End the child: EOF on its stdin, then a kill if it does not leave within 5 s."""
        async with self._lock:
            proc, self._proc = self._proc, None
            if proc is None:
                return
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


# ---------------------------------------------------------------- the child


def _parse_one(fmt: int, body: bytes, limits: bodies.Limits, rows: int) -> Any:
    if fmt == YAML:
        return bodies.parse_yaml(body, limits)
    if fmt == CSV:
        return bodies.parse_csv_records(body, rows)
    raise ValueError(f"unknown format {fmt}")  # pragma: no cover - the parent sends only those


def serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Answer every body read from `stdin` until it closes."""
    stdout.write(READY)
    stdout.flush()
    while True:
        head = stdin.read(_REQUEST.size)
        if len(head) < _REQUEST.size:
            return
        fmt, containers, items, rows, size = _REQUEST.unpack(head)
        body = stdin.read(size)
        limits = bodies.Limits(containers=containers, items=items)
        try:
            kind, payload = OK, packing.pack(_parse_one(fmt, body, limits, rows))
        except bodies.BodyTooLarge as exc:
            kind, payload = TOO_LARGE, str(exc).encode()
        except bodies.BodyError as exc:
            kind, payload = BAD, str(exc).encode()
        except Exception as exc:  # one body must never end the process
            # a parser failing in a way the bounds did not foresee: that body is refused and
            # the next one is served by this same process
            kind, payload = BAD, f"the body could not be parsed ({type(exc).__name__})".encode()
        stdout.write(_ANSWER.pack(kind, len(payload)) + payload)
        stdout.flush()


def main() -> None:
    # Ctrl-C reaches the whole process group: the worker above decides when this one ends
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve(sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main()
