"""The ordered middleware tuple: first is outermost."""

from __future__ import annotations

from aiohttp.typedefs import Middleware

from middlewares.errors import errors_middleware
from middlewares.request_context import request_context_middleware

MIDDLEWARES: tuple[Middleware, ...] = (
    # Outermost: the request id exists before anything can fail or log.
    request_context_middleware,
    # Turns every exception below into problem+json, so later middlewares (rate limit,
    # cache, compression) see and shape a normal response, errors included.
    errors_middleware,
)
