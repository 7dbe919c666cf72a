"""The request protocol run.py serves with: deadlines for a slow request head, a slow request
body and a client that stops reading, and aiohttp's parse errors as problem documents.

aiohttp cuts an idle keep-alive connection (`keepalive_timeout`) but has no deadline for a
request head or body that trickles in. `GuardedRequestHandler` (aiohttp's protocol) gives a
request head `server.client_header_timeout` seconds from the connection's start, or from the
head's first byte on a reused connection (a 408 then, or a plain close when nothing was sent),
and a request body `server.client_body_timeout` seconds from its head (the handler's read raises
`RequestTimeout`, answered as a 408 problem, then the connection closes). One timer per
connection, armed lazily: a request that arrives whole costs a few attribute reads.

aiohttp has no public hooks for this, so the protocol leans on RequestHandler's internals
(checked on aiohttp 3.14.5): it reads `_loop`, `_request_count`, `_messages`, `_upgraded`,
`_force_close`, `_waiter` and `_current_request`, and sets `_lingering_time`.
tests/runtime/test_slow_clients.py holds the behaviour to account and checks that those names are still
there and that ours are none of theirs (RequestHandler uses slots: an attribute of ours with a
slot's name would silently overwrite theirs).
"""

from __future__ import annotations

import asyncio
import logging
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader

from server.errors import DomainError

if TYPE_CHECKING:
    from server.runtime.site import GuardedSite

__all__ = ("GuardedRequestHandler", "RequestTimeout", "closing_problem")

log = logging.getLogger("hotpath.connections")


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


def closing_problem(
    status: int, reason: str, slug: str, detail: str, headers: str = ""
) -> tuple[bytes, bytes]:
    """(head without Date and the blank line, body) of a problem response that closes the connection."""
    body = orjson.dumps({"type": f"/problems/{slug}", "title": reason, "status": status, "detail": detail})
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/problem+json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{headers}"
    )
    return head.encode(), body


_HEAD_TIMEOUT = closing_problem(
    408,
    "Request Timeout",
    "request-timeout",
    "the request head did not arrive within server.client_header_timeout",
)


def _head_timeout_response() -> bytes:
    head, body = _HEAD_TIMEOUT
    return head + f"Date: {formatdate(usegmt=True)}\r\n\r\n".encode() + body


_parse = web.RequestHandler.data_received  # called directly: cheaper than super() once per request


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's protocol with deadlines for a slow request head and a slow request body.

    The deadlines live in two floats and one timer per connection; a timer that fires before a
    deadline re-arms itself for the nearest one, like aiohttp's own keep-alive timer, so a
    request that arrives whole arms nothing. Idle time between requests is keepalive_timeout's.
    """

    def __init__(
        self,
        manager: web.Server,
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
        request: web.BaseRequest,
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
