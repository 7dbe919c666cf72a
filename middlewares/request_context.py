"""Request id: taken from a sane X-Request-ID header or generated; echoed on every response."""

from __future__ import annotations

import os
import re

from aiohttp import web
from aiohttp.typedefs import Handler

from server.keys import REQUEST_ID

HEADER = "X-Request-ID"
# Printable token characters only, bounded: the id ends up in logs and in other services' headers.
_SANE = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def new_request_id() -> str:
    return os.urandom(12).hex()


@web.middleware
async def request_context_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    incoming = request.headers.get(HEADER)
    request[REQUEST_ID] = incoming if incoming is not None and _SANE.fullmatch(incoming) else new_request_id()
    return await handler(request)


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook: runs for plain and streaming responses alike, just before
    the headers leave, so a handler that prepares its own StreamResponse still gets the id."""
    rid = request.get(REQUEST_ID)
    if rid is not None:
        response.headers[HEADER] = rid
