"""The listening site run.py serves through: hotpath's protocol and a per-worker connection cap.

uvloop accepts every connection it is offered: when descriptors run out, libuv accepts and
closes the queued connections silently. `GuardedSite` counts the connections of this worker. At
`server.max_connections` it stops accepting (closes its listener, a dup of the shared socket,
so the kernel queue lives on for the other workers) and listens again once a connection closes.
A worker that fills up while every other worker of the supervisor is full too keeps accepting,
and answers each new connection with a pre-written 503 problem and `Retry-After` instead
(`Board` is how workers know). "connection cap reached" is logged at most once per second.

aiohttp has no public hook for this either (checked on aiohttp 3.14.5): the site sets BaseSite's
`_server` (so BaseSite.stop() closes the listener) and reads Server's `_kwargs` (what aiohttp's
own Server.__call__ gives its protocols). tests/runtime/test_slow_clients.py checks both are still there
and that the site's own names are none of BaseSite's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import resource
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web

from server.config import Config
from server.runtime.protocol import GuardedRequestHandler, closing_problem
from server.runtime.supervisor import Board

__all__ = ("CAP_RESPONSE", "DEFAULT_CAP", "FD_OTHERS", "GuardedSite", "connection_cap")

log = logging.getLogger("hotpath.connections")

DEFAULT_CAP = 10_000
# Descriptors a worker needs besides client connections: its pools (database.max_size,
# redis.max_connections), upstream fetches (fetch.concurrency), and this many for the rest
# (listening socket, epoll, pipes, log and metric files, refused connections still lingering).
FD_OTHERS = 128
RETRY_AFTER = 1  # seconds, on the 503 sent when every worker is full
# Rejected connections kept open to read the client's request (so closing sends FIN, not
# RST, and the client reads the 503): at most this many at once, each for at most LINGER s.
MAX_LINGERING = 32
LINGER = 1.0
CAP_LOG_INTERVAL = 1.0

# RFC 9110 6.6.1: a 5xx may go without Date, so this one is written once, whole.
_CAP_HEAD, _CAP_BODY = closing_problem(
    503,
    "Service Unavailable",
    "unavailable",
    "every worker is at its connection cap (server.max_connections); retry shortly",
    f"Retry-After: {RETRY_AFTER}\r\n",
)
CAP_RESPONSE = _CAP_HEAD + b"\r\n" + _CAP_BODY


class _Rejection(asyncio.Protocol):
    """A connection over the cap while every worker is full: the 503, then close.

    The FIN goes with the answer, and the client's request is read and dropped until it
    closes (at most LINGER s), so our close does not reset a connection whose request we have
    not read: a reset can destroy the 503 before the client reads it.
    """

    def __init__(self, lingering: set[asyncio.BaseTransport]) -> None:
        self._lingering = lingering
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio subclass
        transport.write(CAP_RESPONSE)
        if len(self._lingering) >= MAX_LINGERING or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._transport = transport
        self._lingering.add(transport)
        self._timer = asyncio.get_running_loop().call_later(LINGER, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # the request we answered already

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None:
            self._lingering.discard(self._transport)


def connection_cap(config: Config) -> int:
    """server.max_connections, or (0) DEFAULT_CAP or what the open-files limit leaves, whichever is lower."""
    others = FD_OTHERS + config.database.max_size + config.redis.max_connections + config.fetch.concurrency
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    room = limit - others if limit != resource.RLIM_INFINITY else sys.maxsize
    wanted = config.server.max_connections
    if wanted == 0:
        return max(1, min(DEFAULT_CAP, room))
    if wanted > room:
        log.warning(
            "server.max_connections %d is more than the open-files limit (%d) leaves after %d for "
            "pools and files; using %d",
            wanted, limit, others, max(1, room),
        )  # fmt: skip
        return max(1, room)
    return wanted


_ACCEPTING, _PAUSED, _REJECTING = "accepting", "paused", "rejecting"
RELISTEN_DELAY = 1.0  # seconds before trying again to listen after an error (descriptors exhausted)


class GuardedSite(web.BaseSite):
    """aiohttp's SockSite with hotpath's protocol and a per-worker connection cap.

    `sock` stays ours: each listener is opened on a dup of it and closed to pause, so the
    queue of the shared socket survives (for the other workers, or for our own return).
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        *,
        backlog: int,
        cap: int,
        header_timeout: float,
        body_timeout: float,
        handler_kwargs: dict[str, Any],
        board: Board | None = None,
        send_timeout: float = 0.0,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._app_runner = runner
        self._sock = sock
        host, port = sock.getsockname()[:2]
        self._name = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        self.cap = cap
        self.count = 0
        self.lingering: set[asyncio.BaseTransport] = set()
        self._timeouts = {
            "header_timeout": header_timeout,
            "body_timeout": body_timeout,
            "send_timeout": send_timeout,
        }
        self._handler_kwargs = handler_kwargs
        self._board = board if board is not None else Board()
        self._state = _ACCEPTING
        self._stopped = False
        self._change: asyncio.Handle | None = None  # a pending pause or resume
        self._opening: asyncio.Task[None] | None = None
        self._logged = -CAP_LOG_INTERVAL
        self._rejected = 0
        self._make: Callable[[], GuardedRequestHandler] | None = None

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        manager = self._app_runner.server
        assert manager is not None  # the runner is set up before a site is made
        # The protocol gets what aiohttp's own Server.__call__ would give it: the runner's
        # arguments merged with the app's handler_args (auto_decompress=False among them: a body
        # is decoded by its reader, never past the route's limit, never inflated by aiohttp).
        kwargs = {**self._handler_kwargs, **manager._kwargs}
        self._make = functools.partial(
            GuardedRequestHandler,
            manager,
            loop=asyncio.get_running_loop(),
            site=self,
            **self._timeouts,
            **kwargs,
        )
        self._board.mark(False)
        await self._listen()

    async def stop(self) -> None:
        self._stopped = True
        if self._change is not None:
            self._change.cancel()
        if self._opening is not None:
            self._opening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._opening
        for transport in list(self.lingering):
            transport.close()
        await super().stop()  # closes the current listener, if any

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self._protocol, sock=self._sock.dup(), backlog=self._backlog)
        if self._stopped or self._state == _PAUSED:
            server.close()
        else:
            self._server = server

    async def _relisten(self) -> None:
        """Listen again after a pause; an error (no descriptor left for the dup) is retried."""
        while not self._stopped and self._state != _PAUSED and self._server is None:
            try:
                await self._listen()
            except OSError as exc:
                log.error("cannot listen again: %s; retrying in %g s", exc, RELISTEN_DELAY)
                await asyncio.sleep(RELISTEN_DELAY)

    def _protocol(self) -> asyncio.BaseProtocol:
        """The listener's protocol factory: called once per accepted connection."""
        if self.count >= self.cap:
            if self._state == _REJECTING and self._board.everyone_full():
                self._rejected += 1
                self._report()
                return _Rejection(self.lingering)
            # Accepted in the same batch as the one that filled us, or a worker just freed up:
            # serve it, and stop accepting (again).
            self._schedule(self._on_full)
        self.count += 1
        if self.count >= self.cap:
            self._schedule(self._on_full)
        assert self._make is not None
        return self._make()

    def released(self) -> None:
        """A counted connection closed."""
        self.count -= 1
        if self._state != _ACCEPTING and self.count < self.cap:
            self._schedule(self._on_free)

    def _schedule(self, change: Callable[[], None]) -> None:
        # Never from inside the factory itself: closing the listener there would close the
        # connection being accepted along with it.
        if self._change is None and not self._stopped:
            self._change = asyncio.get_running_loop().call_soon(change)

    def _on_full(self) -> None:
        self._change = None
        if self._stopped or self.count < self.cap:
            return
        if self._board.mark(True):
            # Nobody can take new connections: we keep accepting them, to answer 503.
            self._state = _REJECTING
            if self._server is None and (self._opening is None or self._opening.done()):
                self._opening = asyncio.ensure_future(self._relisten())
        elif self._state != _PAUSED:
            self._state = _PAUSED
            if self._server is not None:
                self._server.close()
                self._server = None
        self._report()

    def _on_free(self) -> None:
        self._change = None
        if self._stopped or self.count >= self.cap or self._state == _ACCEPTING:
            return
        self._state = _ACCEPTING
        self._board.mark(False)
        if self._server is None and (self._opening is None or self._opening.done()):
            self._opening = asyncio.ensure_future(self._relisten())

    def _report(self) -> None:
        now = time.monotonic()
        if now - self._logged < CAP_LOG_INTERVAL:
            return
        self._logged = now
        if self._state == _REJECTING:
            what = f"every worker is full: new connections get 503 ({self._rejected} so far)"
        else:
            what = "new connections go to the other workers"
        log.warning(
            "connection cap reached: %d connections open (server.max_connections %d); %s",
            self.count, self.cap, what,
        )  # fmt: skip
