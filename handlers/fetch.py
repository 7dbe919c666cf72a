"""POST /process-urls: fetch many URLs at once, each result in request order."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiohttp import web

from handlers.common import JSON_TYPE
from server.cache import CACHE
from server.config import CONFIG
from server.errors import ValidationFailed
from server.fetch import FETCH_GUARD, HTTP_CLIENT
from server.fetch.client import RESULT_SCHEMA, FetchLimits
from server.fetch.reuse import fetch_all_cached
from server.http.operations import Schema
from server.http.reading import read_body
from server.http.streams import stream_headers
from server.runtime.metrics import METRICS

# Above this many bytes of fetched data the answer is streamed one result at a time: encoding
# 100 MiB in one orjson call would hold the event loop (and the GIL) for ~50 ms.
_STREAM_ABOVE = 256 * 1024
# Most bytes handed to the socket per event-loop pass while streaming. Sending 1 MiB over
# loopback costs a few ms of kernel time on this core (the receiving side's TCP work included).
_WRITE_PIECE = 256 * 1024


# What _parse() takes: a bare array of URLs (the old clients), or {urls, timeout}.
FETCH_REQUEST = Schema(
    "FetchRequest",
    {
        "oneOf": [
            {"type": "array", "items": {"type": "string"}},
            {
                "type": "object",
                "required": ["urls"],
                "additionalProperties": False,
                "properties": {
                    "urls": {"type": "array", "items": {"type": "string"}},
                    "timeout": {"type": "number", "exclusiveMinimum": 0},
                },
            },
        ]
    },
)
FETCH_RESPONSE = Schema(
    "FetchResponse",
    {
        "type": "object",
        "required": ["results", "processing_time", "total_urls"],
        "properties": {
            "results": {"type": "array", "items": RESULT_SCHEMA},
            "processing_time": {"type": "number"},
            "total_urls": {"type": "integer"},
        },
    },
)


def _parse(body: Any, max_urls: int, max_timeout: float) -> tuple[list[Any], float]:
    timeout = max_timeout
    if isinstance(body, dict):
        unknown = sorted(set(body) - {"urls", "timeout"})
        errors = [{"field": k, "message": "unknown field"} for k in unknown]
        if "timeout" in body:
            t = body["timeout"]
            if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t <= max_timeout:
                errors.append({"field": "timeout", "message": f"must be a number in (0, {max_timeout:g}]"})
            else:
                timeout = float(t)
        urls = body.get("urls")
        if urls is None:
            errors.append({"field": "urls", "message": "is required"})
        if errors:
            raise ValidationFailed(errors)
    else:
        urls = body
    if not isinstance(urls, list):
        raise ValidationFailed([{"field": "urls", "message": "must be an array of URL strings"}])
    if len(urls) > max_urls:
        raise ValidationFailed([{"field": "urls", "message": f"at most {max_urls} URLs per request"}])
    return urls, timeout


async def process_urls(request: web.Request) -> web.StreamResponse:
    cfg = request.app[CONFIG].fetch
    urls, timeout = _parse(await read_body(request), cfg.max_urls, cfg.timeout)
    limits = FetchLimits(
        timeout=timeout,
        connect_timeout=min(cfg.connect_timeout, timeout),
        max_bytes=cfg.max_bytes,
        max_redirects=cfg.max_redirects,
        concurrency=cfg.concurrency,
        deadline=cfg.deadline,
    )
    started = time.perf_counter()
    app = request.app
    results = await fetch_all_cached(
        app[CACHE], cfg.cache_ttl, app[HTTP_CLIENT], app[FETCH_GUARD], urls, limits
    )
    elapsed = round(time.perf_counter() - started, 4)
    metrics = request.app.get(METRICS)
    if metrics is not None:
        for result in results:
            metrics.inc("hotpath_fetch_results", result.get("error") or "ok")
    if sum(r.get("bytes", 0) for r in results) <= _STREAM_ABOVE:
        doc = {"results": results, "processing_time": elapsed, "total_urls": len(urls)}
        return web.Response(body=orjson.dumps(doc), content_type=JSON_TYPE)
    resp = web.StreamResponse(headers={"Content-Type": JSON_TYPE})
    stream_headers(request, resp)
    await resp.prepare(request)
    await resp.write(b'{"results":[')
    for i, result in enumerate(results):
        encoded = memoryview(orjson.dumps(result))
        results[i] = {}  # free each body as soon as it is sent, not all at the end
        # write() yields only when the socket pushes back; a fast reader never does, and the
        # loop would send all 100 MiB in one step. Let other requests in after each piece.
        for start in range(0, len(encoded), _WRITE_PIECE):
            piece = encoded[start : start + _WRITE_PIECE]
            await resp.write(b"," + piece if i and not start else piece)
            await asyncio.sleep(0)
    await resp.write(b'],"processing_time":' + orjson.dumps(elapsed) + b',"total_urls":%d}' % len(urls))
    await resp.write_eof()
    return resp
