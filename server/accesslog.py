"""A cheap access log: one JSON line per request, built with orjson, no format parsing.

aiohttp's default access logger interprets its format string for every request; this one
builds a small dict and lets orjson encode it. Each line carries what an operator greps
for: time, request id, route name, method, path, status, bytes sent, duration, client.
"""

from __future__ import annotations

import logging
import time

import orjson
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from server.keys import REQUEST_ID


class JsonAccessLogger(AbstractAccessLogger):
    """aiohttp access logger writing JSON lines to the `hotpath.access` logger."""

    def log(self, request: BaseRequest, response: StreamResponse, time_taken: float) -> None:
        match_info = getattr(request, "match_info", None)  # a web.Request has one, a bare BaseRequest not
        route = match_info.route.name if match_info is not None and match_info.route is not None else None
        line = orjson.dumps(
            {
                "ts": round(time.time(), 3),
                "rid": request.get(REQUEST_ID),
                "route": route,
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "bytes": response.body_length,
                "ms": round(time_taken * 1000, 3),
                "remote": request.remote,
            }
        )
        self.logger.info(line.decode())

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
