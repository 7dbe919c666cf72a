"""The ordered middleware tuple (first is outermost) and how it is applied: per route.

Each entry is an ordinary aiohttp new-style middleware, tested on a small app of its own.
hotpath does not hand them to `web.Application(middlewares=...)`, though: aiohttp then runs
every request through an extra current-app layer and a cache lookup of the built chain, which
measured about 4 µs a request (products JSON went from 0.89x to 0.76x of the bare floor).
Instead `compose()` binds the chain onto each route's handler once, at start-up, the same
way aiohttp builds it (functools.partial per layer), and a catch-all route gives unmatched
paths (404) and wrong methods (405) the same chain. A middleware that has nothing to do for
a route (no rate-limit or cache policy, say) can then be left out of that route's chain
entirely, so the route pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial, update_wrapper

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from middlewares import cache, compression, ratelimit, request_context
from middlewares.cache import cache_middleware
from middlewares.compression import compression_middleware
from middlewares.ratelimit import ratelimit_middleware
from middlewares.request_context import Quick, request_context_middleware
from server.config import Config

MIDDLEWARES: tuple[Middleware, ...] = (
    # Outermost: the request id exists before anything can fail or log, and every exception
    # below becomes problem+json here (server/http/problems.py), so the middlewares below
    # see what they raise answered like any other error.
    request_context_middleware,
    # Inside request_context, so a refusal is an ordinary problem response; before cache and
    # compression, so a refused request costs no cache lookup or compression.
    ratelimit_middleware,
    # Inside rate limit (a refused request costs no lookup) and outside compression (a hit skips
    # compressing again; the key includes Accept-Encoding, so stored bodies may be encoded).
    cache_middleware,
    # Innermost: compresses the finished response (the cache above stores what it produced,
    # per accepted coding); problems raised here (406) are still answered as problems above.
    compression_middleware,
)
# Middlewares that only some routes need: route name, config -> is it in that route's chain.
APPLIES: dict[Middleware, Callable[[str, Config], bool]] = {
    ratelimit_middleware: ratelimit.applies,
    cache_middleware: cache.applies,
    compression_middleware: compression.applies,
}


def chain_for(route_name: str, config: Config) -> tuple[Middleware, ...]:
    """The middlewares of one route, in MIDDLEWARES order."""
    return tuple(m for m in MIDDLEWARES if m not in APPLIES or APPLIES[m](route_name, config))


# Middlewares that take their route's name and app once, at start-up, instead of looking them
# up per request: route name, app -> the middleware bound to them.
BINDS: dict[Middleware, Callable[[str, web.Application], Middleware]] = {
    request_context_middleware: request_context.for_route,
    cache_middleware: cache.for_route,
}
# Middlewares with a quick answer (middlewares/request_context.py): route name, app -> the
# synchronous answer the outermost layer tries first when this middleware is the next one in,
# and the middleware bound to go on when that answer declined.
QUICK: dict[Middleware, Callable[[str, web.Application], tuple[Quick, Middleware]]] = {
    cache_middleware: cache.quick_for,
}


def bind(
    middlewares: Sequence[Middleware],
    route_name: str,
    app: web.Application,
    handler_quick: Quick | None = None,
) -> tuple[Middleware, ...]:
    """`middlewares` with those in BINDS bound to one route of `app`. When the outermost is
    request_context, it gets the quick answer of the layer right inside it: that middleware's
    (QUICK), or `handler_quick` when the handler itself comes next. Only that next layer may
    answer quickly: whatever it skips lies inside it."""
    bound = [BINDS[m](route_name, app) if m in BINDS else m for m in middlewares]
    quick = None
    if middlewares and middlewares[0] is request_context_middleware:
        if len(middlewares) == 1:
            quick = handler_quick
        elif middlewares[1] in QUICK:
            quick, bound[1] = QUICK[middlewares[1]](route_name, app)
    if quick is not None:
        bound[0] = request_context.for_route(route_name, app, quick)
    return tuple(bound)


def compose(handler: Handler, middlewares: Sequence[Middleware] = MIDDLEWARES) -> Handler:
    """`handler` wrapped by `middlewares`, the first one outermost. A bound middleware that
    can `wrap` the next layer itself (request_context's RouteContext) does; the others get
    it as their `handler` keyword, as aiohttp does."""
    for middleware in reversed(middlewares):
        wrap = getattr(middleware, "wrap", None)
        if wrap is not None:
            handler = wrap(handler)
        else:
            handler = update_wrapper(partial(middleware, handler=handler), handler)
    return handler
