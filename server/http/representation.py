"""Responses in the representation the client chose: Accept (or ?format=) negotiation, rendering
(off the loop for long text documents), strong ETags and 304s, and kept bodies (rendered once,
compressed once per coding, served with a weak ETag when compressed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import aiohttp_jinja2
from aiohttp import hdrs, web
from multidict import CIMultiDict

from server.errors import EncodingNotAcceptable, NotAcceptable
from server.http import codings, compression, conditional, render
from server.http.compression import COMPRESSION
from server.http.negotiation import NEGOTIATOR
from server.http.render import BY_MEDIA, BY_NAME, OFFERS, RenderOptions, Shape

_TRUE = frozenset({"1", "true", "yes", "on"})
# Built once: the headers of a negotiated response depend only on its media type.
_NEGOTIATED_HEADERS: dict[str, CIMultiDict[str]] = {
    media: CIMultiDict({"Content-Type": fmt.content_type, "Vary": "Accept"})
    for media, fmt in BY_MEDIA.items()
}


def negotiate(request: web.Request) -> str:
    """The media type to answer with: ?format= if given (400 when unknown), else the best
    match for Accept (406 when nothing we have is acceptable)."""
    if request.query_string:
        name = request.query.get("format")
        if name is not None:
            fmt = BY_NAME.get(name.lower())
            if fmt is None:
                raise web.HTTPBadRequest(text=f"unknown format {name!r}; use one of {', '.join(BY_NAME)}")
            return fmt.media_type
    media = request.app[NEGOTIATOR].choose(request.headers.get("Accept"))
    if media is None:
        raise NotAcceptable(list(OFFERS))
    return media


def render_options(request: web.Request, media: str) -> RenderOptions:
    pretty = request.query.get("pretty", "").lower() in _TRUE if request.query_string else False
    templates = aiohttp_jinja2.get_env(request.app) if media == render.HTML else None
    return RenderOptions(pretty=pretty, templates=templates)


def negotiated_response(
    media: str, body: bytes, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    out = _NEGOTIATED_HEADERS[media].copy()  # Response keeps (and may change) the mapping it gets
    if headers:
        out.update(headers)
    return web.Response(body=body, status=status, headers=out)


def represent(
    request: web.Request,
    data: Any,
    shape: Shape,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    media: str | None = None,
    etag: bool = False,
) -> web.Response:
    """`data` in the representation the client prefers, with Vary: Accept. Handlers that
    change state pass `media` from negotiate() called first, so a 406 never follows a write.
    With `etag`, a strong ETag over the bytes is sent and If-None-Match honoured (304).
    For one object or a short page; a document of many rows goes through represent_rows()."""
    if media is None:
        media = negotiate(request)
    body = render.render(media, data, shape, render_options(request, media))
    return _represented(request, media, body, status, headers, etag)


# The text representations walk the data in Python: a row costs about 20 µs as YAML and 6 µs
# as XML here (a 3,661-row report: 72 ms and 21 ms), JSON and msgpack 0.1-0.8 µs in C. Beyond
# OFF_LOOP_ROWS rows a text body is rendered in a thread: the loop takes the GIL back every
# sys.getswitchinterval() (5 ms), so it keeps answering while the document renders.
OFF_LOOP_ROWS = 100
_C_RENDERED = frozenset({render.JSON, render.MSGPACK, "application/x-msgpack"})


async def represent_rows(
    request: web.Request,
    data: Any,
    shape: Shape,
    rows: int,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    etag: bool = False,
) -> web.Response:
    """represent() for a document of `rows` rows, rendered off the event loop when large."""
    media = negotiate(request)
    opts = render_options(request, media)
    if rows > OFF_LOOP_ROWS and media not in _C_RENDERED:
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(None, render.render, media, data, shape, opts)
    else:
        body = render.render(media, data, shape, opts)
    return _represented(request, media, body, status, headers, etag)


def _represented(
    request: web.Request,
    media: str,
    body: bytes,
    status: int,
    headers: Mapping[str, str] | None,
    etag: bool,
) -> web.Response:
    if etag:
        tag = conditional.etag_of(body)
        unchanged = not_modified(request, media, tag)
        if unchanged is not None:
            return unchanged
        headers = {**headers, "ETag": tag} if headers else {"ETag": tag}
    return negotiated_response(media, body, status, headers)


def not_modified(
    request: web.Request, media: str, etag: str, headers: Mapping[str, str] | None = None
) -> web.Response | None:
    """A 304 (no body; the validator, Vary and any `headers` the 200 would carry) when the
    request's If-None-Match matches `etag`, else None. GET and HEAD only (RFC 9110 13.1.2)."""
    inm = request.headers.get("If-None-Match")
    if inm is None or request.method not in ("GET", "HEAD") or not conditional.none_match(inm, etag):
        return None
    if not etag.startswith("W/") and "W/" + etag in inm:
        etag = "W/" + etag  # the client holds the compressed variant, sent with the weak form
    out = CIMultiDict({"ETag": etag, "Vary": _NEGOTIATED_HEADERS[media]["Vary"]})
    if headers:
        out.update(headers)
    return web.Response(status=304, headers=out)


# ------------------------------------------------------------------ kept bodies, encoded once

# Headers of a kept body per (media type, coding): built once, copied per response.
_KEPT_HEADERS: dict[tuple[str, str | None], CIMultiDict[str]] = {
    (media, coding): CIMultiDict(
        {
            "Content-Type": fmt.content_type,
            "Vary": "Accept, Accept-Encoding",
            **({"Content-Encoding": coding} if coding else {}),
        }
    )
    for media, fmt in BY_MEDIA.items()
    for coding in (None, *codings.available())
}


def choose_coding(request: web.Request, media: str, size: int, *, kept: bool = False) -> str | None:
    """The content coding for a body of `size` bytes of type `media` (None: identity), by the
    rules of middlewares/compression.py; 406 when identity is refused and nothing fits. A
    `kept` body is compressed once and kept, so HEAD gets it too (exactly GET's headers)."""
    state = request.app[COMPRESSION]
    if not state.enabled or not state.compressible(media):
        return None
    choice = state.negotiator.choose(request.headers.get("Accept-Encoding"))
    if choice.coding is None:
        if not choice.identity_ok:
            raise EncodingNotAcceptable([*state.negotiator.order])
        return None
    if (size < state.min_size and choice.identity_ok) or (request.method == "HEAD" and not kept):
        return None
    if compression.no_transform(request.headers.get("Cache-Control")):
        return None
    return choice.coding


def kept_response(
    media: str,
    body: bytes,
    etag: str,
    coding: str | None,
    headers: Mapping[str, str] | None = None,
    *,
    compressible: bool = True,
) -> web.Response:
    """A response for already-encoded bytes: Vary: Accept, Accept-Encoding when the type could
    be compressed, Content-Encoding when `coding`, the ETag as given."""
    table = _KEPT_HEADERS if compressible or coding else None
    out = (table[(media, coding)] if table is not None else _NEGOTIATED_HEADERS[media]).copy()
    out["ETag"] = etag
    if headers:
        out.update(headers)
    return web.Response(body=body, headers=out)


def send_kept_now(request: web.Request, media: str, body: bytes) -> web.Response | None:
    """A body the handler keeps between requests (a rendered page), with a strong ETag hashed
    once per body: 304 when If-None-Match matches it; else the body as is, or compressed
    from the app's compressed-body cache, with the ETag weakened when compressed. None when
    the body has yet to be compressed for this coding: then await send_kept(). Routes using
    it leave the compression middleware out (middlewares/compression.py SELF_ENCODED). No
    await here: the hot path of a cached page stays one plain call."""
    headers = request.headers
    state = request.app[COMPRESSION]
    kept = state.kept(body, media, _identity_headers)
    etag, compressible = kept.etag, kept.compressible
    if hdrs.IF_NONE_MATCH in headers:
        vary = {"Vary": "Accept, Accept-Encoding"} if compressible else None
        unchanged = not_modified(request, media, etag, vary)
        if unchanged is not None:
            return unchanged
    if not compressible or hdrs.ACCEPT_ENCODING not in headers:
        # aiohttp copies the headers it is given (tests/http/test_conditional.py holds it to that),
        # so the kept mapping is handed over as it is
        return web.Response(body=body, headers=kept.identity)
    coding = choose_coding(request, media, len(body), kept=True)
    if coding is None:
        return kept_response(media, body, etag, None)
    encoded = state.cached(body, coding)
    if encoded is None:
        return None
    return kept_response(media, encoded, conditional.weak(etag), coding)


async def send_kept(request: web.Request, media: str, body: bytes) -> web.Response:
    """send_kept_now(), compressing the body first (once per coding) when it has to."""
    resp = send_kept_now(request, media, body)
    if resp is not None:
        return resp
    coding = choose_coding(request, media, len(body), kept=True)
    assert coding is not None  # send_kept_now() answers every case without one
    state = request.app[COMPRESSION]
    encoded = await state.encode(coding, body, cache=True)
    etag = state.kept(body, media, _identity_headers).etag
    return kept_response(media, encoded, conditional.weak(etag), coding)


def _identity_headers(media: str, compressible: bool) -> CIMultiDict[str]:
    return (_KEPT_HEADERS[(media, None)] if compressible else _NEGOTIATED_HEADERS[media]).copy()
