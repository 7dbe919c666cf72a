"""The ordered middleware layers (first is outermost) and how they are applied: per route.

Each middleware is a plain `async def (request, handler)`, tested on a small app of its own,
and its module declares its `LAYER` (server/http/layers.py): whether a route needs it, what it
binds per route, the quick answer it offers. hotpath does not hand the middlewares to
`web.Application(middlewares=...)` (aiohttp 3 would want them marked with @web.middleware,
deprecated upstream): aiohttp then runs every request through an extra current-app layer
and a cache lookup of the built chain, which measured about 4 µs a request
(products JSON went from 0.89x to 0.76x of the bare floor). Instead `compose()` binds the
chain onto each route's handler once, at start-up, the same way aiohttp builds it
(functools.partial per layer), and a catch-all route gives unmatched paths (404) and wrong
methods (405) the same chain. A layer that has nothing to do for a route (no rate-limit or
cache policy, say) is left out of that route's chain entirely, so the route pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial, update_wrapper

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from middlewares import cache, compression, ratelimit, request_context
from server.config import Config
from server.http.layers import Layer, Quick, QuickFor, Wrapping

LAYERS: tuple[Layer, ...] = (
    # Outermost: the request id exists before anything can fail or log, and every exception
    # below becomes problem+json here (server/http/problems.py), so the middlewares below
    # see what they raise answered like any other error.
    request_context.LAYER,
    # Inside request_context, so a refusal is an ordinary problem response; before cache and
    # compression, so a refused request costs no cache lookup or compression.
    ratelimit.LAYER,
    # Inside rate limit (a refused request costs no lookup) and outside compression (a hit skips
    # compressing again; the key includes Accept-Encoding, so stored bodies may be encoded).
    cache.LAYER,
    # Innermost: compresses the finished response (the cache above stores what it produced,
    # per accepted coding); problems raised here (406) are still answered as problems above.
    compression.LAYER,
)
MIDDLEWARES: tuple[Middleware, ...] = tuple(layer.middleware for layer in LAYERS)
# Each middleware's declaration, to bind a chain given as middlewares (chain_for's answer)
_DECLARED: dict[Middleware, Layer] = {layer.middleware: layer for layer in LAYERS}


def chain_for(route_name: str, config: Config, method: str = "GET") -> tuple[Middleware, ...]:
    """The middlewares of one route, in LAYERS order: those whose layer applies to it."""
    return tuple(
        layer.middleware
        for layer in LAYERS
        if layer.applies is None or layer.applies(route_name, config, method)
    )


def bind(
    middlewares: Sequence[Middleware],
    route_name: str,
    app: web.Application,
    handler_quick: Quick | None = None,
) -> tuple[Middleware, ...]:
    """`middlewares` bound to one route of `app`, as their layers declare (`Layer.bind`).

    When the outermost layer tries quick answers (`Layer.try_quick`), it gets the one of the
    layer right inside it (`Layer.quick`), or `handler_quick` when the handler itself comes
    next. Only that next layer may answer quickly: whatever it skips lies inside it."""
    layers = [_DECLARED.get(m) for m in middlewares]
    bound = [
        layer.bind(route_name, app) if layer is not None and layer.bind is not None else m
        for m, layer in zip(middlewares, layers, strict=True)
    ]
    outer = layers[0] if layers else None
    if outer is None or outer.try_quick is None:
        return tuple(bound)
    quick = None
    if len(layers) == 1:
        quick = handler_quick
    else:
        inner = layers[1]
        if inner is not None and inner.quick is not None:
            quick, bound[1] = inner.quick(route_name, app)
    if quick is not None:
        bound[0] = outer.try_quick(route_name, app, quick)
    return tuple(bound)


def compose(handler: Handler, middlewares: Sequence[Middleware] = MIDDLEWARES) -> Handler:
    """`handler` wrapped by `middlewares`, the first one outermost. A bound middleware that
    wraps the next layer itself (a `Wrapping`: request_context's RouteContext) does; the
    others get it as their `handler` keyword, as aiohttp does."""
    for middleware in reversed(middlewares):
        if isinstance(middleware, Wrapping):
            handler = middleware.wrap(handler)
        else:
            handler = update_wrapper(partial(middleware, handler=handler), handler)
    return handler


def bound_handler(
    handler: Handler,
    route_name: str,
    app: web.Application,
    config: Config,
    quick_for: QuickFor | None = None,
    method: str = "GET",
) -> Handler:
    """`handler` as route `route_name` (answering `method`) of `app` serves it: inside the
    chain of the layers that apply to that route, bound to it, with the handler's own quick
    answer when it has one (`quick_for`). Called once per route, at start-up."""
    quick = quick_for(route_name, app) if quick_for is not None else None
    return compose(handler, bind(chain_for(route_name, config, method), route_name, app, quick))
