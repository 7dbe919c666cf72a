"""Property-based fuzzing of every body parser and negotiation header, through the real app.

Whatever the bytes, structure or header value, the answer is 2xx, 3xx or 4xx (never 5xx), and
each example finishes within hypothesis' deadline (parsing is bounded: a hostile body cannot
take seconds). Requests go over a raw socket: aiohttp's client refuses some header values,
and hides the answer to a body whose coding the server could not decode.

POST /process-urls fetches what it is given: its bodies hold no ':' (so no URL scheme) and no
backslash (so no escaped one either); nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gzip
import io
import json
import zlib
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import msgpack
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.app import create_app
from server.config import Config
from tests.helpers import replace

TOKEN = "fuzz-admin-token"
# Small enough that the module runs in well under 30 s; every example within the deadline.
FUZZ = settings(
    max_examples=100,
    deadline=timedelta(milliseconds=500),
    database=None,  # no .hypothesis/ directory in the checkout
    # one app per test function, shared by its examples (each example is a fresh request)
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

BODY_ROUTES = [
    ("POST", "/users"),
    ("PATCH", "/users/1"),
    ("POST", "/send-notification"),
    ("POST", "/generate-report"),
    ("POST", "/bulk-process"),
    ("POST", "/events"),
    ("POST", "/process-urls"),
]
BODY_TYPES = [
    "application/json",
    "application/merge-patch+json",
    "application/vnd.msgpack",
    "application/x-msgpack",
    "application/yaml",
    "application/x-yaml",
    "text/yaml",
    "text/csv",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=b0undary",
    "text/plain",
    None,  # no Content-Type: JSON
]
GET_PATHS = [
    "/users/1",
    "/users/1/profile",
    "/users?limit=2",
    "/products?limit=3",
    "/large-dataset",
    "/stream-json/3",
    "/stream-csv/3",
    "/tasks",
    "/openapi.json",
    "/health",
]


@pytest.fixture
async def fuzz_client(aiohttp_client: Any, cfg: Config) -> Any:
    config = replace(cfg, feed={"admin_token": TOKEN, "ticker": False}, jobs={"concurrency": 0})
    client = await aiohttp_client(create_app(config))
    resp = await client.post("/users", json={"name": "Fuzz", "email": "fuzz@example.com"})
    assert resp.status == 201  # GET /users/1 and PATCH /users/1 find someone
    return client


async def call(
    client: Any, method: str, path: str, headers: list[tuple[str, bytes]], body: bytes = b""
) -> int:
    """One request on a connection of its own; its status, asserted below 500."""
    if path == "/process-urls" and not any(name == "Content-Encoding" for name, _ in headers):
        assert b":" not in body and b"\\" not in body  # nothing that could name a URL
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: fuzz", b"Connection: close"]
        lines.append(b"Content-Length: %d" % len(body))
        if path == "/events":
            lines.append(b"Authorization: Bearer " + TOKEN.encode())
        lines += [name.encode() + b": " + value for name, value in headers]
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert answer.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), answer[:200]
    status = int(answer.split(b" ", 2)[1])
    assert status < 500, answer[:3000].decode("latin-1")
    return status


def ctype_header(ctype: str | None) -> list[tuple[str, bytes]]:
    return [] if ctype is None else [("Content-Type", ctype.encode())]


def safe_for(path: str, body: bytes) -> bytes:
    """The body, or nothing where it could name a URL to fetch."""
    return body.replace(b":", b"").replace(b"\\", b"") if path == "/process-urls" else body


# ---------------------------------------------------------------- values and their encodings

_INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_SCALARS = (
    st.none()
    | st.booleans()
    | _INT64
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(["", "a@example.com", "2026-01-02", "signups", "user-activity", "users", "0", "-1"])
)
VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=10), inner, max_size=6),
    max_leaves=40,
)
# Objects shaped like what the routes read, so validation is reached, not only parsing.
FIELDS = st.fixed_dictionaries(
    {},
    optional={
        name: VALUES
        for name in (
            "name",
            "email",
            "recipient",
            "subject",
            "content",
            "report_type",
            "user_id",
            "start",
            "end",
            "channel",
            "event",
            "data",
            "urls",
            "timeout",
            "records",
        )
    },
)


def nested(depth: int, kind: str) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


# deep, wide and long: past every bound, and just within
SHAPES = st.one_of(
    st.builds(nested, st.integers(0, 1500), st.sampled_from(["list", "dict"])),
    st.integers(0, 6000).map(lambda n: [{}] * n),
    st.integers(0, 6000).map(lambda n: {f"k{i}": i for i in range(n)}),
    st.integers(1, 200_000).map(lambda n: {"name": "x" * n, "email": "a@example.com"}),
)


def _deep(value: Any, fmt: str) -> bytes:
    """A nested() value too deep for the encoders' recursion, written out by hand."""
    opening: list[bytes] = []
    closing: list[bytes] = []
    while (isinstance(value, list) and len(value) == 1) or (isinstance(value, dict) and list(value) == ["k"]):
        packed = fmt == "msgpack"
        if isinstance(value, list):
            opening.append(b"\x91" if packed else b"[")
            closing.append(b"" if packed else b"]")
            value = value[0]
        else:
            opening.append(b"\x81\xa1k" if packed else b'{"k": ')
            closing.append(b"" if packed else b"}")
            value = value["k"]
    if value == []:
        inner = b"\x90" if fmt == "msgpack" else b"[]"
    else:  # anything else nested() does not make: a byte no format starts with
        inner = b"\xc1" if fmt == "msgpack" else b"{}"
    return b"".join(opening) + inner + b"".join(reversed(closing))


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list | dict):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def encode(fmt: str, value: Any) -> tuple[str, bytes]:
    """(Content-Type, body) for `value` in `fmt`; the encoders are the lenient ones (NaN,
    integers of any size), so what reaches the server is whatever a client could send.
    Values too deep for the encoders' recursion are written by hand: a RecursionError caught
    in C code unsettles CPython 3.11 (later compiles fail with "AST constructor recursion
    depth mismatch")."""
    if _depth(value) > 100:
        types = {"msgpack": "application/vnd.msgpack", "yaml": "application/yaml"}
        return types.get(fmt, "application/json"), _deep(value, fmt)
    return _encode(fmt, value)


def _encode(fmt: str, value: Any) -> tuple[str, bytes]:
    if fmt == "json":
        return "application/json", json.dumps(value).encode()
    if fmt == "msgpack":
        try:
            return "application/vnd.msgpack", msgpack.packb(value)
        except (OverflowError, ValueError, TypeError):  # beyond 64 bits, or its own depth limit
            return "application/vnd.msgpack", _deep(value, fmt)
    if fmt == "yaml":
        return "application/yaml", yaml.safe_dump(value, allow_unicode=True).encode()
    items = (
        value.items() if isinstance(value, dict) else enumerate(value if isinstance(value, list) else [value])
    )
    if fmt == "form":
        return "application/x-www-form-urlencoded", urlencode([(str(k), str(v)) for k, v in items]).encode()
    buf = io.StringIO()
    rows = value if isinstance(value, list) else [value]
    writer = csv.writer(buf)
    writer.writerow(["name", "email"])
    for row in rows:
        writer.writerow([str(v) for v in row.values()] if isinstance(row, dict) else [str(row)])
    return "text/csv", buf.getvalue().encode()


FORMATS = st.sampled_from(["json", "msgpack", "yaml", "form", "csv"])


# ---------------------------------------------------------------- bodies


@FUZZ
@given(route=st.sampled_from(BODY_ROUTES), ctype=st.sampled_from(BODY_TYPES), body=st.binary(max_size=3000))
async def test_arbitrary_bytes_in_every_body_type(
    fuzz_client: Any, route: tuple[str, str], ctype: str | None, body: bytes
) -> None:
    method, path = route
    await call(fuzz_client, method, path, ctype_header(ctype), safe_for(path, body))


@FUZZ
@given(route=st.sampled_from(BODY_ROUTES), fmt=FORMATS, value=VALUES | FIELDS | st.lists(FIELDS, max_size=4))
async def test_arbitrary_structures_in_every_format(
    fuzz_client: Any, route: tuple[str, str], fmt: str, value: Any
) -> None:
    await send_value(fuzz_client, route, fmt, value)


@FUZZ
@given(route=st.sampled_from(BODY_ROUTES), fmt=FORMATS, value=SHAPES)
async def test_deep_wide_and_long_structures(
    fuzz_client: Any, route: tuple[str, str], fmt: str, value: Any
) -> None:
    await send_value(fuzz_client, route, fmt, value)


async def send_value(client: Any, route: tuple[str, str], fmt: str, value: Any) -> None:
    """`value` encoded in `fmt` as the body of `route`, checked like every case."""
    method, path = route
    ctype, body = encode(fmt, value)
    await call(client, method, path, ctype_header(ctype), safe_for(path, body))


# YAML's own syntax, shuffled: indicators, anchors, tags, quotes, block scalars, numbers
_YAML_TOKENS = st.sampled_from(
    [
        "[",
        "]",
        "{",
        "}",
        ",",
        "- ",
        ": ",
        "? ",
        "\n",
        "  ",
        "\t",
        "&a ",
        "*a",
        "!!str ",
        "!!python/none ",
        "!x ",
        "#c",
        "'",
        '"',
        "\\",
        "|",
        ">",
        "---\n",
        "...\n",
        "%YAML 1.1\n",
        "%TAG ! x:\n",
        "<<: ",
        "1",
        "99999999999999999999999",
        "0x1F",
        "1:20:30",
        "1_000",
        ".inf",
        "~",
        "null",
        "yes",
        "a",
        "2001-12-14",
        "2001-12-14t21:59:43.10-05:00",
        "\u2028",
        "\x85",
        "\xff",
        "\x00",
    ]
)
YAML_TEXT = st.lists(_YAML_TOKENS, max_size=60).map("".join)


@FUZZ
@given(text=YAML_TEXT, repeat=st.sampled_from([1, 1, 40, 400]))
async def test_yaml_token_soup(fuzz_client: Any, text: str, repeat: int) -> None:
    """Repeated, the soup passes YAML_INLINE_MAX and goes to the child process."""
    body = (text * repeat).encode("utf-8", "surrogatepass")[: 80 * 1024]
    await call(fuzz_client, "POST", "/users", [("Content-Type", b"application/yaml")], body)


@FUZZ
@given(
    lines=st.lists(
        st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=12), max_size=40).map(",".join),
        max_size=30,
    ),
    quote=st.booleans(),
)
async def test_csv_bulk(fuzz_client: Any, lines: list[str], quote: bool) -> None:
    text = "\r\n".join(lines)
    if quote:
        text = '"' + text
    await call(fuzz_client, "POST", "/bulk-process", [("Content-Type", b"text/csv")], text.encode())


_PART_HEADERS = st.lists(
    st.sampled_from(
        [
            b'Content-Disposition: form-data; name="recipient"',
            b'Content-Disposition: form-data; name="subject"; filename="a.txt"',
            b"Content-Disposition: form-data",
            b"Content-Type: text/plain; charset=nope",
            b"Content-Type: application/octet-stream",
            b"Content-Transfer-Encoding: base64",
            b"Content-Type: multipart/mixed; boundary=inner",
            b"X: \xff",
        ]
    ),
    max_size=3,
)


@FUZZ
@given(
    parts=st.lists(st.tuples(_PART_HEADERS, st.binary(max_size=60)), max_size=20),
    closed=st.booleans(),
    query=st.text(max_size=200),
    path=st.sampled_from(["/send-notification", "/generate-report"]),
)
async def test_forms(
    fuzz_client: Any, parts: list[tuple[list[bytes], bytes]], closed: bool, query: str, path: str
) -> None:
    body = b"".join(b"--b0undary\r\n" + b"\r\n".join(h) + b"\r\n\r\n" + data + b"\r\n" for h, data in parts)
    body += b"--b0undary--\r\n" if closed else b""
    multipart = [("Content-Type", b"multipart/form-data; boundary=b0undary")]
    await call(fuzz_client, "POST", path, multipart, body)
    urlencoded = [("Content-Type", b"application/x-www-form-urlencoded")]
    await call(fuzz_client, "POST", path, urlencoded, query.encode())


@FUZZ
@given(
    query=st.lists(st.tuples(st.text(max_size=12), st.text(max_size=40)), max_size=12),
    path=st.sampled_from(["/send-notification", "/generate-report"]),
)
async def test_query_values(fuzz_client: Any, query: list[tuple[str, str]], path: str) -> None:
    await call(fuzz_client, "POST", f"{path}?{urlencode(query)}", [])
    await call(fuzz_client, "GET", f"/users?{urlencode(query)}", [])


# ---------------------------------------------------------------- negotiation headers

_RAW_VALUE = st.binary(max_size=120).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"")
)
_Q = st.sampled_from(
    ["", ";q=0", ";q=1", ";q=0.5", ";q=1.000", ";q=2", ";q=-1", ";q=nan", ";q=", ";q=0.0001", ";x=y"]
)


def _listing(items: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    return st.lists(st.tuples(items, _Q), max_size=8).map(lambda xs: ", ".join(i + q for i, q in xs).encode())


HEADER_VALUES: dict[str, st.SearchStrategy[bytes]] = {
    "Accept": _listing(
        st.sampled_from(
            [
                "*/*",
                "application/*",
                "application/json",
                "text/html",
                "application/yaml",
                "text/csv",
                "text/*",
                "application/problem+json",
                "application/vnd.msgpack",
                "image/png",
                "x/y",
                "",
                "*",
                "a/b/c",
                "text/plain",
            ]
        )
    ),
    "Accept-Encoding": _listing(
        st.sampled_from(["gzip", "br", "zstd", "deflate", "identity", "*", "x-gzip", "compress", "", "GZIP"])
    ),
    "If-None-Match": st.lists(
        st.sampled_from(['"abc"', 'W/"abc"', "*", '"', "W/", 'W/"', '""', "abc", '"a,b"'])
        | st.text(alphabet="0123456789abcdef", max_size=40).map(lambda s: f'"{s}"'),
        max_size=6,
    ).map(lambda xs: ", ".join(xs).encode()),
    "Cache-Control": st.lists(
        st.sampled_from(
            ["no-cache", "no-store", "no-transform", "max-age=0", "max-age=x", "max-stale", "", "=", 'a="']
        )
    ).map(lambda xs: ", ".join(xs).encode()),
}


@FUZZ
@given(
    name=st.sampled_from(sorted(HEADER_VALUES)),
    data=st.data(),
    path=st.sampled_from(GET_PATHS),
    raw=st.booleans(),
)
async def test_negotiation_headers_on_reads(
    fuzz_client: Any, name: str, data: Any, path: str, raw: bool
) -> None:
    value = data.draw(_RAW_VALUE if raw else HEADER_VALUES[name])
    await call(fuzz_client, "GET", path, [(name, value)])


_CTYPES = st.sampled_from([t for t in BODY_TYPES if t] + ["application/json; charset=latin-9", "*/*", "json"])
_CONTENT_TYPE = st.tuples(
    _CTYPES, st.sampled_from(["", "; charset=utf-8", "; charset=nope", "; boundary=", '; a="b', ";;;"])
).map(lambda t: (t[0] + t[1]).encode())


def _compress(coding: str, body: bytes) -> bytes:
    if coding in ("gzip", "x-gzip"):
        return gzip.compress(body)
    if coding == "deflate":
        return zlib.compress(body)
    return body


@FUZZ
@given(
    route=st.sampled_from(BODY_ROUTES),
    ctype=_CONTENT_TYPE | _RAW_VALUE,
    coding=st.sampled_from(
        ["gzip", "x-gzip", "deflate", "br", "zstd", "identity", "gzip, gzip", "", "lzma", "GZIP"]
    )
    | _RAW_VALUE.map(lambda b: b.decode("latin-1")),
    value=FIELDS,
    garble=st.booleans(),
)
async def test_content_type_and_encoding_on_writes(
    fuzz_client: Any, route: tuple[str, str], ctype: bytes, coding: str, value: Any, garble: bool
) -> None:
    """Declared types and codings that do and do not match the bytes that follow."""
    method, path = route
    body = safe_for(path, json.dumps(value).encode())
    coded = body[: len(body) // 2] if garble else _compress(coding.lower(), body)
    headers = [("Content-Type", ctype), ("Content-Encoding", coding.encode("latin-1"))]
    await call(fuzz_client, method, path, headers, coded)
