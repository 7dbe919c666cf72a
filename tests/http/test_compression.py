"""Compression: Accept-Encoding negotiation, the middleware on a small app of its own, streams,
compressed request bodies, and the same through the real app."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import brotli
import orjson
import pytest
from aiohttp import web

from middlewares import compose
from middlewares.compression import compression_middleware
from middlewares.request_context import request_context_middleware
from server.http import codings, compression
from server.http.codings import BR, GZIP, ZSTD, Levels
from server.http.compression import COMPRESSION, Choice, Compression, choose_encoding
from server.http.streams import EncodedStream, stream_headers

try:
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:
    from backports import zstd

ORDER = ("zstd", "br", "gzip")
GATE = web.AppKey("test.gate", asyncio.Event)


def decode(coding: str | None, data: bytes) -> bytes:
    if coding is None:
        return data
    if coding == GZIP:
        return gzip.decompress(data)
    if coding == BR:
        return bytes(brotli.decompress(data))
    if coding == ZSTD:
        return bytes(zstd.decompress(data))
    raise AssertionError(coding)


# ---------------------------------------------------------------- Accept-Encoding table


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, Choice(None, True)),  # absent: identity
        ("", Choice(None, True)),  # empty: no coding preferred
        ("gzip", Choice("gzip", True)),
        ("gzip, deflate, br, zstd", Choice("zstd", True)),  # equal q: server order
        ("gzip;q=1.0, br;q=0.9", Choice("gzip", True)),  # q beats server order
        ("br;q=0.5, gzip;q=0.8, zstd;q=0.1", Choice("gzip", True)),
        ("GZIP", Choice("gzip", True)),  # case-insensitive
        ("*", Choice("zstd", True)),
        ("*;q=0.5, gzip", Choice("gzip", True)),
        ("gzip;q=0", Choice(None, True)),
        ("deflate", Choice(None, True)),  # deflate is never produced
        ("identity", Choice(None, True)),
        ("gzip;q=0.2, identity", Choice(None, True)),  # identity liked more than gzip
        ("identity;q=0", Choice(None, False)),  # -> 406
        ("identity;q=0, gzip", Choice("gzip", False)),  # must compress, whatever the size
        ("*;q=0", Choice(None, False)),
        ("*;q=0, identity", Choice(None, True)),
        ("gzip;q=abc, br", Choice("br", True)),  # malformed entry dropped
        ("gzip;q=2", Choice(None, True)),  # q out of range dropped
        ("gzip;q=nan", Choice(None, True)),
        (",,; ,gzip ; q=0.7", Choice("gzip", True)),
        ("g@zip, \x00", Choice(None, True)),  # wholly malformed: identity
        ("br;q=0.9;foo=bar, gzip;q=0.8", Choice("br", True)),
    ],
)
def test_accept_encoding_table(header: str | None, expected: Choice) -> None:
    assert choose_encoding(header, ORDER) == expected


def test_negotiator_memo_is_bounded_and_keeps_answers() -> None:
    neg = compression.EncodingNegotiator(ORDER, max_entries=4)
    for i in range(20):
        assert neg.choose(f"gzip;q=0.{i % 9 + 1}").coding == "gzip"
    assert len(neg._memo) == 4
    assert neg.choose("br") is neg.choose("br")


def test_custom_order_and_missing_library() -> None:
    assert choose_encoding("gzip, br, zstd", ("gzip", "br")).coding == "gzip"
    # codings whose library is missing are dropped from the order
    neg = compression.EncodingNegotiator(("lzma", "gzip"))
    assert neg.order == ("gzip",)


@pytest.mark.parametrize(
    ("content_type", "compressible"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("application/problem+json", True),
        ("text/csv; charset=utf-8; header=present", True),
        ("text/html", True),
        ("application/xml", True),
        ("application/yaml", True),
        ("image/svg+xml", True),
        ("application/x-ndjson", True),
        ("application/vnd.msgpack", False),
        ("image/png", False),
        ("application/octet-stream", False),
        ("text/event-stream", False),
        ("TEXT/EVENT-STREAM; charset=utf-8", False),
        (None, False),
    ],
)
def test_compressible_types(content_type: str | None, compressible: bool) -> None:
    from server.config import CompressionConfig

    assert compression.MediaFilter(CompressionConfig().types)(content_type) is compressible


def test_event_stream_refused_even_when_listed() -> None:
    assert not compression.MediaFilter(["text/*", "text/event-stream", "*/*"])("text/event-stream")


@pytest.mark.parametrize("coding", [GZIP, BR, ZSTD])
def test_each_coding_decodes_back(coding: str) -> None:
    data = orjson.dumps([{"id": i, "name": f"Record {i}"} for i in range(2000)])
    out = codings.compress(coding, data, Levels())
    assert len(out) < len(data) // 5
    assert decode(coding, out) == data


@pytest.mark.parametrize("coding", [GZIP, BR, ZSTD])
def test_stream_encoder_flush_makes_the_prefix_decodable(coding: str) -> None:
    enc = codings.stream_encoder(coding, Levels())
    first, second = b'{"a":1}' * 300, b'{"b":2}' * 300
    part1 = enc.compress(first) + enc.flush()
    part2 = enc.compress(second) + enc.finish()
    if coding == GZIP:
        d = zlib.decompressobj(31)
        assert d.decompress(part1) == first  # the client sees the first piece before the end
        assert d.decompress(part2) == second
    elif coding == BR:
        db = brotli.Decompressor()
        assert db.process(part1) == first
        assert db.process(part2) == second
    else:
        dz = zstd.ZstdDecompressor()
        assert dz.decompress(part1) == first
        assert dz.decompress(part2) == second
    assert decode(coding, part1 + part2) == first + second


def test_gzip_backend_is_the_fastest_installed() -> None:
    assert codings.ZLIB_NAME == "isal"  # isal is a dependency (setup.cfg)


# ---------------------------------------------------------------- the middleware, own app

BIG = orjson.dumps({"items": [{"id": i, "name": f"thing {i}"} for i in range(200)]})
SMALL = b'{"ok":true}'


class CountingExecutor(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.calls = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return super().submit(fn, *args, **kwargs)


def small_app(**settings: Any) -> web.Application:
    app = web.Application()
    app[COMPRESSION] = Compression(
        order=ORDER,
        types=("application/json", "application/*+json", "text/*"),
        **settings,
    )

    def ok(body: bytes, ctype: str = "application/json", **kw: Any) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.Response(body=body, content_type=ctype, **kw)

        return handler

    async def sse(request: web.Request) -> web.StreamResponse:
        resp = EncodedStream(headers={"Content-Type": "text/event-stream"})
        stream_headers(request, resp)
        await resp.prepare(request)
        await resp.write(b"data: " + b"x" * 4000 + b"\n\n")
        await resp.write_eof()
        return resp

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = EncodedStream(headers={"Content-Type": "application/json"})
        stream_headers(request, resp)
        await resp.prepare(request)
        for i in range(50):
            await resp.write(b"%d," % i * 500)
        await resp.write_eof()
        return resp

    gate = asyncio.Event()
    app[GATE] = gate

    async def slow_stream(request: web.Request) -> web.StreamResponse:
        resp = EncodedStream(headers={"Content-Type": "text/plain"})
        stream_headers(request, resp)
        await resp.prepare(request)
        await resp.write(b'{"first":1}\n')
        await gate.wait()  # released by the test once it has decoded the first record
        await resp.write(b'{"second":2}\n')
        await resp.write_eof()
        return resp

    routes = {
        "/big": ok(BIG),
        "/small": ok(SMALL),
        "/msgpack": ok(BIG, "application/vnd.msgpack"),
        "/no-transform": ok(BIG, headers={"Cache-Control": "no-transform"}),
        "/encoded": ok(BIG, headers={"Content-Encoding": "gzip"}),
        "/partial": ok(BIG, status=206, headers={"Content-Range": f"bytes 0-{len(BIG) - 1}/{len(BIG)}"}),
        "/etag": ok(BIG, headers={"ETag": '"abc"'}),
        "/vary": ok(BIG, headers={"Vary": "Accept"}),
        "/sse": sse,
        "/stream": stream,
        "/slow-stream": slow_stream,
    }

    async def empty(request: web.Request) -> web.StreamResponse:
        return web.Response(status=204)

    async def not_modified(request: web.Request) -> web.StreamResponse:
        return web.Response(status=304, headers={"ETag": '"abc"', "Vary": "Accept"})

    routes["/empty"] = empty
    routes["/not-modified"] = not_modified
    for path, handler in routes.items():
        app.router.add_get(path, compose(handler, (request_context_middleware, compression_middleware)))
    return app


async def fetch(
    client: Any, path: str, ae: str | None = "gzip", method: str = "GET", headers: Any = None, **kw: Any
) -> Any:
    headers = dict(headers or {})
    if ae is not None:
        headers["Accept-Encoding"] = ae
    skip = () if ae is not None else ("Accept-Encoding",)
    resp = await client.request(
        method, path, headers=headers, skip_auto_headers=skip, auto_decompress=False, **kw
    )
    return resp, await resp.read()


@pytest.mark.parametrize("coding", [GZIP, BR, ZSTD])
async def test_big_json_is_compressed_with_each_coding(aiohttp_client: Any, coding: str) -> None:
    client = await aiohttp_client(small_app())
    resp, raw = await fetch(client, "/big", coding)
    assert resp.headers["Content-Encoding"] == coding
    assert resp.headers["Vary"] == "Accept-Encoding"
    assert int(resp.headers["Content-Length"]) == len(raw) < len(BIG)
    assert decode(coding, raw) == BIG


async def test_threshold_vary_always(aiohttp_client: Any) -> None:
    client = await aiohttp_client(small_app(min_size=1024))
    resp, raw = await fetch(client, "/small")
    assert "Content-Encoding" not in resp.headers and raw == SMALL
    assert resp.headers["Vary"] == "Accept-Encoding"  # could have been compressed: Vary all the same
    resp, raw = await fetch(client, "/big", None)
    assert "Content-Encoding" not in resp.headers and raw == BIG
    assert resp.headers["Vary"] == "Accept-Encoding"
    resp, _ = await fetch(client, "/vary")
    assert resp.headers["Vary"] == "Accept, Accept-Encoding"
    client2 = await aiohttp_client(small_app(min_size=len(BIG) + 1))
    resp, raw = await fetch(client2, "/big")
    assert "Content-Encoding" not in resp.headers and raw == BIG


async def test_identity_refused_small_bodies_compressed_and_406(aiohttp_client: Any) -> None:
    client = await aiohttp_client(small_app())
    resp, raw = await fetch(client, "/small", "identity;q=0, gzip")
    assert resp.headers["Content-Encoding"] == "gzip" and gzip.decompress(raw) == SMALL
    resp, raw = await fetch(client, "/big", "identity;q=0, deflate")
    assert resp.status == 406
    assert resp.content_type == "application/problem+json"
    assert orjson.loads(raw)["available"] == list(ORDER)


@pytest.mark.parametrize(
    "path", ["/msgpack", "/no-transform", "/partial", "/empty", "/encoded"], ids=lambda p: p[1:]
)
async def test_never_compressed(aiohttp_client: Any, path: str) -> None:
    client = await aiohttp_client(small_app())
    resp, raw = await fetch(client, path, "gzip, br, zstd")
    if path == "/encoded":
        assert resp.headers["Content-Encoding"] == "gzip" and raw == BIG  # left exactly as it was
        return
    assert "Content-Encoding" not in resp.headers
    assert raw == (b"" if path == "/empty" else BIG)
    if path == "/msgpack":
        assert "Vary" not in resp.headers


async def test_head_has_exactly_the_headers_of_get(aiohttp_client: Any) -> None:
    client = await aiohttp_client(small_app())
    get, _ = await fetch(client, "/big")
    head, raw = await fetch(client, "/big", method="HEAD")
    assert head.status == 200 and raw == b""
    assert head.headers["Vary"] == get.headers["Vary"] == "Accept-Encoding"
    assert head.headers["Content-Type"] == get.headers["Content-Type"]
    # what a GET would be sent: a client may size or check a download by HEAD
    assert head.headers["Content-Encoding"] == get.headers["Content-Encoding"] == "gzip"
    assert head.headers["Content-Length"] == get.headers["Content-Length"]


async def test_etag_weakened_when_compressed_and_on_304(aiohttp_client: Any) -> None:
    client = await aiohttp_client(small_app())
    resp, _ = await fetch(client, "/etag")
    assert resp.headers["ETag"] == 'W/"abc"'
    resp, _ = await fetch(client, "/etag", None)
    assert resp.headers["ETag"] == '"abc"'  # identity keeps the strong validator
    resp, raw = await fetch(client, "/not-modified", headers={"If-None-Match": 'W/"abc"'})
    assert resp.status == 304 and raw == b""
    assert resp.headers["ETag"] == 'W/"abc"'  # the validator the client holds
    resp, raw = await fetch(client, "/not-modified", headers={"If-None-Match": '"abc"'})
    assert resp.headers["ETag"] == '"abc"'
    assert resp.headers["Vary"] == "Accept, Accept-Encoding"


async def test_large_bodies_go_to_the_executor_small_ones_inline(aiohttp_client: Any) -> None:
    client = await aiohttp_client(small_app(executor_threshold=len(BIG)))
    executor = CountingExecutor()
    asyncio.get_running_loop().set_default_executor(executor)
    await fetch(client, "/big")
    assert executor.calls == 1
    client2 = await aiohttp_client(small_app(executor_threshold=len(BIG) + 1))
    await fetch(client2, "/big")
    assert executor.calls == 1


async def test_compressed_bodies_of_etagged_responses_are_cached(aiohttp_client: Any) -> None:
    app = small_app()
    client = await aiohttp_client(app)
    _, first = await fetch(client, "/etag")
    assert app[COMPRESSION].cached(BIG, "gzip") == first
    _, second = await fetch(client, "/etag")
    assert second == first
    await fetch(client, "/big")  # no ETag: not cached
    assert len(app[COMPRESSION]._cache) == 1


async def test_event_stream_untouched(aiohttp_client: Any) -> None:
    client = await aiohttp_client(small_app())
    resp, raw = await fetch(client, "/sse", "gzip, br, zstd")
    assert "Content-Encoding" not in resp.headers and "Vary" not in resp.headers
    assert raw.startswith(b"data: xxx") and raw.endswith(b"\n\n")


@pytest.mark.parametrize("coding", [GZIP, BR, ZSTD])
async def test_streamed_body_decodes_to_the_same_bytes(aiohttp_client: Any, coding: str) -> None:
    client = await aiohttp_client(small_app())
    plain, identity = await fetch(client, "/stream", None)
    assert "Content-Encoding" not in plain.headers
    resp, raw = await fetch(client, "/stream", coding)
    assert resp.headers["Content-Encoding"] == coding
    assert resp.headers["Vary"] == "Accept-Encoding"
    assert len(raw) < len(identity)
    assert decode(coding, raw) == identity == b"".join(b"%d," % i * 500 for i in range(50))


async def test_stream_flush_policy_delivers_records_promptly(aiohttp_client: Any) -> None:
    app = small_app(stream_flush_bytes=0)
    client = await aiohttp_client(app)
    resp = await client.get("/slow-stream", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert resp.headers["Content-Encoding"] == "gzip"
    d = zlib.decompressobj(31)
    seen = b""
    async with asyncio.timeout(5):
        while b"\n" not in seen:  # the first record arrives while the handler still waits
            seen += d.decompress(await resp.content.readany())
    assert seen == b'{"first":1}\n'
    app[GATE].set()
    rest = await resp.content.read()
    assert seen + d.decompress(rest) + d.flush() == b'{"first":1}\n{"second":2}\n'


def test_encoded_stream_state_uses_names_of_its_own() -> None:
    """EncodedStream subclasses StreamResponse: its private attributes must not be names aiohttp
    uses (checked on aiohttp 3.14.5; an upgrade that took one fails here, not on the wire)."""
    own = {name for name in vars(EncodedStream) if name.startswith("_") and not name.startswith("__")}
    own.discard("_abc_impl")  # every ABC subclass gets its own (StreamResponse is a MutableMapping)
    theirs = set(dir(web.StreamResponse)) | set(vars(web.StreamResponse()))
    assert own and not own & theirs
