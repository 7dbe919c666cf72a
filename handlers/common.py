"""Request parsing and response helpers shared by every handler."""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import Mapping
from typing import Any

import aiohttp_jinja2
import orjson
from aiohttp import BodyPartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict
from yarl import URL, query_to_pairs

from server.config import CONFIG
from server.errors import (
    DomainError,
    EncodingNotAcceptable,
    NotAcceptable,
    NotFound,
    Unavailable,
    ValidationFailed,
)
from server.http import bodies, codings, compression, conditional, render
from server.http.compression import COMPRESSION
from server.http.negotiation import NEGOTIATOR
from server.http.parser_process import PARSER_PROCESS, ParserUnavailable
from server.http.render import BY_MEDIA, BY_NAME, OFFERS, RenderOptions, Shape

JSON_TYPE = "application/json"
PG_BIGINT_MAX = 2**63 - 1
_TRUE = frozenset({"1", "true", "yes", "on"})
# Built once: the headers of a negotiated response depend only on its media type.
_NEGOTIATED_HEADERS: dict[str, CIMultiDict[str]] = {
    media: CIMultiDict({"Content-Type": fmt.content_type, "Vary": "Accept"})
    for media, fmt in BY_MEDIA.items()
}
_BODY_TYPES = ", ".join(bodies.BODY_TYPES)


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """orjson straight into the body: no str round trip, datetimes as ISO 8601."""
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON_TYPE, headers=headers)


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


def page_link(request: web.Request, route: str, **query: str) -> str:
    """A link to another page of a listing that keeps ?format= and ?pretty=."""
    keep = {k: request.query[k] for k in ("format", "pretty") if k in request.query}
    url: URL = request.app.router[route].url_for().with_query({**query, **keep})
    return str(url)


def path_id(request: web.Request, name: str, what: str) -> int:
    """A numeric id from the path: the route (routing.number) already restricts it to at most
    19 ASCII digits, so int() cannot fail; ids beyond PostgreSQL's bigint cannot exist, so they
    are a 404, not a driver error."""
    raw = request.match_info[name]
    value = int(raw)
    if value > PG_BIGINT_MAX:
        raise NotFound(f"{what} {raw} does not exist")
    return value


def query_int(
    request: web.Request, name: str, default: int, *, minimum: int, maximum: int | None = None
) -> int:
    """An integer query parameter within bounds (values above `maximum` are capped)."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationFailed([{"field": name, "message": "must be an integer"}]) from None
    if value < minimum:
        raise ValidationFailed([{"field": name, "message": f"must be >= {minimum}"}])
    if maximum is not None and value > maximum:
        return maximum
    return value


_REQUIRED: Any = object()


async def read_body(request: web.Request, *, empty: Any = _REQUIRED) -> Any:
    """The decoded request body: JSON (also when no Content-Type is sent), msgpack or YAML.

    415 for any other type; 400 when malformed, or when absent unless `empty` is given (then
    returned); 413 beyond the route's limit (server.client_max_size; YAML: server.yaml_max_size,
    as sent and as decompressed), beyond server.body_max_containers or body_max_items, or for
    an object of more than server.body_max_fields members (no route reads more than a few,
    and each is looked at). YAML bodies above bodies.YAML_INLINE_MAX are parsed in the app's
    parser process, off the event loop.
    """
    media = request.content_type if "Content-Type" in request.headers else JSON_TYPE
    if not bodies.readable(media):
        if empty is not _REQUIRED and not request.body_exists:
            return empty
        accept_header = "Accept-Patch" if request.method == "PATCH" else "Accept-Post"
        raise web.HTTPUnsupportedMediaType(
            text=f"send the body as one of {_BODY_TYPES}, not {media}", headers={accept_header: _BODY_TYPES}
        )
    cfg = request.app[CONFIG].server
    if media in bodies.YAML_TYPES:
        limit, setting = min(cfg.yaml_max_size, cfg.client_max_size), "server.yaml_max_size"
    else:
        limit, setting = cfg.client_max_size, "server.client_max_size"
    body = await read_limited(request, limit, setting)
    if not body.strip():
        if empty is not _REQUIRED:
            return empty
        raise web.HTTPBadRequest(text="a request body is required")
    limits = body_limits(request)
    try:
        if media in bodies.YAML_TYPES and len(body) > bodies.YAML_INLINE_MAX:
            value = await request.app[PARSER_PROCESS].yaml(body, limits)
        else:
            value = bodies.parse_body(media, body, limits)
    except bodies.BodyTooLarge as exc:
        raise PayloadTooLarge(str(exc)) from None
    except bodies.BodyError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    except ParserUnavailable as exc:
        raise Unavailable(str(exc)) from None
    if isinstance(value, dict) and len(value) > cfg.body_max_fields:
        raise PayloadTooLarge(f"the body has more than {cfg.body_max_fields} fields (server.body_max_fields)")
    return value


def body_limits(request: web.Request) -> bodies.Limits:
    cfg = request.app[CONFIG].server
    return bodies.Limits(containers=cfg.body_max_containers, items=cfg.body_max_items)


# Content codings read_limited() decodes (codings.BodyDecoder: br and zstd only when
# their libraries are installed), never past the reader's cap.
_DECODED = frozenset(codings.REQUEST_CODINGS)
_ACCEPT_ENCODING = ", ".join(sorted(_DECODED - {"x-gzip"}))


class PayloadTooLarge(DomainError):
    status = 413
    title = "Content Too Large"
    type_slug = "too-large"


class UnsupportedEncoding(DomainError):
    status = 415
    title = "Unsupported Media Type"
    type_slug = "unsupported-encoding"

    def __init__(self, detail: str) -> None:
        # RFC 9110 15.5.16: a 415 caused by a content coding names the codings accepted
        super().__init__(detail, headers={"Accept-Encoding": _ACCEPT_ENCODING})


def content_coding(request: web.Request) -> str | None:
    """The request body's content coding (None: identity); 415 for one we cannot decode or a
    stack of codings."""
    header = request.headers.get("Content-Encoding")
    if header is None:
        return None
    codings = [c for c in (p.strip().lower() for p in header.split(",")) if c and c != "identity"]
    if not codings:
        return None
    if len(codings) > 1 or codings[0] not in _DECODED:
        raise UnsupportedEncoding(f"cannot decode a body with Content-Encoding {header!r}")
    return codings[0]


async def read_limited(request: web.Request, limit: int, setting: str) -> bytes:
    """The request body, decoded when it came with a Content-Encoding we support, at most
    `limit` bytes as sent and as decoded: 413 beyond (naming `setting`), before reading it
    when Content-Length says so. A decoded body also stops at compression.request_max_size.

    The app leaves bodies undecoded (create_app: auto_decompress=False) and they are decoded
    here, never past the cap, so a zip bomb costs at most the cap, and the rest of a refused
    body is drained by aiohttp as the raw bytes it is. Bad coded data is 400.
    """
    coding = content_coding(request)
    cap, cap_setting = limit, setting
    ceiling = request.app[CONFIG].compression.request_max_size
    if coding is not None and ceiling < limit:
        cap, cap_setting = ceiling, "compression.request_max_size"
    sent = request.content_length or 0
    if sent > limit:
        raise _too_large(limit, setting, sent)
    decoder = codings.BodyDecoder(coding) if coding is not None else None
    parts: list[bytes] = []
    raw = size = 0
    try:
        while chunk := await request.content.readany():
            raw += len(chunk)
            if raw > limit:  # chunked: no Content-Length to judge by
                raise _too_large(limit, setting, None)
            if decoder is not None:
                chunk = decoder.decode(chunk, cap - size)
            size += len(chunk)
            if size > cap:
                raise _too_large(cap, cap_setting, None, decoded=coding is not None)
            parts.append(chunk)
        if decoder is not None:
            decoder.finish()
    except ValueError as exc:
        raise web.HTTPBadRequest(text=f"the body is not valid {coding} data: {exc}") from None
    except RequestPayloadError:
        raise web.HTTPBadRequest(text="the body is incomplete") from None
    return b"".join(parts)


FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


async def read_form(request: web.Request) -> dict[str, str]:
    """The text fields of an x-www-form-urlencoded or multipart/form-data body (the last value
    of a repeated name). Bounded like read_body: server.client_max_size as sent and decoded,
    at most server.body_max_fields fields (413 beyond, counted before parsing); malformed is
    400. A multipart file part counts as a field but is read past, never spooled to a file
    (aiohttp's request.post() left its spooled files open when a later part was refused).
    """
    cfg = request.app[CONFIG].server
    limit, max_fields = cfg.client_max_size, cfg.body_max_fields
    too_many = PayloadTooLarge(f"more than {max_fields} form fields (server.body_max_fields)")
    charset = request.charset or "utf-8"
    # UTF-8 (or ASCII) only, for the form and for each part: yarl decodes UTF-8 percent-escapes
    # in C (1 MiB of them: 1.6 ms, against urllib's 58 ms), and a codec the client names could be
    # any Python has: punycode decodes in quadratic time (240 KB held the loop 7.9 s)
    _utf8_only(charset)
    if request.content_type != "multipart/form-data":
        body = (await read_limited(request, limit, "server.client_max_size")).rstrip()
        if body and body.count(b"&") + 1 > max_fields:
            raise too_many
        try:
            return dict(query_to_pairs(body.decode("utf-8")))
        except UnicodeDecodeError as exc:
            raise web.HTTPBadRequest(text=f"malformed form body: {exc}") from None
    if content_coding(request) is not None:
        raise UnsupportedEncoding("a multipart body is not decoded: send it without Content-Encoding")
    if (request.content_length or 0) > limit:
        raise _too_large(limit, "server.client_max_size", request.content_length)
    fields: dict[str, str] = {}
    parts = 0
    try:
        reader = await request.multipart()  # part headers bounded by aiohttp (max_field_size)
        while (part := await reader.next()) is not None:
            parts += 1
            if parts > max_fields:
                raise too_many
            if not isinstance(part, BodyPartReader):
                raise web.HTTPBadRequest(text="malformed form body: a nested multipart")
            if part.filename is not None:  # not a field of ours: read past it, within the limit
                while await part.read_chunk():
                    if request.content.total_bytes > limit:
                        raise _too_large(limit, "server.client_max_size", None)
                continue
            data = await part.read(decode=True)  # one part: at most client_max_size
            if request.content.total_bytes > limit:
                raise _too_large(limit, "server.client_max_size", None)
            if part.name is None:
                raise web.HTTPBadRequest(text="malformed form body: a part without a name")
            part_charset = part.get_charset(default=charset)
            _utf8_only(part_charset)
            fields[part.name] = bytes(data).decode(part_charset)
    # a missing or wrong boundary, truncated or headerless parts, bad bytes, charsets or
    # transfer encodings (aiohttp raises RuntimeError for an unknown one)
    except (ValueError, LookupError, RuntimeError, HttpProcessingError, RequestPayloadError) as exc:
        raise web.HTTPBadRequest(text=f"malformed form body: {exc}") from None
    except web.HTTPRequestEntityTooLarge:  # one part over client_max_size
        raise _too_large(limit, "server.client_max_size", None) from None
    return fields


def _utf8_only(charset: str) -> None:
    if _codec(charset) not in ("utf-8", "ascii"):
        raise web.HTTPUnsupportedMediaType(text=f"send the form in UTF-8, not {charset}")


def _codec(charset: str) -> str:
    try:
        return codecs.lookup(charset).name
    except LookupError:
        return charset


def _too_large(cap: int, setting: str, sent: int | None, *, decoded: bool = False) -> PayloadTooLarge:
    body = "the decoded body" if decoded else "the body"
    size = f" ({sent} bytes)" if sent is not None else ""
    return PayloadTooLarge(f"{body}{size} exceeds {cap} bytes ({setting})", extra={"max_size": cap})


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
        # aiohttp copies the headers it is given (tests/test_conditional.py holds it to that),
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
