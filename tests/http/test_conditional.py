"""Conditional GETs (ETag / If-None-Match), GET /large-dataset, compression through the real
app, and compressed request bodies."""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

import brotli
import msgpack
import orjson
import pytest
from multidict import CIMultiDict

from server.app import create_app
from server.config import Config
from server.http.compression import COMPRESSION, Compression
from server.http.conditional import etag_of, none_match
from server.large_dataset import LargeDataset, generate
from tests.helpers import replace
from tests.http.test_compression import decode, zstd


@pytest.mark.parametrize(
    ("header", "matches"),
    [
        ('"abc"', True),
        ('W/"abc"', True),  # weak comparison for GET
        ('"x", "abc"', True),
        ('"x" , W/"abc" ,"y"', True),
        ("*", True),
        ('"abcd"', False),
        ('"x", "y"', False),
        ("abc", False),  # not a quoted tag: malformed, no match
        ('"x", garbage, "abc"', False),  # malformed list: the full response is the safe answer
        ("", False),
    ],
)
def test_if_none_match(header: str, matches: bool) -> None:
    assert none_match(header, '"abc"') is matches
    assert none_match(header, 'W/"abc"') is matches


def test_etags_are_strong_stable_and_memoised() -> None:
    assert etag_of(b"x") == etag_of(b"x") != etag_of(b"y")
    assert etag_of(b"x").startswith('"') and not etag_of(b"x").startswith("W/")
    assert etag_of(b"x", "gzip").endswith('-gzip"')
    state = Compression(cache_entries=2)
    body = b"page" * 100
    kept = state.kept(body, "application/json", lambda media, compressible: CIMultiDict())
    assert kept.etag == etag_of(body) and kept.identity["ETag"] == kept.etag and kept.compressible
    assert state.kept(body, "application/json", lambda m, c: CIMultiDict()) is kept  # hashed once
    for i in range(5):
        state.kept(b"%d" % i, "application/json", lambda m, c: CIMultiDict())
    assert len(state._kept) == 2


async def test_large_dataset_regenerated_only_when_its_ttl_ends() -> None:
    now = [100.0]
    ds = LargeDataset(Compression(), ttl=10, clock=lambda: now[0])
    first = await ds.get(("application/json", False, None), orjson.dumps)
    again = await ds.get(("application/json", False, None), orjson.dumps)
    gz = await ds.get(("application/json", False, "gzip"), orjson.dumps)
    assert again is first and ds.generation == 1
    assert gzip.decompress(gz.body) == first.body
    now[0] = 109.9
    assert ds.cached(("application/json", False, "gzip")) is gz
    now[0] = 110.0
    assert ds.cached(("application/json", False, "gzip")) is None
    fresh = await ds.get(("application/json", False, None), orjson.dumps)
    assert ds.generation == 2 and fresh is not first


def test_dataset_shape() -> None:
    doc = generate()
    assert len(doc["records"]) == 1000 == doc["metadata"]["total"]
    assert doc["records"][0] == {"id": 1, "name": "Record 1", "description": "Description of record 1"}
    assert doc["metadata"]["generated_at"].endswith("Z")


async def get_raw(client: Any, path: str, ae: str | None = "gzip", **headers: str) -> Any:
    hdrs = dict(headers)
    skip: tuple[str, ...] = ()
    if ae is None:
        skip = ("Accept-Encoding",)
    else:
        hdrs["Accept-Encoding"] = ae
    resp = await client.get(path, headers=hdrs, skip_auto_headers=skip, auto_decompress=False)
    return resp, await resp.read()


async def test_large_dataset_json_etag_304_and_size(client: Any) -> None:
    resp, identity = await get_raw(client, "/large-dataset", None)
    assert resp.status == 200 and resp.content_type == "application/json"
    doc = orjson.loads(identity)
    assert len(doc["records"]) == 1000 and doc["records"][999]["name"] == "Record 1000"
    assert doc["metadata"]["total"] == 1000
    etag = resp.headers["ETag"]
    assert etag.startswith('"') and resp.headers["Cache-Control"] == "public, max-age=60"
    assert set(v.strip() for v in resp.headers["Vary"].split(",")) == {"Accept", "Accept-Encoding"}

    gz_resp, gz = await get_raw(client, "/large-dataset", "gzip")
    assert gz_resp.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(gz) == identity  # same document, from the cache (same generated_at)
    assert len(gz) <= 0.15 * len(identity)
    gz_tag = gz_resp.headers["ETag"]
    assert gz_tag != etag and not gz_tag.startswith("W/")  # strong, one per coding

    nm, body = await get_raw(client, "/large-dataset", "gzip", **{"If-None-Match": gz_tag})
    assert nm.status == 304 and body == b""
    assert nm.headers["ETag"] == gz_tag and "Content-Encoding" not in nm.headers
    assert nm.headers["Cache-Control"] == "public, max-age=60"
    nm, body = await get_raw(client, "/large-dataset", None, **{"If-None-Match": f'"other", {etag}'})
    assert nm.status == 304 and body == b""
    nm, body = await get_raw(client, "/large-dataset", None, **{"If-None-Match": "*"})
    assert nm.status == 304
    stale, body = await get_raw(client, "/large-dataset", None, **{"If-None-Match": '"old"'})
    assert stale.status == 200 and body == identity


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd"])
async def test_large_dataset_each_coding(client: Any, coding: str) -> None:
    _, identity = await get_raw(client, "/large-dataset", None)
    resp, raw = await get_raw(client, "/large-dataset", coding)
    assert resp.headers["Content-Encoding"] == coding
    assert decode(coding, raw) == identity


async def test_large_dataset_negotiated_and_head(client: Any) -> None:
    resp, raw = await get_raw(client, "/large-dataset", "gzip", Accept="application/vnd.msgpack")
    assert resp.content_type == "application/vnd.msgpack"
    assert "Content-Encoding" not in resp.headers and resp.headers["Vary"] == "Accept"  # not compressible
    assert len(msgpack.unpackb(raw)["records"]) == 1000
    resp, raw = await get_raw(client, "/large-dataset?format=csv", None)
    assert raw.decode().splitlines()[0].startswith("id,name,description")
    get, _ = await get_raw(client, "/large-dataset", "br")
    head = await client.head("/large-dataset", headers={"Accept-Encoding": "br"}, auto_decompress=False)
    assert head.status == 200 and await head.read() == b""
    for name in ("ETag", "Content-Encoding", "Vary", "Cache-Control", "Content-Type", "Content-Length"):
        assert head.headers[name] == get.headers[name]
    refused, _ = await get_raw(client, "/large-dataset", "identity;q=0")
    assert refused.status == 406 and refused.content_type == "application/problem+json"


async def test_users_and_profiles_answer_304(client: Any) -> None:
    created = await client.post("/users", json={"name": "Ann", "email": "ann@example.com"})
    user_id = (await created.json())["id"]
    for path in (f"/users/{user_id}", f"/users/{user_id}/profile"):
        resp, _ = await get_raw(client, path, None)
        etag = resp.headers["ETag"]
        nm, empty = await get_raw(client, path, None, **{"If-None-Match": etag})
        assert nm.status == 304 and empty == b"" and nm.headers["ETag"] == etag
        assert "Accept" in nm.headers["Vary"]
        other, _ = await get_raw(client, path, None, **{"If-None-Match": etag, "Accept": "application/yaml"})
        assert other.status == 200  # another representation, another validator
    await client.patch(f"/users/{user_id}", json={"name": "Ann B"})
    changed, _ = await get_raw(client, f"/users/{user_id}", None, **{"If-None-Match": etag})
    assert changed.status == 200


async def test_products_etag_weakened_when_compressed_and_304(client: Any) -> None:
    plain, identity = await get_raw(client, "/products", None)
    strong = plain.headers["ETag"]
    assert not strong.startswith("W/") and "Content-Encoding" not in plain.headers
    assert len(identity) >= 1024  # big enough to be compressed
    gz, raw = await get_raw(client, "/products", "gzip")
    assert gz.headers["Content-Encoding"] == "gzip" and gzip.decompress(raw) == identity
    assert gz.headers["ETag"] == "W/" + strong
    assert client.server.app[COMPRESSION].cached(identity, "gzip") == raw  # compressed once, kept
    packed, _ = await get_raw(client, "/products", "gzip", Accept="application/vnd.msgpack")
    assert "Content-Encoding" not in packed.headers and packed.headers["Vary"] == "Accept"
    nm, body = await get_raw(client, "/products", "gzip", **{"If-None-Match": gz.headers["ETag"]})
    assert nm.status == 304 and body == b"" and nm.headers["ETag"] == "W/" + strong
    assert set(v.strip() for v in nm.headers["Vary"].split(",")) == {"Accept", "Accept-Encoding"}


async def test_kept_headers_are_not_changed_by_the_responses_built_on_them(client: Any) -> None:
    """send_kept_now() hands its kept header mapping to web.Response without copying it,
    because aiohttp copies it: if aiohttp ever kept the mapping, the request id set on one
    answer would land in the shared mapping and on every later answer."""
    first, body = await get_raw(client, "/products", None)
    second, _ = await get_raw(client, "/products", None)
    assert first.headers["X-Request-ID"] != second.headers["X-Request-ID"]
    kept = client.server.app[COMPRESSION].kept(body, "application/json", lambda m, c: CIMultiDict())
    assert "X-Request-ID" not in kept.identity and "Content-Length" not in kept.identity
    assert kept.identity["ETag"] == first.headers["ETag"]


async def test_health_is_not_touched(client: Any) -> None:
    resp, _ = await get_raw(client, "/health", "gzip")
    assert "Content-Encoding" not in resp.headers and "Vary" not in resp.headers


@pytest.mark.parametrize("path", ["/stream-json/5000", "/stream-csv/5000", "/stream-json/5000?format=ndjson"])
@pytest.mark.parametrize("coding", ["gzip", "br", "zstd"])
async def test_streams_compressed_decode_to_the_same_bytes(client: Any, path: str, coding: str) -> None:
    plain, identity = await get_raw(client, path, None)
    assert "Content-Encoding" not in plain.headers
    resp, raw = await get_raw(client, path, coding)
    assert resp.headers["Content-Encoding"] == coding and "Accept-Encoding" in resp.headers["Vary"]
    assert decode(coding, raw) == identity
    assert len(raw) < len(identity) / 4


# ---------------------------------------------------------------- compressed request bodies

USER = orjson.dumps({"name": "Zed", "email": "zed@example.com"})


@pytest.mark.parametrize(
    ("coding", "encode"),
    [
        ("gzip", gzip.compress),
        ("br", brotli.compress),
        ("zstd", zstd.compress),
    ],
)
async def test_compressed_request_bodies(client: Any, coding: str, encode: Any) -> None:
    resp = await client.post(
        "/users",
        data=encode(USER),
        headers={"Content-Encoding": coding, "Content-Type": "application/json"},
    )
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["email"] == "zed@example.com"


@pytest.fixture
def small_cap(cfg: Config) -> Config:
    return replace(cfg, compression={"request_max_size": 64 * 1024})


async def test_zip_bomb_stops_at_the_cap(aiohttp_client: Any, small_cap: Config) -> None:
    client = await aiohttp_client(create_app(small_cap))
    bomb = gzip.compress(b'{"name": "' + b" " * (50 * 1024 * 1024) + b'"}', 9)  # 50 MiB in ~50 KiB
    assert len(bomb) < 100 * 1024
    resp = await client.post(
        "/users", data=bomb, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )
    assert resp.status == 413
    problem = await resp.json()
    assert problem["max_size"] == 64 * 1024 and resp.content_type == "application/problem+json"
    # under the cap is fine
    ok = await client.post(
        "/users",
        data=gzip.compress(USER),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert ok.status == 201


async def test_unknown_or_stacked_codings_are_415_bad_data_400(client: Any) -> None:
    for coding in ("compress", "gzip, gzip", "lzma"):
        resp = await client.post(
            "/users", data=USER, headers={"Content-Encoding": coding, "Content-Type": "application/json"}
        )
        assert resp.status == 415, coding
        assert resp.content_type == "application/problem+json"
        assert "gzip" in resp.headers["Accept-Encoding"]
    # Bad gzip data: 400, from the body's reader (which decodes request bodies itself), on a
    # raw socket so the answer is read exactly as sent.
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(
        b"POST /users HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Encoding: gzip\r\nContent-Length: 8\r\n\r\nnot gzip"
    )
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ") and b"application/problem+json" in answer
    resp = await client.post(
        "/users", data=USER, headers={"Content-Encoding": "identity", "Content-Type": "application/json"}
    )
    assert resp.status == 201


async def test_compression_disabled_sends_identity_everywhere(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(replace(cfg, compression={"enabled": False})))
    for path in ("/products", "/large-dataset", "/stream-json/3000", "/openapi.json"):
        resp, _ = await get_raw(client, path, "gzip, br, zstd")
        assert resp.status == 200 and "Content-Encoding" not in resp.headers, path
        assert "Accept-Encoding" not in resp.headers.get("Vary", ""), path
    resp, _ = await get_raw(client, "/large-dataset", "identity;q=0")
    assert resp.status == 200  # nothing to refuse: identity is all there is
    ok = await client.post(
        "/users",
        data=gzip.compress(USER),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert ok.status == 201  # compressed request bodies are still accepted


async def test_products_head_has_exactly_the_headers_of_get(client: Any) -> None:
    get, _ = await get_raw(client, "/products", "gzip")
    head = await client.head("/products", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert head.status == 200 and await head.read() == b""
    for name in ("ETag", "Content-Encoding", "Vary", "Content-Type", "Content-Length"):
        assert head.headers[name] == get.headers[name], name


async def test_concurrent_first_requests_render_once() -> None:
    ds = LargeDataset(Compression(), ttl=60)
    calls = []

    def render(doc: dict[str, Any]) -> bytes:
        calls.append(1)
        return orjson.dumps(doc)

    key = ("application/json", False, "gzip")
    results = await asyncio.gather(*(ds.get(key, render) for _ in range(20)))
    assert len(calls) == 1 and all(r is results[0] for r in results)
    assert ds.cached(key) is results[0]
    assert (await ds.get(("application/json", False, None), render)).body == orjson.dumps(ds.document())
    assert len(calls) == 1  # identity was kept by the same call


async def test_a_failing_render_fails_its_waiters_and_the_next_request_retries() -> None:
    ds = LargeDataset(Compression(), ttl=60)
    key = ("application/json", False, None)

    def broken(doc: dict[str, Any]) -> bytes:
        raise ValueError("boom")

    with pytest.raises(ValueError):
        await ds.get(key, broken)
    assert ds.cached(key) is None
    assert (await ds.get(key, orjson.dumps)).body == orjson.dumps(ds.document())
