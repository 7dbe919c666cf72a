"""Headers the middlewares owe a response its handler prepares itself (a StreamResponse).

A middleware can only change headers before they are sent; a streaming handler sends them
at prepare(), inside the handler. Such handlers call stream_headers() just before prepare()
and get what the middlewares would have added: the request id and the rate-limit headers.
"""

from __future__ import annotations

from aiohttp import web

from middlewares.request_context import HEADER as REQUEST_ID_HEADER
from server.keys import RATE_LIMIT, REQUEST_ID


def stream_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Call before `await response.prepare(request)`."""
    rid = request.get(REQUEST_ID)
    if rid is not None:
        response.headers[REQUEST_ID_HEADER] = rid
    decision = request.get(RATE_LIMIT)
    if decision is not None:
        response.headers.update(decision.headers())
