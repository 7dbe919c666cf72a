"""The API contract: GET /openapi.json."""

from __future__ import annotations

import orjson
from aiohttp import web

from server.openapi import build_spec

# Built once at import: the document is immutable for the life of the process.
_SPEC_BODY = orjson.dumps(build_spec())


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=_SPEC_BODY, content_type="application/json")
