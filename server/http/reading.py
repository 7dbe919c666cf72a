"""Reading request bodies under the route's bounds: the body's content coding decoded (never
past the cap), then JSON, msgpack or YAML (read_body), form fields (read_form), or raw bytes
(read_limited); 413, 415 and 400 as problem documents.

The parsers themselves (size, depth and CPU bounds on the bytes) are server/http/bodies.py's.
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from yarl import query_to_pairs

from server.config import CONFIG
from server.errors import DomainError, Unavailable
from server.http import bodies
from server.http.codings import REQUEST_CODINGS, BodyDecoder
from server.http.parser_process import ParserProcess, ParserUnavailable

_BODY_TYPES = ", ".join(bodies.BODY_TYPES)
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
    media = request.content_type if "Content-Type" in request.headers else bodies.JSON
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


# Content codings read_limited() decodes (BodyDecoder: br and zstd only when
# their libraries are installed), never past the reader's cap.
_DECODED = frozenset(REQUEST_CODINGS)
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
    decoder = BodyDecoder(coding) if coding is not None else None
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
    except web.RequestPayloadError:
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
    except (ValueError, LookupError, RuntimeError, HttpProcessingError, web.RequestPayloadError) as exc:
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


# Parses YAML and bulk CSV bodies too costly for the event loop (a child process).
PARSER_PROCESS = web.AppKey("hotpath.parser_process", ParserProcess)


async def parser_process_ctx(app: web.Application) -> AsyncIterator[None]:
    """The parser process: started by the first body too costly to parse on the loop, ended
    here."""
    parser = ParserProcess(timeout=app[CONFIG].server.parser_timeout)
    app[PARSER_PROCESS] = parser
    yield
    await parser.close()
