"""Request id and request metrics: the id taken from a sane X-Request-ID header or generated,
echoed on every response; each request counted by route, method and status, and timed."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
from time import perf_counter

from aiohttp import web
from aiohttp.typedefs import Handler

from server.keys import METRICS, REQUEST_ID
from server.metrics import Metrics

HEADER = "X-Request-ID"
# Printable token characters only, bounded: the id ends up in logs and in other services' headers.
_SANE = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


class RequestIds:
    """Unique ids without a syscall per request: a random per-process prefix and a counter.

    Ids only need to be unique (they correlate logs), not unpredictable; 12 random hex
    characters per process make two processes' ids collide with negligible probability.
    """

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter):012x}"


# One generator per process; a forked worker gets a prefix of its own, or two workers
# would hand out the same ids.
_new_id = RequestIds()
os.register_at_fork(after_in_child=_new_id.reseed)
_sane = _SANE.fullmatch


class _Off:
    """Stands in for Metrics when metrics.enabled is off (or in a small test app without it)."""

    __slots__ = ("in_flight",)

    def __init__(self) -> None:
        self.in_flight = 0

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        pass


_OFF = _Off()


@web.middleware
async def request_context_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    incoming = request.headers.get(HEADER)
    rid = incoming if incoming is not None and _sane(incoming) else _new_id()
    request[REQUEST_ID] = rid
    try:
        metrics: Metrics | _Off = request.app[METRICS] or _OFF
    except KeyError:
        metrics = _OFF
    started = perf_counter()
    metrics.in_flight += 1
    status = 500
    try:
        response = await handler(request)
        status = response.status
    except web.HTTPException as exc:  # only redirects get here: errors become responses below us
        status = exc.status
        exc.headers[HEADER] = rid
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away before the answer was complete
        raise
    finally:
        metrics.in_flight -= 1
        metrics.observe(request.match_info.route.name or "", request.method, status, perf_counter() - started)
    if not response.prepared:
        response.headers[HEADER] = rid
    return response
