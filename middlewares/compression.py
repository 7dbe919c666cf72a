"""Response compression (server/http/compression.py): what should be compressed is, what must not
be never is, and large bodies are compressed off the event loop.

A response is compressed only when all hold: a 2xx other than 204/206, a compressible media
type, no Content-Encoding yet, no `Cache-Control: no-transform`, a body of at least
compression.min_size bytes (unless the client refuses identity), and a coding the client
accepts. HEAD gets exactly the headers GET would (Content-Encoding and Content-Length too).
`Vary: Accept-Encoding` goes on every response whose type could be compressed, compressed or
not, so a shared cache never hands gzip to a client that did not ask for it.
A strong ETag becomes weak on a compressed body (the representation is the same, the bytes
are not), and a 304 answers with the validator the client holds.

Streamed responses prepare themselves inside the handler; server/http/streams.py gives them
the same decision through stream_headers().
"""

from __future__ import annotations

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from server.config import Config
from server.errors import EncodingNotAcceptable
from server.http.compression import COMPRESSION, no_transform, weaken
from server.http.layers import Layer

# Routes that do not carry the middleware at all: answers that are always tiny, and
# handlers that serve kept bytes and encode them once themselves (server.http.representation.send_kept).
TINY_ROUTES = frozenset({"health", "ready"})
SELF_ENCODED = frozenset({"products", "large_dataset"})


def applies(route_name: str, config: Config, method: str) -> bool:
    return config.compression.enabled and route_name not in TINY_ROUTES | SELF_ENCODED


async def compression_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    resp = await handler(request)
    if not isinstance(resp, web.Response) or resp.prepared:
        return resp  # a stream that prepared itself (stream_headers decided) or a file
    state = request.app[COMPRESSION]
    headers = resp.headers
    status = resp.status
    if status == 304:
        # the 304 stands for the 200 the client holds: same Vary, same validator
        state.vary(headers)
        etag = headers.get(hdrs.ETAG)
        inm = request.headers.get(hdrs.IF_NONE_MATCH, "")
        if etag is not None and not etag.startswith("W/") and "W/" + etag in inm:
            headers[hdrs.ETAG] = weaken(etag)  # the client holds the compressed variant
        return resp
    if not state.compressible(headers.get(hdrs.CONTENT_TYPE)):
        return resp
    if status < 200 or status >= 300 or status in (204, 206):
        # errors are small problem documents; 206 ranges refer to identity bytes
        if status >= 400:
            state.vary(headers)
        return resp
    state.vary(headers)
    choice = state.negotiator.choose(request.headers.get(hdrs.ACCEPT_ENCODING))
    coding = choice.coding
    if coding is None:
        if choice.identity_ok:
            return resp  # the common case: identity wanted
        if hdrs.CONTENT_ENCODING in headers:
            return resp
        raise EncodingNotAcceptable([*state.negotiator.order])
    # HEAD is encoded like GET (aiohttp then sends no body): its Content-Encoding and
    # Content-Length must be those a GET would get, or a client sizing a download by HEAD is misled.
    if hdrs.CONTENT_ENCODING in headers or no_transform(headers.get(hdrs.CACHE_CONTROL)):
        return resp
    body = resp.body
    if not isinstance(body, bytes) or (len(body) < state.min_size and choice.identity_ok):
        return resp  # a payload object (file, stream) is sent as is; small bodies too
    etag = headers.get(hdrs.ETAG)
    resp.body = await state.encode(coding, body, cache=etag is not None)
    headers[hdrs.CONTENT_ENCODING] = coding
    if etag is not None and not etag.startswith("W/"):
        headers[hdrs.ETAG] = weaken(etag)
    return resp


LAYER = Layer(compression_middleware, applies=applies)
