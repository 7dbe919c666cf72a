"""Slow clients and the connection cap: hotpath's protocol, its listening site and its run loop.

aiohttp cuts an idle keep-alive connection (`keepalive_timeout`) but has no deadline for a
request head or body that trickles in, and uvloop accepts every connection it is offered: when
descriptors run out, libuv accepts and closes the queued connections silently. So `run.py`
serves through `GuardedSite` instead of `web.run_app`:

- `GuardedRequestHandler` (aiohttp's protocol) gives a request head `server.client_header_timeout`
  seconds from the connection's start, or from the head's first byte on a reused connection (a
  408 then, or a plain close when nothing was sent), and a request body
  `server.client_body_timeout` seconds from its head (the handler's read raises
  `RequestTimeout`, answered as a 408 problem, then the connection closes). One timer per
  connection, armed lazily: a request that arrives whole costs a few attribute reads.
- `GuardedSite` counts the connections of this worker. At `server.max_connections` it stops
  accepting (closes its listener, a dup of the shared socket, so the kernel queue lives on for
  the other workers) and listens again once a connection closes. A worker that fills up while
  every other worker of the supervisor is full too keeps accepting, and answers each new
  connection with a pre-written 503 problem and `Retry-After` instead (`Board` is how workers
  know). "connection cap reached" is logged at most once per second.
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
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, cast

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from server.config import Config
from server.errors import DomainError
from server.runtime.supervisor import Board

__all__ = (
    "GuardedRequestHandler",
    "GuardedSite",
    "RequestTimeout",
    "connection_cap",
    "run",
)

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


class RequestTimeout(DomainError):
    """The request body did not arrive within server.client_body_timeout."""

    status = 408
    title = "Request Timeout"
    type_slug = "request-timeout"

    def __init__(self, timeout: float) -> None:
        super().__init__(
            f"the request body did not arrive within {timeout:g} s (server.client_body_timeout)",
            headers={"Connection": "close"},
        )


def _problem(status: int, reason: str, slug: str, detail: str, headers: str = "") -> tuple[bytes, bytes]:
    """(head without Date and the blank line, body) of a problem response that closes the connection."""
    body = orjson.dumps({"type": f"/problems/{slug}", "title": reason, "status": status, "detail": detail})
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/problem+json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{headers}"
    )
    return head.encode(), body


_HEAD_TIMEOUT = _problem(
    408,
    "Request Timeout",
    "request-timeout",
    "the request head did not arrive within server.client_header_timeout",
)
# RFC 9110 6.6.1: a 5xx may go without Date, so this one is written once, whole.
_CAP_HEAD, _CAP_BODY = _problem(
    503,
    "Service Unavailable",
    "unavailable",
    "every worker is at its connection cap (server.max_connections); retry shortly",
    f"Retry-After: {RETRY_AFTER}\r\n",
)
CAP_RESPONSE = _CAP_HEAD + b"\r\n" + _CAP_BODY


def _head_timeout_response() -> bytes:
    head, body = _HEAD_TIMEOUT
    return head + f"Date: {formatdate(usegmt=True)}\r\n\r\n".encode() + body


_parse = RequestHandler.data_received  # called directly: cheaper than super() once per request


class GuardedRequestHandler(RequestHandler):
    """aiohttp's protocol with deadlines for a slow request head and a slow request body.

    The deadlines live in two floats and one timer per connection; a timer that fires before a
    deadline re-arms itself for the nearest one, like aiohttp's own keep-alive timer, so a
    request that arrives whole arms nothing. Idle time between requests is keepalive_timeout's.
    """

    def __init__(
        self,
        manager: Server,
        *,
        loop: asyncio.AbstractEventLoop,
        site: GuardedSite | None,
        header_timeout: float,
        body_timeout: float,
        send_timeout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._site = site
        self._header_timeout = header_timeout
        self._body_timeout = body_timeout
        self._send_timeout = send_timeout
        self._send_timer: asyncio.TimerHandle | None = None
        self._head_deadline = 0.0  # 0: no head being waited for
        self._head_started = False  # bytes of the awaited head arrived (then a 408, else a close)
        self._body: StreamReader | None = None
        self._body_deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._head_deadline = self._loop.time() + self._header_timeout
        self._arm(self._head_deadline)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        self._body = None
        site, self._site = self._site, None
        if site is not None:
            site.released()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        seen = self._request_count
        _parse(self, data)
        if self._request_count != seen:
            # Heads completed; the last one's body may still be on its way.
            if self._head_deadline:
                self._head_deadline = 0.0
                self._head_started = False
            messages = self._messages
            if messages:
                body = messages[-1][1]
                if body is not EMPTY_PAYLOAD and body is not self._body and not body.is_eof():
                    self._body = body
                    self._body_deadline = self._loop.time() + self._body_timeout
                    self._arm(self._body_deadline)
        elif data and (self._body is None or self._body.is_eof()) and not self._upgraded:
            # Bytes that are no request body: they begin the next request's head.
            self._head_started = True
            if not self._head_deadline:
                self._head_deadline = self._loop.time() + self._header_timeout
                self._arm(self._head_deadline)

    def _arm(self, when: float) -> None:
        timer = self._timer
        if timer is not None:
            if self._timer_at <= when:
                return  # it fires first and re-arms for `when`
            timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.transport is None or self._force_close:
            return
        now = self._loop.time()
        upcoming: list[float] = []
        head = self._head_deadline
        if head:
            if now < head:
                upcoming.append(head)
            else:
                waiter = self._waiter
                if waiter is not None and not waiter.done() and not self._messages:
                    self._head_timed_out(self._head_started)
                    return
                if self._head_started:
                    # A pipelined head behind a handler still running: it gets its own time
                    # once start() waits for it.
                    self._head_deadline = now + self._header_timeout
                    upcoming.append(self._head_deadline)
                else:
                    self._head_deadline = 0.0
        body = self._body
        if body is not None:
            if body.is_eof() or body.exception() is not None:
                self._body = None
            elif now < self._body_deadline:
                upcoming.append(self._body_deadline)
            else:
                self._body = None
                self._body_timed_out(body)
        if upcoming and self.transport is not None:
            self._arm(min(upcoming))

    # A client that stops reading (its window full, our buffer past the high-water mark) would
    # hold the connection, its handler and its buffered response for ever: pipelined requests
    # it never reads kept 44 connections, and with them the connection cap, full for minutes.
    # The transport pauses us at the high-water mark and resumes us below the low one; paused
    # for server.send_timeout seconds in a row, the connection is aborted (nginx's
    # send_timeout, for clients that reach hotpath directly).
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timeout and self._send_timer is None:
            self._send_timer = self._loop.call_later(self._send_timeout, self._send_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_timed_out(self) -> None:
        self._send_timer = None
        transport = self.transport
        if transport is not None:
            log.info(
                "a client read nothing for %g s (server.send_timeout); connection aborted", self._send_timeout
            )
            transport.abort()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request its parser refused (or to an error no middleware
        caught) as a problem document instead of text/plain; still closing the connection."""
        super().handle_error(request, status, exc, message)  # logs it (server/runtime/logs.py filters)
        if isinstance(exc, HttpProcessingError) and exc.message:
            lines = str(exc.message).strip().splitlines()
            detail = lines[0][:200] if lines else "malformed request"
        elif status < 500:
            detail = "malformed request"
        else:
            detail = "the server could not answer this request"
        title = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
        body = orjson.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail})
        resp = web.Response(status=status, body=body, content_type="application/problem+json")
        resp.force_close()
        return resp

    def _head_timed_out(self, started: bool) -> None:
        if started and self.transport is not None:
            self.transport.write(_head_timeout_response())
        self.force_close()

    def _body_timed_out(self, body: StreamReader) -> None:
        request = self._current_request
        if request is not None and request.content is body:
            # The handler's read raises; its 408 problem goes out, then the connection closes
            # instead of aiohttp draining the rest of the body for lingering_time.
            self._lingering_time = 0.0
            body.set_exception(RequestTimeout(self._body_timeout))
        else:  # the handler is done (aiohttp is draining the body) or not started: just close
            self.force_close()


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
        manager = self._runner.server
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


async def _serve(
    app: web.Application,
    sock: socket.socket,
    config: Config,
    cap: int,
    board: Board | None,
    handler_kwargs: dict[str, Any],
    on_listening: Callable[[], None],
) -> None:
    srv = config.server
    runner = web.AppRunner(app, handle_signals=True, shutdown_timeout=srv.shutdown_timeout, **handler_kwargs)
    await runner.setup()
    site = GuardedSite(
        runner,
        sock,
        backlog=srv.backlog,
        cap=cap,
        header_timeout=srv.client_header_timeout,
        body_timeout=srv.client_body_timeout,
        handler_kwargs=handler_kwargs,
        board=board,
        send_timeout=srv.send_timeout,
    )
    try:
        await site.start()
        on_listening()
        await asyncio.get_running_loop().create_future()  # until SIGTERM/SIGINT cancels us
    finally:
        await runner.cleanup()


def run(
    app: web.Application,
    sock: socket.socket,
    config: Config,
    *,
    loop: asyncio.AbstractEventLoop,
    board: Board | None = None,
    access_log: logging.Logger | None = None,
    access_log_class: type[Any] | None = None,
    on_listening: Callable[[], None] = lambda: None,
) -> None:
    """`web.run_app` for one listening socket, through GuardedSite; returns after SIGTERM/SIGINT
    once in-flight requests finished (server.shutdown_timeout) and the app's cleanup ran."""
    handler_kwargs: dict[str, Any] = {
        "keepalive_timeout": config.server.keepalive_timeout,
        "access_log": access_log,
    }
    if access_log_class is not None:
        handler_kwargs["access_log_class"] = access_log_class
    cap = connection_cap(config)
    main = loop.create_task(_serve(app, sock, config, cap, board, handler_kwargs, on_listening))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            _cancel_remaining(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler(
                {
                    "message": "unhandled exception during shutdown",
                    "exception": task.exception(),
                    "task": task,
                }
            )
