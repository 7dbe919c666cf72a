"""Headers the middlewares owe a response its handler prepares itself (a StreamResponse).

A middleware can only change headers before they are sent; a streaming handler sends them
at prepare(), inside the handler. Such handlers call stream_headers() just before prepare()
and get what the middlewares would have added: the request id, the rate-limit headers, the
CORS headers (server/http/cors.py: an EventSource on another origin reads the stream) and,
for an EncodedStream of a compressible type, the content coding the client accepts (the
body is then compressed as it is written). text/event-stream is never compressed.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from aiohttp import web

from server.http.codings import StreamEncoder, stream_encoder
from server.http.compression import COMPRESSION, Compression, no_transform
from server.http.cors import CORS, ORIGIN
from server.http.layers import REQUEST_ID_HEADER
from server.http.problems import REQUEST_ID


class RateDecision(Protocol):
    """What the rate limiter leaves on a request it let through (server/ratelimit's Decision)."""

    def headers(self) -> dict[str, str]: ...

    def info(self) -> dict[str, Any]: ...


# The rate limiter's decision for this request: its headers are owed to a response the handler
# prepares itself (stream_headers), which the middleware cannot reach before it is sent.
RATE_LIMIT: web.RequestKey[RateDecision] = web.RequestKey("hotpath.rate_limit")


class EncodedStream(web.StreamResponse):
    """A StreamResponse whose writes go through a content encoder once stream_headers() has
    chosen one. Flush policy: everything written so far is made decodable by the client once
    `stream_flush_bytes` input bytes are pending or the last flush is `stream_flush_interval`
    seconds old, so a slow producer's records do not sit in the encoder."""

    # Attributes of our own: none is a name StreamResponse uses (aiohttp 3.14.5;
    # tests/http/test_compression.py checks), and no private one of StreamResponse's is read here.
    _encoder: StreamEncoder | None = None
    _codec_state: Compression | None = None
    _pending = 0
    _flushed_at = 0.0

    def start_encoding(self, state: Compression, coding: str) -> None:
        """Compress the body with `coding` (call before prepare())."""
        self._encoder = stream_encoder(coding, state.levels)
        self._codec_state = state
        self._flushed_at = time.monotonic()

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        encoder, state = self._encoder, self._codec_state
        if encoder is None or state is None:
            await super().write(data)
            return
        self._pending += len(data)
        now = time.monotonic()
        flush = (
            self._pending >= state.stream_flush_bytes or now - self._flushed_at >= state.stream_flush_interval
        )
        out = await state.encode_chunk(encoder, bytes(data), flush)
        if flush:
            self._pending, self._flushed_at = 0, now
        if out:
            await super().write(out)

    async def write_eof(self, data: bytes = b"") -> None:
        encoder = self._encoder
        if encoder is None:  # not encoding, or the encoded end went already
            await super().write_eof(data)
            return
        self._encoder = None  # before anything can fail: the end is written at most once
        tail = encoder.compress(bytes(data)) if data else b""
        await super().write_eof(tail + encoder.finish())


def stream_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Call before `await response.prepare(request)`."""
    rid = request.get(REQUEST_ID)
    if rid is not None:
        response.headers[REQUEST_ID_HEADER] = rid
    decision = request.get(RATE_LIMIT)
    if decision is not None:
        response.headers.update(decision.headers())
    cors = request.app.get(CORS)
    if cors is not None:
        cors.apply(request.headers.get(ORIGIN), response.headers)
    state = request.app.get(COMPRESSION)
    if state is None or not state.enabled or not isinstance(response, EncodedStream):
        return
    headers = response.headers
    if not state.compressible(headers.get("Content-Type")):
        return  # text/event-stream is refused here whatever compression.types says
    state.vary(headers)
    if (
        request.method == "HEAD"
        or "Content-Encoding" in headers
        or "Content-Length" in headers
        or no_transform(headers.get("Cache-Control"))
    ):
        return
    coding = state.negotiator.choose(request.headers.get("Accept-Encoding")).coding
    if coding is not None:
        headers["Content-Encoding"] = coding
        response.start_encoding(state, coding)
