"""The outermost layer: request id, request metrics, and errors turned into problem documents.

The id is taken from a sane X-Request-ID header or generated, and echoed on every response;
each request is counted by route, method and status, and timed. Errors raised below become
problem+json here (middlewares/errors.py builds them): doing it in this layer rather than in
a layer of its own saves a coroutine frame per request, measured at about 1.5 µs, as much as
the rest of this middleware's work.

A quick answer: when the layer right inside this one (the cache's fresh-entry path, a handler
serving kept bytes) can often answer at once, with nothing to await, it offers a synchronous
`quick(request) -> Response | None` for its route, and this layer calls it before awaiting
the chain; None goes the ordinary way. An answer then costs no coroutine frame for that layer,
and is counted, timed, given its id and turned into a problem on error exactly like any other.

Two forms, one body: `request_context_middleware` is an ordinary aiohttp middleware that
looks up the route name and the metrics per request (for small apps built with
`middlewares=[...]`), and `for_route()` gives the same middleware with both bound once at
start-up, which is what hotpath's routes use (middlewares/__init__.py).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
from collections.abc import Callable
from functools import partial
from time import perf_counter

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from multidict import istr

from middlewares.errors import problem_for
from server.keys import METRICS, REQUEST_ID
from server.metrics import Metrics

HEADER = istr("X-Request-ID")
Quick = Callable[[web.Request], web.Response | None]
# Printable token characters only, bounded: the id ends up in logs and in other services' headers.
_SANE = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_sane = _SANE.fullmatch
_FIRST = 1 << 48  # hex() of every counter value from here on has 13 digits: "0x1" and 12 more


class RequestIds:
    """Unique ids without a syscall per request: a random per-process prefix and a counter.

    Ids only need to be unique (they correlate logs), not unpredictable; 12 random hex
    characters per process make two processes' ids collide with negligible probability.
    An id is the prefix and 12 hex digits of the counter (24 characters in all).
    """

    __slots__ = ("counter", "prefix")

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self.prefix = os.urandom(6).hex()
        self.counter = itertools.count(_FIRST)

    def __call__(self) -> str:
        return self.prefix + hex(next(self.counter))[3:]


# One generator per process; a forked worker gets a prefix of its own, or two workers
# would hand out the same ids.
_ids = RequestIds()
os.register_at_fork(after_in_child=_ids.reseed)


class _Off:
    """Stands in for Metrics when metrics.enabled is off (or in a small test app without it)."""

    __slots__ = ("in_flight",)

    def __init__(self) -> None:
        self.in_flight = 0

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        pass


_OFF = _Off()


async def _handle(
    request: web.Request, handler: Handler, route: str, metrics: Metrics | _Off, quick: Quick | None = None
) -> web.StreamResponse:
    incoming = request.headers.get(HEADER)
    rid = incoming if incoming is not None and _sane(incoming) else _ids.prefix + hex(next(_ids.counter))[3:]
    request[REQUEST_ID] = rid
    started = perf_counter()
    metrics.in_flight += 1
    status = 500
    try:
        try:
            answer = quick(request) if quick is not None else None
            response = answer if answer is not None else await handler(request)
        except Exception as exc:  # CancelledError is a BaseException and passes through
            response = problem_for(request, exc)  # re-raises redirects (HTTPException < 400)
        status = response.status
    except web.HTTPException as exc:  # a redirect: it leaves as an exception, with our id
        status = exc.status
        exc.headers[HEADER] = rid
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away before the answer was complete
        raise
    finally:
        metrics.in_flight -= 1
        metrics.observe(route, request.method, status, perf_counter() - started)
    if not response.prepared:
        response.headers[HEADER] = rid
    return response


@web.middleware
async def request_context_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        metrics: Metrics | _Off = request.app[METRICS] or _OFF
    except KeyError:
        metrics = _OFF
    return await _handle(request, handler, request.match_info.route.name or "", metrics)


def for_route(route: str, app: web.Application, quick: Quick | None = None) -> Middleware:
    """request_context_middleware for one route of `app`, its name and metrics bound now (a
    partial, not a wrapper coroutine: compose() adds the handler to the same partial), and
    the quick answer of the layer inside it, if it has one (middlewares/__init__.py)."""
    metrics: Metrics | _Off = app.get(METRICS) or _OFF
    return partial(_handle, route=route, metrics=metrics, quick=quick)
