"""Response compression (server/compression.py): what should be compressed is, what must not
be never is, and large bodies are compressed off the event loop.

A response is compressed only when all hold: a 2xx other than 204/206, a compressible media
type, no Content-Encoding yet, no `Cache-Control: no-transform`, not HEAD, a body of at least
compression.min_size bytes (unless the client refuses identity), and a coding the client
accepts. `Vary: Accept-Encoding` goes on every response whose type could be compressed,
compressed or not, so a shared cache never hands gzip to a client that did not ask for it.
A strong ETag becomes weak on a compressed body (the representation is the same, the bytes
are not), and a 304 answers with the validator the client holds.

Streamed responses prepare themselves inside the handler; middlewares/streaming.py gives them
the same decision through stream_headers().
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from server.compression import no_transform, weaken
from server.config import Config
from server.errors import DomainError
from server.keys import COMPRESSION

# Routes whose answers are always tiny: they do not carry the middleware at all.
TINY_ROUTES = frozenset({"health", "ready"})


class EncodingNotAcceptable(DomainError):
    """The client refuses identity and every coding we have (RFC 9110 section 12.5.3)."""

    status = 406
    title = "Not Acceptable"
    type_slug = "not-acceptable"


def applies(route_name: str, config: Config) -> bool:
    return config.compression.enabled and route_name not in TINY_ROUTES


@web.middleware
async def compression_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    resp = await handler(request)
    if resp.prepared or not isinstance(resp, web.Response):
        return resp  # a stream that prepared itself (stream_headers decided) or a file
    state = request.app[COMPRESSION]
    headers = resp.headers
    status = resp.status
    if status == 304:
        # the 304 stands for the 200 the client holds: same Vary, same (weakened) validator
        state.vary(headers)
        etag = headers.get("ETag")
        if etag is not None and not etag.startswith("W/"):
            inm = request.headers.get("If-None-Match", "")
            if "W/" + etag in inm:  # the client holds the compressed (weakened) variant
                headers["ETag"] = weaken(etag)
        return resp
    if status < 200 or status >= 300 or status in (204, 206):
        # errors are small problem documents; 206 ranges refer to identity bytes
        if status >= 400 and state.compressible(headers.get("Content-Type")):
            state.vary(headers)
        return resp
    if not state.compressible(headers.get("Content-Type")):
        return resp
    state.vary(headers)
    if "Content-Encoding" in headers or no_transform(headers.get("Cache-Control")):
        return resp
    body = resp.body
    if not isinstance(body, bytes):
        return resp  # a payload object (file, stream) is sent as is
    choice = state.negotiator.choose(request.headers.get("Accept-Encoding"))
    coding = choice.coding
    if coding is None:
        if not choice.identity_ok:
            raise EncodingNotAcceptable(
                f"identity is refused and none of {', '.join(state.negotiator.order)} is acceptable",
                extra={"available": [*state.negotiator.order]},
            )
        return resp
    if (len(body) < state.min_size and choice.identity_ok) or request.method == "HEAD":
        return resp
    etag = headers.get("ETag")
    resp.body = await state.encode(coding, body, cache=etag is not None)
    headers["Content-Encoding"] = coding
    if etag is not None and not etag.startswith("W/"):
        headers["ETag"] = weaken(etag)
    return resp
