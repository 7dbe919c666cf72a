"""The outermost layer: request id, request metrics, and errors turned into problem documents.

The id is taken from a sane X-Request-ID header or generated, and echoed on every response;
each request is counted by route, method and status, and timed. Errors raised below become
problem+json here (server/http/problems.py builds them), or, when the response's headers already
went out (a stream that failed after prepare()), the connection is aborted instead: every
streaming route passes through this one place, so none can write a second response into its
own body. Doing it in this layer rather than in a layer of its own saves a coroutine frame per
request, measured at about 1.5 µs, as much as the rest of this middleware's work.

This layer tries quick answers (server/http/layers.py): when the layer right inside it (the
cache's fresh-entry path, a handler serving kept bytes) offers one for its route, it is called
before awaiting the chain; None goes the ordinary way. An answer then costs no coroutine frame
for that layer, and is counted, timed, given its id and turned into a problem on error exactly
like any other.

CORS (server/http/cors.py): with cors.allow_origins set, each route's closure is bound the app's
policy and gives every answer it returns unprepared (quick ones included) its CORS headers, last,
after the layers inside it answered: so the cache never keeps them. With no origins allowed the
policy is None and nothing more is done. The catch-all route, where every OPTIONS request ends,
answers CORS preflights itself, before the layers inside it (a preflight carries no credentials:
no rate limit or key check may refuse it; the catch-all declares no scopes, so it has no key
check), whether CORS is on or off (then with a 403).

Two forms, one body: `request_context_middleware` is a plain middleware that looks up the route
name and the metrics per request (for a route composed without binding, as small test apps do),
and `for_route()` gives the same layer with both (and the route's access check, made before
anything else) bound once at start-up, which is what hotpath's routes use
(middlewares/__init__.py): a `Wrapping` that has compose() build it around the next layer as
one closure, the coroutine function aiohttp calls for the route.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
from functools import update_wrapper
from time import perf_counter

from aiohttp import web
from aiohttp.typedefs import Handler

from server.access import GUARDS
from server.access.guard import Guard
from server.http.cors import CORS, ORIGIN, Cors, preflight_first
from server.http.layers import CATCH_ALL, REQUEST_ID_HEADER, Layer, Quick, Wrapping
from server.http.problems import REQUEST_ID, abort_started, problem_for, response_began
from server.runtime.metrics import METRICS, Metrics

# Printable token characters only, bounded: the id ends up in logs and in other services' headers.
_SANE = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_sane = _SANE.fullmatch
# A batch's ids end in these three hex digits, highest first: the pool pops the lowest first.
_LOW = tuple(f"{i:03x}" for i in range(4095, -1, -1))
_BATCH = len(_LOW)  # ids made at a time


class RequestIds:
    """Unique ids without a syscall per request: a random per-process prefix and a counter.

    Ids only need to be unique (they correlate logs), not unpredictable; 12 random hex
    characters per process make two processes' ids collide with negligible probability.
    An id is the prefix, 9 hex digits of a batch number and 3 of its place in the batch (24
    characters in all). A batch is made at once, into a pool the request layer pops from:
    building one id per request cost about 0.8 us in the running server (python -m
    bench.inprocess, a constant id for comparison); the pool's pop is one list call, and
    a batch costs about 0.1 us an id (one string concatenation each, in C).
    """

    __slots__ = ("batches", "pool", "prefix")

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self.prefix = os.urandom(6).hex()
        self.batches = itertools.count()
        self.pool: list[str] = []

    def refill(self) -> str:
        """Fill the pool with the next batch of ids; the lowest of them."""
        head = f"{self.prefix}{next(self.batches):09x}"
        self.pool = list(map(head.__add__, _LOW))
        return self.pool.pop()


# One generator per process; a forked worker gets a prefix of its own, or two workers
# would hand out the same ids.
_ids = RequestIds()
os.register_at_fork(after_in_child=_ids.reseed)


class _Off:
    """Stands in for Metrics when metrics.enabled is off (or in a small test app without it):
    nothing is kept, each request's duration goes into a list of its own and is dropped."""

    __slots__ = ("in_flight", "pending")

    def __init__(self) -> None:
        self.in_flight = 0
        self.pending: dict[tuple[str, str, int], list[float]] = {}

    def durations(self, route: str, method: str, status: int) -> list[float]:
        return []


_OFF = _Off()


def _wrap(
    handler: Handler,
    route: str,
    metrics: Metrics | _Off,
    quick: Quick | None,
    guard: Guard | None = None,
    cors: Cors | None = None,
) -> Handler:
    """`handler` inside this layer, as one coroutine function of the request. aiohttp calls a
    route's handler with the request alone, and a closure takes that call about 0.4 µs more
    cheaply than a partial whose other arguments are keywords.

    `guard`: the route's access check (server/access/guard.py), made here, before the quick
    answer is tried, so that a refusal is a problem like any other and a quick path survives.
    `cors`: the app's CORS policy (server/http/cors.py), None when CORS is off."""

    pending = metrics.pending
    if guard is not None:
        check, resolve = guard.check, guard.resolve
    cors_apply = cors.apply if cors is not None else None

    async def handle(request: web.Request) -> web.StreamResponse:
        rid = request.headers.get(REQUEST_ID_HEADER)
        if rid is None or not _sane(rid):
            pool = _ids.pool
            rid = pool.pop() if pool else _ids.refill()
        request[REQUEST_ID] = rid
        started = perf_counter()
        metrics.in_flight += 1
        status = 500
        answer = None
        try:
            try:
                if guard is not None:
                    token = check(request)
                    if token is not None:
                        await resolve(request, token)
                answer = quick(request) if quick is not None else None
                response = answer if answer is not None else await handler(request)
            except Exception as exc:  # CancelledError is a BaseException and passes through
                # after a stream's prepare() no second response: the connection is aborted;
                # problem_for re-raises redirects (HTTPException < 400)
                response = (
                    abort_started(request, exc) if response_began(request) else problem_for(request, exc)
                )
            status = response.status
        except web.HTTPException as exc:  # a redirect: it leaves as an exception, with our id
            status = exc.status
            exc.headers[REQUEST_ID_HEADER] = rid
            if cors_apply is not None:
                cors_apply(request.headers.get(ORIGIN), exc.headers)
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away before the answer was complete
            raise
        finally:
            metrics.in_flight -= 1
            # counted into buckets later (Metrics.fold); a known key is one dict lookup here
            method = request.method
            durations = pending.get((route, method, status))
            if durations is None:
                durations = metrics.durations(route, method, status)
            durations.append(perf_counter() - started)
        if answer is not None or not response.prepared:  # a quick answer is never prepared
            response.headers[REQUEST_ID_HEADER] = rid
            if cors_apply is not None:
                cors_apply(request.headers.get(ORIGIN), response.headers)
        return response

    return update_wrapper(handle, handler)


async def request_context_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        metrics: Metrics | _Off = request.app[METRICS] or _OFF
    except KeyError:
        metrics = _OFF
    route = request.match_info.route.name or ""
    return await _wrap(handler, route, metrics, None, cors=request.app.get(CORS))(request)


class RouteContext(Wrapping):
    """request_context_middleware for one route: its name, its app's metrics and the quick
    answer of the layer inside it (middlewares/__init__.py) and its app's CORS policy, bound
    once at start-up. Called as a middleware it behaves like request_context_middleware;
    compose() has it `wrap` the next layer instead, which gives aiohttp the closure above."""

    __slots__ = ("cors", "guard", "metrics", "quick", "route")

    def __init__(
        self,
        route: str,
        metrics: Metrics | _Off,
        quick: Quick | None,
        guard: Guard | None,
        cors: Cors | None = None,
    ) -> None:
        self.route = route
        self.metrics = metrics
        self.quick = quick
        self.guard = guard
        self.cors = cors

    def wrap(self, handler: Handler) -> Handler:
        return _wrap(handler, self.route, self.metrics, self.quick, self.guard, self.cors)


def for_route(route: str, app: web.Application, quick: Quick | None = None) -> RouteContext:
    """request_context_middleware for one route of `app`, its name and metrics bound now, and
    the quick answer of the layer inside it, if it has one (middlewares/__init__.py). The
    catch-all route answers CORS preflights first (server/http/cors.py)."""
    metrics: Metrics | _Off = app.get(METRICS) or _OFF
    cors = app.get(CORS)
    if route == CATCH_ALL:
        quick = preflight_first(cors, quick)
    return RouteContext(route, metrics, quick, app.get(GUARDS, {}).get(route), cors)


LAYER = Layer(request_context_middleware, bind=for_route, try_quick=for_route)
