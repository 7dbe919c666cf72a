"""Middleware layers (middlewares/__init__.py, server/http/layers.py): each middleware declares
its per-route hooks once, next to it, and a route's chain, built at start-up, holds only the
layers that apply to it."""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any

from aiohttp import web

from handlers import products
from middlewares import (
    LAYERS,
    MIDDLEWARES,
    cache,
    chain_for,
    compose,
    compression,
    ratelimit,
    request_context,
)
from middlewares.compression import compression_middleware
from middlewares.ratelimit import ratelimit_middleware
from middlewares.request_context import request_context_middleware
from server.app import create_app
from server.config import Config
from server.http.layers import Wrapping
from tests.helpers import replace

REQUEST_CONTEXT = "request_context"


def _chain(handler: Any) -> list[Any]:
    """What a composed route handler runs before its own handler, outermost first: the bound
    request-context closure, then each middleware (the function a partial calls)."""
    out: list[Any] = []
    while True:
        if isinstance(handler, partial):
            out.append(handler.func)
        elif getattr(getattr(handler, "__code__", None), "co_qualname", "") == "_wrap.<locals>.handle":
            out.append(REQUEST_CONTEXT)
        inner = getattr(handler, "__wrapped__", None)
        if inner is None:
            return out
        handler = inner


def test_every_middleware_declares_one_layer_in_order() -> None:
    assert LAYERS == (request_context.LAYER, ratelimit.LAYER, cache.LAYER, compression.LAYER)
    assert tuple(layer.middleware for layer in LAYERS) == MIDDLEWARES
    for middleware in MIDDLEWARES:
        # a plain async def (request, handler), without @web.middleware (deprecated upstream)
        assert inspect.iscoroutinefunction(middleware)
        assert list(inspect.signature(middleware).parameters) == ["request", "handler"]
        assert not hasattr(middleware, "__middleware_version__")
    # the outermost layer has no `applies`: it is on every route
    assert request_context.LAYER.applies is None and request_context.LAYER.try_quick is not None


def test_each_route_carries_only_the_layers_that_apply(base_config: Config) -> None:
    app = create_app(base_config)
    routes = [route for route in app.router.routes() if route.method != "HEAD"]
    handlers = {route.name: route.handler for route in routes}
    assert _chain(handlers["health"]) == [REQUEST_CONTEXT]  # exempt, uncached, tiny
    # a rate-limit policy: the layer is there; no policy: no rate-limit layer at all
    assert _chain(handlers["protected"]) == [REQUEST_CONTEXT, ratelimit_middleware, compression_middleware]
    assert _chain(handlers["users"]) == [REQUEST_CONTEXT, compression_middleware]
    # a cached route: the cache bound to it (its fresh path is the outer layer's quick answer)
    assert _chain(handlers["user"]) == [REQUEST_CONTEXT, cache._cached, compression_middleware]
    assert _chain(handlers["products"]) == [REQUEST_CONTEXT]  # it encodes its own kept bytes
    # a write: rate limited (its policy, or a key's own rate), never cached
    assert _chain(handlers["users_create"]) == [REQUEST_CONTEXT, ratelimit_middleware, compression_middleware]
    for route in routes:
        expected = chain_for(route.name or "", base_config, route.method)
        assert len(_chain(route.handler)) == len(expected), route


def _quick_of(handler: Any) -> Any:
    """The quick answer the bound request-context closure tries first (None: none)."""
    cells = dict(zip(handler.__code__.co_freevars, handler.__closure__, strict=True))
    return cells["quick"].cell_contents


def test_quick_answers_are_bound_where_declared(base_config: Config) -> None:
    app = create_app(base_config)
    handlers = {route.name: route.handler for route in app.router.routes() if route.method != "HEAD"}
    assert _quick_of(handlers["products"]).func is products._kept_answer  # the route declares it
    assert _quick_of(handlers["user"]).func is cache._fresh  # the cache layer offers it
    assert _quick_of(handlers["users"]) is None and _quick_of(handlers["protected"]) is None


def test_a_layer_follows_its_config(base_config: Config) -> None:
    limited = replace(base_config, ratelimit={"default": "100/minute"})
    assert ratelimit_middleware in chain_for("users", limited)
    assert ratelimit_middleware not in chain_for("health", limited)  # exempt
    off = replace(base_config, compression={"enabled": False}, cache={"enabled": False})
    assert chain_for("user", off) == (request_context_middleware,)


async def test_compose_wraps_only_what_declares_itself_wrapping() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response()

    class Lookalike:
        """Has a `wrap` but is no Wrapping: composed like any middleware."""

        def wrap(self, handler: Any) -> Any:
            raise AssertionError("wrap() of a non-Wrapping middleware was called")

        async def __call__(self, request: web.Request, handler: Any) -> web.StreamResponse:
            return await handler(request)

    class Outer(Wrapping):
        def wrap(self, handler: Any) -> Any:
            async def wrapped(request: web.Request) -> web.StreamResponse:
                return await handler(request)

            wrapped.__wrapped__ = handler  # type: ignore[attr-defined]
            return wrapped

    lookalike = compose(handler, (Lookalike(),))
    assert isinstance(lookalike, partial) and lookalike.__wrapped__ is handler  # type: ignore[attr-defined]
    wrapped = compose(handler, (Outer(), Lookalike()))
    assert not isinstance(wrapped, partial) and isinstance(wrapped.__wrapped__, partial)  # type: ignore[attr-defined]
