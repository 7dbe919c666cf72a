"""Streamed datasets: synthetic records (JSON, NDJSON, CSV) and the users export."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator, Iterable
from functools import partial
from typing import Any

from aiohttp import web

from server import records
from server.config import CONFIG
from server.errors import EncodingNotAcceptable, ValidationFailed
from server.http import bounds, negotiation, render
from server.http.compression import COMPRESSION, no_transform
from server.http.operations import Param, query
from server.http.render import Shape
from server.http.representation import kept_response, negotiate, not_modified, render_options
from server.http.streams import EncodedStream, stream_headers
from server.large_dataset import LARGE_DATASET
from server.storage.db import local_statement_timeout
from server.storage.pool import DB

log = logging.getLogger("hotpath.streaming")

NDJSON = "application/x-ndjson"
EXPORT_TYPES = {"json": "application/json", "ndjson": NDJSON, "csv": "text/csv"}
EXPORT_OFFERS = ("application/json", NDJSON, "text/csv", "application/jsonl")
STREAM_FORMATS = ("json", "ndjson")  # ?format= of /stream-json

# ---------------------------------------------------------------- parameters (the API document)

DOWNLOAD = query("download", "1 for Content-Disposition: attachment")  # _open()
STREAM_QUERY: tuple[Param, ...] = (query("format", schema={"enum": list(STREAM_FORMATS)}), DOWNLOAD)
_RANGE = f"{bounds.DATE_MIN.isoformat()} to {bounds.DATE_MAX.isoformat()}"
EXPORT_QUERY: tuple[Param, ...] = (
    query("format", schema={"enum": list(EXPORT_TYPES)}),  # _export_type()
    query(  # _since()
        "since",
        f"only users created at or after this ISO 8601 date/time ({_RANGE} in UTC; naive values are UTC)",
    ),
    DOWNLOAD,
)
EXPORT_SINCE_PROBLEM = f"since is not a date, or outside {bounds.DATE_MIN} .. {bounds.DATE_MAX}"


class _Stalled(Exception):
    """The client stopped reading for longer than streaming.write_timeout."""


async def _open(request: web.Request, content_type: str, filename: str) -> web.StreamResponse:
    resp = EncodedStream(headers={"Content-Type": content_type, "Cache-Control": "no-store"})
    if request.query.get("download") in ("1", "true", "yes"):
        resp.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    stream_headers(request, resp)
    await resp.prepare(request)
    return resp


async def _write(resp: web.StreamResponse, chunk: bytes, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            await resp.write(chunk)
    except TimeoutError:
        raise _Stalled from None


def _gone(request: web.Request, resp: web.StreamResponse, exc: BaseException) -> web.StreamResponse:
    """End a stream whose client left or stalled: drop the connection, one debug line."""
    log.debug("stream %s %s ended early: %s", request.method, request.path, type(exc).__name__)
    if request.transport is not None:
        request.transport.abort()
    resp.force_close()
    return resp


async def _send(
    request: web.Request, content_type: str, filename: str, chunks: Iterable[bytes] | AsyncIterator[bytes]
) -> web.StreamResponse:
    timeout = request.app[CONFIG].streaming.write_timeout
    resp = await _open(request, content_type, filename)
    try:
        if isinstance(chunks, AsyncIterator):
            async for chunk in chunks:
                await _write(resp, chunk, timeout)
        else:
            for chunk in chunks:
                await _write(resp, chunk, timeout)
        await resp.write_eof()
    except (ConnectionError, _Stalled) as exc:
        return _gone(request, resp, exc)
    return resp


def _count(request: web.Request) -> int:
    cap = request.app[CONFIG].streaming.max_records
    count = int(request.match_info["record_count"])
    if count > cap:
        raise web.HTTPBadRequest(text=f"record_count may be at most {cap} (streaming.max_records)")
    return count


async def stream_json(request: web.Request) -> web.StreamResponse:
    count = _count(request)
    batch = request.app[CONFIG].streaming.batch_records
    fmt = request.query.get("format", STREAM_FORMATS[0])
    if fmt == "ndjson":
        return await _send(request, NDJSON, f"records-{count}.ndjson", records.synthetic_ndjson(count, batch))
    if fmt != "json":
        raise web.HTTPBadRequest(text=f"format must be {' or '.join(STREAM_FORMATS)}, not {fmt!r}")
    return await _send(
        request, "application/json", f"records-{count}.json", records.synthetic_json(count, batch)
    )


async def stream_csv(request: web.Request) -> web.StreamResponse:
    count = _count(request)
    batch = request.app[CONFIG].streaming.batch_records
    return await _send(
        request,
        "text/csv; charset=utf-8; header=present",
        f"records-{count}.csv",
        records.synthetic_csv(count, batch),
    )


def _export_type(request: web.Request) -> str:
    fmt = request.query.get("format")
    if fmt is not None:
        media = EXPORT_TYPES.get(fmt.lower())
        if media is None:
            raise web.HTTPBadRequest(text=f"format must be one of {', '.join(EXPORT_TYPES)}, not {fmt!r}")
        return media
    media = negotiation.choose(request.headers.get("Accept"), EXPORT_OFFERS)
    if media is None:
        raise web.HTTPNotAcceptable(text=f"the export is available as {', '.join(EXPORT_TYPES.values())}")
    return NDJSON if media == "application/jsonl" else media


def _since(request: web.Request) -> dt.datetime | None:
    """?since= in UTC, within server.http.bounds' range: checked here, before any SQL, so a value
    asyncpg cannot encode (past year 9999 once in UTC) is a 422, not a failed stream."""
    raw = request.query.get("since")
    if not raw:
        return None
    try:
        since = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ValidationFailed(
            [{"field": "since", "message": "must be an ISO 8601 date or datetime"}]
        ) from None
    utc = bounds.utc_instant(since)
    if utc is None:
        raise ValidationFailed([{"field": "since", "message": f"must be {bounds.RANGE_TEXT} (UTC)"}])
    return utc


async def export_users(request: web.Request) -> web.StreamResponse:
    media = _export_type(request)
    since = _since(request)
    cfg = request.app[CONFIG].streaming
    timeout = cfg.export_timeout
    ext = {"application/json": "json", NDJSON: "ndjson", "text/csv": "csv"}[media]
    # one snapshot for the whole export: rows inserted meanwhile are not half-included
    async with (
        request.app[DB].acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        # an export runs as long as the client reads: the pool's statement_timeout is for requests
        await local_statement_timeout(conn, timeout)
        if media != "text/csv":
            array = media == "application/json"
            rows = records.export_json_lines(
                conn, since, cfg.fetch_rows, cfg.chunk_size, array=array, timeout=timeout
            )
            return await _send(request, media, f"users.{ext}", rows)
        resp = await _open(request, "text/csv; charset=utf-8; header=present", "users.csv")

        async def write(chunk: bytes) -> None:
            await _write(resp, chunk, cfg.write_timeout)

        try:
            await records.export_csv(conn, since, write, timeout=timeout)
            await resp.write_eof()
        except (ConnectionError, _Stalled) as exc:
            return _gone(request, resp, exc)
        return resp


# ---------------------------------------------------------------- GET /large-dataset

LARGE_DATASET_SHAPE = Shape("large_dataset", rows="records")


async def large_dataset(request: web.Request) -> web.Response:
    """The 1000-record document, negotiated like every resource, served from encoded bytes
    cached per (representation, coding) with a strong ETag each; 304 for a matching
    If-None-Match. The route leaves the compression middleware out: it encodes itself."""
    media = negotiate(request)
    # HEAD is answered from the kept variant too: exactly the headers GET would get
    state = request.app[COMPRESSION]
    coding = None
    compressible = state.enabled and state.compressible(media)
    if compressible:
        choice = state.negotiator.choose(request.headers.get("Accept-Encoding"))
        if choice.coding is None and not choice.identity_ok:
            raise EncodingNotAcceptable([*state.negotiator.order])
        if not no_transform(request.headers.get("Cache-Control")):
            coding = choice.coding
    options = render_options(request, media)
    key = (media, options.pretty, coding)
    dataset = request.app[LARGE_DATASET]
    encoded = dataset.cached(key)
    if encoded is None:
        encoded = await dataset.get(key, partial(_render_dataset, media, options))
    cfg = request.app[CONFIG].compression
    headers = {"Cache-Control": f"public, max-age={cfg.dataset_max_age}"}
    if "If-None-Match" in request.headers:
        if compressible:
            headers["Vary"] = "Accept, Accept-Encoding"
        unchanged = not_modified(request, media, encoded.etag, headers)
        if unchanged is not None:
            return unchanged
    return kept_response(
        media, encoded.body, encoded.etag, encoded.coding, headers, compressible=compressible
    )


def _render_dataset(media: str, options: render.RenderOptions, doc: dict[str, Any]) -> bytes:
    return render.render(media, doc, LARGE_DATASET_SHAPE, options)
