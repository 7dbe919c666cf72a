"""Every parser of client bytes is bounded: the defects of hotpath issue 21, through the real app.

Each case names the reproduced defect: a 200 KB YAML body held the event loop for seconds, a
gzipped body grew to 8 MiB whatever the route, deep or huge YAML and deep bulk JSON were
500s. No timings are asserted: a body over its bound is refused before any parser sees it,
and a YAML body too big to parse on the loop is parsed in the YAML child process.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import zlib
from typing import Any

import msgpack
import orjson
import pytest
import yaml

from server.app import create_app
from server.config import Config
from server.http import bodies, codings, packing
from server.http.parser_process import ParserProcess
from server.http.reading import PARSER_PROCESS
from tests.helpers import replace, until

YAML = {"Content-Type": "application/yaml"}
TOKEN = "bodies-test-token"


async def problem(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/problem+json"
    doc: dict[str, Any] = await resp.json()
    assert doc["status"] == status
    return doc


def yaml_list(size: int) -> bytes:
    """A valid YAML list of short strings, `size` bytes or a little more."""
    return b"".join(b"- item %d\n" % i for i in range(size // 8))


@pytest.fixture
def no_inline_yaml(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Records every YAML body parsed in this process (on the event loop)."""
    seen: list[bytes] = []
    parse = bodies.parse_yaml

    def spy(body: bytes, *args: Any) -> Any:
        seen.append(body)
        return parse(body, *args)

    monkeypatch.setattr(bodies, "parse_yaml", spy)
    return seen


# ---------------------------------------------------------------- YAML size, and the loop


async def test_yaml_over_its_cap_is_413_before_parsing_while_health_answers(
    client: Any, no_inline_yaml: list[bytes]
) -> None:
    """Defect: 200 KB of YAML was parsed on the loop (3.1 s in which /health did not answer)."""
    body = yaml_list(200 * 1024)
    post = asyncio.ensure_future(client.post("/users", data=body, headers=YAML))
    health = await client.get("/health")
    assert health.status == 200
    doc = await problem(await post, 413)
    assert doc["max_size"] == 64 * 1024 and "server.yaml_max_size" in doc["detail"]
    # refused while reading: no parser ran, here or in the child
    assert no_inline_yaml == [] and client.app[PARSER_PROCESS].started == 0


async def test_yaml_within_its_cap_is_parsed_in_the_child(client: Any, no_inline_yaml: list[bytes]) -> None:
    """60 KiB of YAML is parsed, by the parser process: the loop only moves the bytes."""
    padding = b"".join(b"# comment line %d\n" % i for i in range(3000))
    body = b"name: Ada\n" + padding + b"email: ada@example.com\n"
    assert bodies.YAML_INLINE_MAX < len(body) <= 64 * 1024
    post = asyncio.ensure_future(client.post("/users", data=body, headers=YAML))
    assert (await client.get("/health")).status == 200
    resp = await post
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["email"] == "ada@example.com"
    parser = client.app[PARSER_PROCESS]
    assert no_inline_yaml == [] and parser.started == 1 and parser.parsed == 1
    # a small body is parsed where it is read
    small = await client.patch("/users/1", data=b"name: Ada L.", headers=YAML)
    assert small.status == 200 and len(no_inline_yaml) == 1 and parser.parsed == 1


async def test_yaml_gzip_bomb_is_413_at_the_yaml_cap(client: Any) -> None:
    """Defect: 8 MB of YAML arrived in 7.8 KB of gzip (every route decoded up to 8 MiB)."""
    bomb = gzip.compress(b"- " + b"a" * (8 * 1024 * 1024) + b"\n", 9)
    assert len(bomb) < 16 * 1024
    resp = await client.post("/users", data=bomb, headers={**YAML, "Content-Encoding": "gzip"})
    doc = await problem(resp, 413)
    assert doc["max_size"] == 64 * 1024
    assert client.app[PARSER_PROCESS].started == 0


async def test_decoded_bodies_stop_at_the_routes_own_limit(aiohttp_client: Any, cfg: Config) -> None:
    """The decoded cap is the route's limit: /users client_max_size, /bulk-process its own."""
    client = await aiohttp_client(create_app(replace(cfg, jobs={"concurrency": 0})))
    rows = [{"name": f"User {i:05d} " + "x" * 120, "email": f"u{i}@example.com"} for i in range(10000)]
    big = orjson.dumps(rows)
    assert 1024 * 1024 < len(big) < 2 * 1024 * 1024
    gz = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    doc = await problem(await client.post("/users", data=gzip.compress(big), headers=gz), 413)
    assert doc["max_size"] == 1024 * 1024
    resp = await client.post("/bulk-process", data=gzip.compress(big), headers=gz)
    assert resp.status == 202, await resp.text()
    over = orjson.dumps(rows + rows)
    doc = await problem(await client.post("/bulk-process", data=gzip.compress(over), headers=gz), 413)
    assert doc["max_size"] == 2 * 1024 * 1024 and "jobs.bulk_max_size" in doc["detail"]
    # the same limit as sent, before a byte is read
    # (a BytesIO: aiohttp's client warns about sending this many raw bytes from the loop)
    plain = {"Content-Type": "application/json"}
    doc = await problem(await client.post("/bulk-process", data=io.BytesIO(over), headers=plain), 413)
    assert "jobs.bulk_max_size" in doc["detail"]


# ---------------------------------------------------------------- YAML depth and numbers


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 5000 + b"]" * 5000,  # flow
        b"- " * 5000 + b"a\n",  # compact block sequences
        b"".join(b" " * i + b"k:\n" for i in range(300)) + b" " * 300 + b"v\n",  # block mappings
        b"a: " + b"[x, " * 5000 + b"]" * 5000,  # flow, with items between the brackets
    ],
    ids=["flow", "compact", "block", "flow-items"],
)
async def test_deep_yaml_is_4xx_not_500(aiohttp_client: Any, cfg: Config, body: bytes) -> None:
    """Defect: 5,000-deep YAML raised RecursionError (500, a 190 KB traceback logged)."""
    big = replace(cfg, server={"yaml_max_size": 1024 * 1024})  # the depth is refused, not the size
    client = await aiohttp_client(create_app(big))
    resp = await client.post("/users", data=body, headers=YAML)
    doc = await problem(resp, 400)
    assert "nested more than 64" in doc["detail"]


async def test_yaml_5000_digit_integer_is_400(client: Any) -> None:
    """Defect: a 5,000-digit integer raised ValueError in int() (500)."""
    for body in (b"name: " + b"9" * 5000, b"name: 0x" + b"f" * 5000, b"name: 1" + b":00" * 2000):
        doc = await problem(await client.post("/users", data=body, headers=YAML), 400)
        assert "64-bit range" in doc["detail"]
    # where the byte check cannot see it (no space after ':'), the node check does
    doc = await problem(await client.post("/users", data=b'{"name":' + b"9" * 23 + b"}", headers=YAML), 400)
    assert "64-bit range" in doc["detail"]


async def test_yaml_aliases_and_tags_are_400(client: Any) -> None:
    laughs = b'a: &a ["x","x"]\nb: &b [*a,*a]\nc: &c [*b,*b]\nd: [*c,*c]\n'
    for body in (laughs, b"a: !!python/name:os.system x", b'{"a":&x [1],"b":*x}', b"%TAG ! x:\n--- a"):
        resp = await client.post("/users", data=body, headers=YAML)
        await problem(resp, 400)


async def test_yaml_that_looks_odd_but_is_plain_text_passes(client: Any) -> None:
    body = b'name: "Tom & Jerry *bold* [1] #2 12345678901234567890123"\nemail: tj@example.com\n'
    resp = await client.post("/users", data=body, headers=YAML)
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["name"].startswith("Tom & Jerry")


async def test_yaml_child_past_its_timeout_is_killed_and_replaced(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(replace(cfg, server={"parser_timeout": 0.01})))
    slow = b"[" + b"1," * 30000 + b"1]"  # ~60 KiB of integers: ~0.1 s to resolve and build
    doc = await problem(await client.post("/users", data=slow, headers=YAML), 413)
    assert "server.parser_timeout" in doc["detail"]
    parser = client.app[PARSER_PROCESS]
    parser.timeout = 30.0  # the next body gets a new child
    resp = await client.post(
        "/users", data=b"name: Ada\nemail: ada@example.com\n" + b"#" * 2000, headers=YAML
    )
    assert resp.status == 201, await resp.text()
    assert parser.started == 2


# ---------------------------------------------------------------- bulk, JSON, msgpack, forms


async def test_bulk_json_300_deep_is_400(aiohttp_client: Any, cfg: Config) -> None:
    """Defect: a bulk body deeper than orjson writes (254) failed at enqueue (500)."""
    client = await aiohttp_client(create_app(replace(cfg, jobs={"concurrency": 0})))
    deep = b"[" * 300 + b"]" * 300
    record = b'[{"name": "A", "email": "a@example.com", "x": ' + deep + b"}]"
    for body in (deep, record, b'{"records": ' + record + b"}"):
        resp = await client.post("/bulk-process", data=body, headers={"Content-Type": "application/json"})
        doc = await problem(resp, 400)
        assert "nested more than 64" in doc["detail"]
    huge = b'[{"name": "A", "email": "a@example.com", "n": ' + b"9" * 5000 + b"}]"
    await problem(
        await client.post("/bulk-process", data=huge, headers={"Content-Type": "application/json"}), 400
    )


async def test_bulk_csv_bounds(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(replace(cfg, jobs={"concurrency": 0, "bulk_max_rows": 10})))
    csv_type = {"Content-Type": "text/csv"}
    wide = b"name,email\n" + b"," * 100_000 + b"\n"
    doc = await problem(await client.post("/bulk-process", data=wide, headers=csv_type), 400)
    assert "columns" in doc["detail"]
    blank = b"name,email\n" + b"\n" * 100_000 + b"a,a@example.com\n"
    await problem(await client.post("/bulk-process", data=blank, headers=csv_type), 413)
    ok = b"name,email,extra\n\nA,a@example.com\nB,b@example.com,1,2\n"
    assert (await client.post("/bulk-process", data=ok, headers=csv_type)).status == 202


@pytest.mark.parametrize(
    ("ctype", "body"),
    [
        ("application/json", b"[" + b"{}," * 5000 + b"{}]"),
        ("application/vnd.msgpack", msgpack.packb([{}] * 5000)),
        ("application/yaml", b"[" + b"{}," * 5000 + b"{}]"),
        ("application/yaml", b"- []\n" * 5000),
    ],
    ids=["json", "msgpack", "yaml-flow", "yaml-block"],
)
async def test_more_containers_than_the_bound_is_413(client: Any, ctype: str, body: bytes) -> None:
    doc = await problem(await client.post("/users", data=body, headers={"Content-Type": ctype}), 413)
    assert "more than 4096 arrays/objects" in doc["detail"]


async def test_huge_numbers_in_json_are_400(client: Any) -> None:
    body = b'{"name": "A", "email": "a@example.com", "n": ' + b"9" * 5000 + b"}"
    await problem(await client.post("/users", data=body, headers={"Content-Type": "application/json"}), 400)


async def test_forms_are_bounded_in_fields(client: Any) -> None:
    form = "&".join(f"f{i}=x" for i in range(17))
    resp = await client.post(
        "/send-notification", data=form, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    await problem(resp, 413)
    resp = await client.post("/send-notification", data={"recipient": "a@example.com", "subject": "s"})
    assert resp.status == 202, await resp.text()


async def test_empty_or_absent_bodies_beside_query_parameters(client: Any) -> None:
    url = "/send-notification?recipient=a@example.com"
    assert (await client.post(url)).status == 202
    assert (await client.post(url, data=b"  ", headers={"Content-Type": "application/json"})).status == 202
    assert (await client.post(url, data=b"x", headers={"Content-Type": "text/plain"})).status == 415


async def test_compressed_bodies_reach_the_task_routes(client: Any) -> None:
    """A gzipped JSON body to /send-notification is read once and decoded (it was read twice)."""
    body = gzip.compress(orjson.dumps({"recipient": "a@example.com", "subject": "zipped"}))
    resp = await client.post(
        "/send-notification",
        data=body,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert resp.status == 202, await resp.text()


async def test_ids_of_thousands_of_digits_are_404(client: Any) -> None:
    for path in ("/users/" + "9" * 5000, "/users/" + "1" * 5000 + "/profile"):
        await problem(await client.get(path), 404)
    await problem(await client.patch("/users/" + "7" * 5000, json={"name": "x"}), 404)


async def test_yaml_values_keep_their_types_across_the_child(client: Any) -> None:
    """Dates and zoned timestamps come back from the child as they were parsed."""
    doc = b"a: 2001-12-14\nb: 2001-12-14t21:59:43.10-05:00\nc: [1, 2.5, true, null, x]\n"
    assert packing.unpack(packing.pack(yaml.safe_load(doc))) == yaml.safe_load(doc)
    padded = doc + b"#" * 2000
    assert await client.app[PARSER_PROCESS].yaml(padded, bodies.Limits()) == yaml.safe_load(doc)


# ---------------------------------------------------------------- decoding request bodies


def _zstd() -> Any:
    from server.http.codings import zstd

    return zstd


@pytest.mark.parametrize("coding", codings.REQUEST_CODINGS)
def test_body_decoder_round_trips_and_stops_at_its_budget(coding: str) -> None:
    data = b'{"name": "' + b"a" * 300_000 + b'"}'
    encode = {
        "gzip": gzip.compress,
        "x-gzip": gzip.compress,
        "deflate": zlib.compress,
        "br": lambda d: codings.brotli.compress(d),
        "zstd": lambda d: _zstd().compress(d),
    }[coding]
    packed = encode(data)
    decoder = codings.BodyDecoder(coding)
    out = b"".join(decoder.decode(packed[i : i + 1000], 10**9) for i in range(0, len(packed), 1000))
    decoder.finish()
    assert out == data
    # a budget: never more than one byte past it, however much the input holds
    bounded = codings.BodyDecoder(coding).decode(packed, 4096)
    assert len(bounded) == 4097


def test_body_decoder_refuses_bad_truncated_and_trailing_data() -> None:
    packed = gzip.compress(b"hello")
    for coding, data in (("gzip", b"not gzip"), ("deflate", b"\x78\x9c garbage"), ("zstd", b"nope" * 4)):
        if coding in codings.REQUEST_CODINGS:
            with pytest.raises(ValueError):
                codings.BodyDecoder(coding).decode(data, 100)
    truncated = codings.BodyDecoder("gzip")
    truncated.decode(packed[:-4], 100)
    with pytest.raises(ValueError, match="truncated"):
        truncated.finish()
    # gzip members concatenate (RFC 1952); after a deflate stream nothing may follow
    two = codings.BodyDecoder("gzip")
    assert two.decode(packed + gzip.compress(b" world"), 100) == b"hello world"
    with pytest.raises(ValueError, match="after the end"):
        codings.BodyDecoder("deflate").decode(zlib.compress(b"x") + b"more", 100)
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    assert codings.BodyDecoder("deflate").decode(raw.compress(b"raw") + raw.flush(), 100) == b"raw"


async def test_a_refused_bomb_is_inflated_only_to_the_cap(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiohttp used to inflate the unread rest of a refused body while lingering: a 261 KB
    gzip body of 256 MB held the loop 0.47 s after its 413. Now nothing past the cap is ever
    inflated, and the connection stays usable."""
    produced: list[int] = []
    decode = codings.BodyDecoder.decode

    def counting(self: Any, data: bytes, budget: int) -> bytes:
        out = decode(self, data, budget)
        produced.append(len(out))
        return out

    monkeypatch.setattr(codings.BodyDecoder, "decode", counting)
    squeezer = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = squeezer.compress(b"[" + b"0" * (256 * 1024 * 1024)) + squeezer.flush()
    assert len(bomb) < 300 * 1024
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    await problem(await client.post("/users", data=bomb, headers=headers), 413)
    assert sum(produced) <= 1024 * 1024 + 1
    ok = await client.post(
        "/users", data=gzip.compress(b'{"name": "A", "email": "a@example.com"}'), headers=headers
    )
    assert ok.status == 201


async def test_compressed_multipart_is_415(client: Any) -> None:
    body = gzip.compress(
        b'--B\r\nContent-Disposition: form-data; name="recipient"\r\n\r\na@example.com\r\n--B--\r\n'
    )
    headers = {"Content-Type": "multipart/form-data; boundary=B", "Content-Encoding": "gzip"}
    await problem(await client.post("/send-notification", data=body, headers=headers), 415)


async def test_forms_in_other_charsets_are_415(client: Any) -> None:
    headers = {"Content-Type": "application/x-www-form-urlencoded; charset=latin-1"}
    await problem(
        await client.post("/send-notification", data=b"recipient=a%40example.com", headers=headers), 415
    )


async def test_a_parse_cancelled_midway_does_not_confuse_the_next() -> None:
    """The child's answer to a cancelled request must not be read as the next one's: the child
    is killed, and the next body gets a new one."""
    parser = ParserProcess(timeout=30.0)
    try:
        padded = b"a: 1\n" + b"#" * 2000
        assert await parser.yaml(padded, bodies.Limits()) == {"a": 1}  # the child is up
        slow = asyncio.ensure_future(parser.yaml(b"[" + b"1," * 30000 + b"1]", bodies.Limits()))
        # the exchange has begun (the body goes out under the lock); the child takes ~0.1 s over it
        await until(parser._lock.locked, "the slow body's exchange with the child")
        assert not slow.done()
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        assert await parser.yaml(padded, bodies.Limits()) == {"a": 1}
        assert parser.started == 2 and parser.parsed == 2
    finally:
        await parser.close()


async def test_a_form_part_in_another_charset_is_415(client: Any) -> None:
    """Defect: a part's own charset was used as given: punycode decodes in quadratic time."""
    for part_type, outer in (("text/plain; charset=punycode", ""), ("text/plain", "; charset=punycode")):
        body = (
            b'--zz\r\nContent-Disposition: form-data; name="subject"\r\nContent-Type: '
            + part_type.encode()
            + b"\r\n\r\n-"
            + b"9" * 30_000
            + b"\r\n--zz--\r\n"
        )
        headers = {"Content-Type": "multipart/form-data; boundary=zz" + outer}
        await problem(await client.post("/send-notification", data=body, headers=headers), 415)


@pytest.mark.parametrize(
    ("ctype", "body"),
    [
        ("application/yaml", b"name: 2001-02-30\nemail: a@example.com"),
        ("application/yaml", b"name: 2001-02-03t25:00:00\nemail: a@example.com"),
        ("application/yaml", b"name: 2001-02-03 10:00:00 +99:00\nemail: a@example.com"),
        # the same beyond the inline size: parsed in the child, which must survive it
        ("application/yaml", b"name: 2001-02-30\nemail: a@example.com\n" + b"# pad\n" * 400),
        (
            "application/vnd.msgpack",
            b"\x81\xa4name\xc7\x0c\xff" + (0).to_bytes(4, "big") + (-(2**63)).to_bytes(8, "big", signed=True),
        ),
    ],
    ids=["feb-30", "hour-25", "offset-99", "feb-30-in-the-child", "msgpack-timestamp"],
)
async def test_values_the_constructors_cannot_build_are_400(client: Any, ctype: str, body: bytes) -> None:
    """Defect: a YAML timestamp like 2001-02-30 (ValueError) or a msgpack Timestamp beyond
    datetime (OverflowError) was a 500; past the inline size it killed the parser process."""
    for _ in range(2):
        await problem(await client.post("/users", data=body, headers={"Content-Type": ctype}), 400)
    assert client.app[PARSER_PROCESS].started <= 1
