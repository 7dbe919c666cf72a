"""What the middleware layers declare per route, and what they share with the handlers inside them.

A middleware is a plain `async def (request, handler)`; next to it, its module declares a
`Layer`: whether a route needs it at all, what it binds once per route at start-up, and the
quick answer it can offer the layer outside it. middlewares/__init__.py orders the layers and
binds them onto each route; nothing here runs per request.

A quick answer is a synchronous `quick(request) -> Response | None` a layer or a handler can
often give at once, with nothing to await (a fresh cache entry, kept bytes). The outermost
layer calls it before awaiting the chain, so an answer costs no coroutine frame for that layer;
None goes the ordinary way (middlewares/request_context.py).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from multidict import istr

from server.config import Config

__all__ = ["CATCH_ALL", "REQUEST_ID_HEADER", "Layer", "Quick", "QuickFor", "Wrapping"]

# Set by the outermost layer on every response; a handler that prepares its own response gets
# it from server/http/streams.py's stream_headers().
REQUEST_ID_HEADER = istr("X-Request-ID")
# The name of the catch-all route (server/routes.py registers it last): unmatched paths, methods
# no route declares, and so every OPTIONS request (CORS preflights, server/http/cors.py).
CATCH_ALL = "unmatched"

Quick = Callable[[web.Request], web.Response | None]
# route name, app -> the quick answer of a handler for that route (bound once, at start-up)
QuickFor = Callable[[str, web.Application], Quick]


@dataclass(frozen=True, slots=True)
class Layer:
    """One middleware and its per-route hooks, each read once per route at start-up.

    - `applies(route, config, method)`: whether the route's chain holds this layer at all
      (None: every route); a route it does nothing for then pays nothing for it. `method` is
      the route's ("GET", "POST", ...; "*" for the catch-all).
    - `bind(route, app)`: the middleware with what it would look up per request (the route's
      name, its policy) bound now. None: `middleware` as it is.
    - `quick(route, app)`: a quick answer this layer offers when it comes right after a layer
      that tries one, and the bound middleware that goes on when that answer declined.
    - `try_quick(route, app, quick)`: this layer bound to try the quick answer of the layer
      right inside it (or of the handler, when it comes next) before awaiting it.
    """

    middleware: Middleware
    applies: Callable[[str, Config, str], bool] | None = None
    bind: Callable[[str, web.Application], Middleware] | None = None
    quick: Callable[[str, web.Application], tuple[Quick, Middleware]] | None = None
    try_quick: Callable[[str, web.Application, Quick], Middleware] | None = None


class Wrapping(abc.ABC):
    """A middleware bound to one route that builds its layer around the next one itself (one
    closure) rather than being handed it per call, as aiohttp's partial(middleware, handler=...)
    does. Called as a middleware it behaves the same."""

    __slots__ = ()

    @abc.abstractmethod
    def wrap(self, handler: Handler) -> Handler:
        """The coroutine function of the request: this layer around `handler`."""

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        return await self.wrap(handler)(request)
