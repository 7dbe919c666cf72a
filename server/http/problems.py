"""Every error leaves as application/problem+json (RFC 9457); unexpected ones leak nothing.

problem_for() is called by the outermost middleware (request_context), which catches what
every layer below it raises. A failure after the response's headers went out cannot be
answered any more: abort_started() ends the connection instead (the client sees a truncated
body, never a second response inside the first), and only the log tells what happened."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from server.errors import DomainError, as_unavailable
from server.http import negotiation, render
from server.http.operations import Schema

log = logging.getLogger("hotpath.errors")

PROBLEM_TYPE = "application/problem+json"
PROBLEM_XML = "application/problem+xml"
PROBLEM_XML_NS = "urn:ietf:rfc:7807"  # RFC 9457 appendix B
# What a problem document can be sent as, in preference order: RFC 9457 JSON first. A client
# that accepts only XML or only YAML gets it in that format; one that accepts none of these
# still gets JSON (an error must reach the client in some form).
PROBLEM_OFFERS = (
    PROBLEM_TYPE,
    render.JSON,
    PROBLEM_XML,
    render.XML,
    "text/xml",
    render.YAML,
    "application/x-yaml",
)
# Headers of an HTTPException worth keeping on the problem response (Allow on 405, ...).
_PROBLEM_SHAPE = render.Shape("problem")
_KEEP_HEADERS: tuple[str, ...] = (
    "Allow",
    "Retry-After",
    "WWW-Authenticate",
    "Accept",
    "Accept-Post",
    "Accept-Patch",
)

_KEEP_HEADERS += ("X-Cache",)  # set by the cache middleware on errors of cached routes

# The document problem_response() builds, and the members some problems add: `errors` (422,
# server.errors.ValidationFailed), `checks` (/ready), `available` (406), `rate_info` (429,
# the rate limiter's RateInfo, named by its reference: this layer does not know the limiter).
PROBLEM = Schema(
    "Problem",
    {
        "type": "object",
        "required": ["type", "title", "status"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "request_id": {"type": "string"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["field", "message"],
                    "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                },
            },
            "checks": {"type": "object"},
            "available": {"type": "array", "items": {"type": "string"}},
            "rate_info": {"$ref": "#/components/schemas/RateInfo"},
        },
    },
)


def problem_response(
    status: int,
    title: str,
    detail: str | None = None,
    *,
    type_: str = "about:blank",
    extra: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    accept: str | None = None,
) -> web.Response:
    """Build an RFC 9457 problem document response, in XML or YAML when `accept` asks only for those."""
    doc: dict[str, Any] = {"type": type_, "title": title, "status": status}
    if detail:
        doc["detail"] = detail
    if extra:
        doc.update(extra)
    media = negotiation.choose(accept, PROBLEM_OFFERS) if accept else None
    if media in (PROBLEM_XML, render.XML, "text/xml"):
        body = render.xml_document("problem", doc, namespace=PROBLEM_XML_NS)
        ctype = PROBLEM_XML
    elif media in (render.YAML, "application/x-yaml"):
        body = render.render(media, doc, _PROBLEM_SHAPE)
        ctype = media
    else:
        body = render.dumps_json(doc)
        ctype = PROBLEM_TYPE
    out = web.Response(body=body, status=status, content_type=ctype, headers=headers)
    if accept:
        out.headers["Vary"] = "Accept"
    return out


def _from_http_exception(exc: web.HTTPException, accept: str | None) -> web.Response:
    default_text = f"{exc.status}: {exc.reason}"
    detail = exc.text if exc.text and exc.text != default_text else None
    headers = {k: exc.headers[k] for k in _KEEP_HEADERS if k in exc.headers}
    return problem_response(exc.status, exc.reason, detail, headers=headers, accept=accept)


def _from_domain_error(exc: DomainError, accept: str | None) -> web.Response:
    headers = exc.headers or None
    type_ = exc.type_slug if exc.type_slug == "about:blank" else f"/problems/{exc.type_slug}"
    return problem_response(
        exc.status, exc.title, exc.detail, type_=type_, extra=exc.extra, headers=headers, accept=accept
    )


def problem_for(request: web.Request, exc: Exception) -> web.Response:
    """The problem response for an exception a handler (or a middleware below) raised.

    Called by the outermost middleware (middlewares/request_context.py). A redirect (an
    HTTPException below 400) is not an error and is raised again as it is.
    """
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        return _from_http_exception(exc, request.headers.get("Accept"))
    if isinstance(exc, DomainError):
        return _from_domain_error(exc, request.headers.get("Accept"))
    unavailable = as_unavailable(exc)
    rid = request.get(REQUEST_ID, "-")
    if unavailable is not None:
        log.warning("request %s %s %s: %s: %s", rid, request.method, request.path, type(exc).__name__, exc)
        return _from_domain_error(unavailable, request.headers.get("Accept"))
    log.exception("request %s %s %s failed", rid, request.method, request.path, exc_info=exc)
    return problem_response(
        500,
        "Internal Server Error",
        "the server failed to handle this request; quote the request_id when reporting it",
        extra={"request_id": rid},
        accept=request.headers.get("Accept"),
    )


def response_began(request: web.Request) -> bool:
    """True once bytes of this request's response are on their way: a handler's own prepare()
    of a StreamResponse sends the headers at once. aiohttp's own error path asks the same."""
    return request.writer.output_size > 0


def abort_started(request: web.Request, exc: Exception) -> web.Response:
    """A failure after the response began: log it with the request id and abort the
    connection. The answer is a stand-in that never reaches the wire: aiohttp finds the
    transport closed when it tries to send it, and drops the connection without a word. No
    chunked terminator is written, so the client knows the body is incomplete."""
    rid = request.get(REQUEST_ID, "-")
    if isinstance(exc, web.HTTPException | DomainError) or as_unavailable(exc) is not None:
        log.warning(
            "request %s %s %s failed after its response began, connection aborted: %s: %s",
            rid,
            request.method,
            request.path,
            type(exc).__name__,
            exc,
        )
    else:
        log.error(
            "request %s %s %s failed after its response began, connection aborted",
            rid,
            request.method,
            request.path,
            exc_info=exc,
        )
    transport = request.transport
    if transport is not None:
        transport.abort()
    stand_in = web.Response(status=500)
    stand_in.force_close()
    return stand_in


REQUEST_ID = web.RequestKey("hotpath.request_id", str)
