"""Every representation decoded back to the same data; XML and CSV against hostile input."""

from __future__ import annotations

import csv
import datetime as dt
import enum
import functools
import io
import uuid
import xml.etree.ElementTree as ET
from decimal import Decimal
from typing import Any

import msgpack
import orjson
import pytest
import yaml

from server.http import render
from server.http.render import BodyError, RenderOptions, Shape, parse_body

WHEN = dt.datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC)
DAY = dt.date(2024, 1, 2)
UID = uuid.UUID("12345678-1234-5678-1234-567812345678")


class Color(enum.Enum):
    RED = "red"


OBJECT: dict[str, Any] = {
    "id": 7,
    "name": 'Zoë, "the" <b>first</b>\nline two',
    "price": Decimal("12.50"),
    "ok": True,
    "none": None,
    "when": WHEN,
    "day": DAY,
    "uid": UID,
    "color": Color.RED,
    "tags": ["a", "b"],
    "nested": {"x": 1, "y": [1, 2]},
    "ratio": 0.25,
}
COLLECTION = {"items": [OBJECT, {"id": 8, "name": "B", "extra": "only here"}], "total": 2, "next": None}
OBJ, COLL = Shape("item"), Shape("items", rows="items")


def test_json_round_trip_and_pretty() -> None:
    got = orjson.loads(render.render(render.JSON, OBJECT, OBJ))
    assert got["price"] == 12.5 and got["when"] == WHEN.isoformat() and got["day"] == "2024-01-02"
    assert got["uid"] == str(UID) and got["color"] == "red" and got["nested"] == {"x": 1, "y": [1, 2]}
    assert got["name"] == OBJECT["name"] and got["none"] is None and got["ok"] is True
    # the exact decimal text, not a binary float's expansion
    assert b'"price":12.50' in render.render(render.JSON, OBJECT, OBJ)
    pretty = render.render(render.JSON, OBJECT, OBJ, RenderOptions(pretty=True))
    assert pretty.startswith(b"{\n  ") and orjson.loads(pretty) == got


def test_msgpack_round_trip() -> None:
    got = msgpack.unpackb(render.render(render.MSGPACK, OBJECT, OBJ), timestamp=3)
    assert got["when"] == WHEN  # the Timestamp extension: an aware datetime again
    assert got["price"] == 12.5 and got["day"] == "2024-01-02" and got["uid"] == str(UID)
    assert got["color"] == "red" and got["tags"] == ["a", "b"] and got["none"] is None


def test_yaml_round_trip_keeps_types() -> None:
    text = render.render(render.YAML, OBJECT, OBJ)
    got = yaml.safe_load(text)
    assert got["when"] == WHEN and got["day"] == DAY  # timestamps and dates stay typed
    assert got["price"] == 12.5 and got["uid"] == str(UID) and got["color"] == "red"
    assert got["name"] == OBJECT["name"] and got["nested"] == {"x": 1, "y": [1, 2]}
    assert b"!!python" not in text  # safe dumping only


def test_xml_is_well_formed_and_carries_the_data() -> None:
    root = ET.fromstring(render.render(render.XML, COLLECTION, COLL))
    assert root.tag == "items"
    first = root.find("items/item")
    assert first is not None
    assert first.findtext("name") == OBJECT["name"]
    assert first.findtext("price") == "12.50"
    assert first.findtext("when") == WHEN.isoformat()
    assert first.find("none").get("nil") == "true"  # type: ignore[union-attr]
    assert [t.text for t in first.findall("tags/item")] == ["a", "b"]
    assert root.find("next").get("nil") == "true"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "key",
    [
        "with space",
        "1leading",
        "<tag>",
        "",
        "a&b",
        'quo"te',
        "xmlish",
        "ключ",
        "tab\there",
        "ctl\x01",
        "e\u0301",
    ],
)
def test_xml_hostile_keys_still_parse(key: str) -> None:
    doc = {key: "v", "ok": {key: [key]}}
    root = ET.fromstring(render.render(render.XML, doc, Shape("doc")))
    names = [el.get("name", el.tag) for el in root]
    expected = key.replace("\x01", "\ufffd")
    assert expected in names or key in names


@pytest.mark.parametrize(
    "value", ["\x00nul", "bell\x07", "\ud800 lone surrogate", "fine\ttab\nnl", "]]> cdata end", "\ufffe"]
)
def test_xml_control_characters_handled(value: str) -> None:
    root = ET.fromstring(render.render(render.XML, {"v": value}, Shape("doc")))
    text = root.findtext("v") or ""
    assert "\ufffd" in text or text == value


def test_csv_round_trip_with_quotes_commas_newlines() -> None:
    body = render.render(render.CSV, COLLECTION, COLL).decode()
    assert "\r\n" in body
    rows = list(csv.DictReader(io.StringIO(body, newline="")))
    assert list(rows[0]) == [*OBJECT.keys(), "extra"]  # header: the union of keys, first-seen order
    assert rows[0]["name"] == OBJECT["name"]
    assert rows[0]["price"] == "12.50" and rows[0]["ok"] == "true" and rows[0]["none"] == ""
    assert orjson.loads(rows[0]["nested"]) == {"x": 1, "y": [1, 2]}
    assert rows[1]["extra"] == "only here" and rows[1]["price"] == ""


@pytest.mark.parametrize(
    "cell",
    [
        "=1+1",
        "+1",
        "-1+cmd",
        "@SUM(A1)",
        "\tTAB",
        "\rCR",
        '=HYPERLINK("x")',
        "＝1+1",
        "＋1",
        "－1",
        "＠SUM(A1)",
        "﹫x",
    ],
)
def test_csv_formula_injection_is_defused(cell: str) -> None:
    body = render.render(render.CSV, {"items": [{"v": cell}]}, COLL).decode()
    rows = list(csv.reader(io.StringIO(body, newline="")))
    assert rows[1] == ["'" + cell]


def test_csv_numbers_are_not_prefixed() -> None:
    body = render.render(render.CSV, {"items": [{"n": -5, "d": Decimal("-1.5")}]}, COLL).decode()
    assert list(csv.reader(io.StringIO(body)))[1] == ["-5", "-1.5"]


def test_csv_of_one_object_is_one_row() -> None:
    rows = list(csv.DictReader(io.StringIO(render.render(render.CSV, {"a": 1, "b": "x"}, OBJ).decode())))
    assert rows == [{"a": "1", "b": "x"}]


def test_plain_text_is_key_value_lines() -> None:
    text = render.render(render.TEXT, COLLECTION, COLL).decode()
    assert "total: 2" in text
    assert "    id: 7" in text and "    price: 12.50" in text and "    extra: only here" in text


@pytest.mark.parametrize(
    ("media", "body", "expected"),
    [
        ("application/json", b'{"a": [1, 2]}', {"a": [1, 2]}),
        ("application/merge-patch+json", b'{"a": 1}', {"a": 1}),
        ("application/vnd.msgpack", msgpack.packb({"a": "ü"}), {"a": "ü"}),
        ("application/x-msgpack", msgpack.packb({"a": 1}), {"a": 1}),
        ("application/yaml", "a: ü\nb: [1, 2]\n".encode(), {"a": "ü", "b": [1, 2]}),
        ("text/yaml", b"a: 1", {"a": 1}),
    ],
)
def test_request_bodies_parse(media: str, body: bytes, expected: Any) -> None:
    assert parse_body(media, body) == expected


@pytest.mark.parametrize(
    ("media", "body", "fragment"),
    [
        ("application/json", b"{nope", "not valid JSON"),
        ("application/vnd.msgpack", b"\xc1", "not valid msgpack"),
        ("application/vnd.msgpack", b"\x81\x01\x02", "not valid msgpack"),  # int map key
        ("application/yaml", b"a: [1, 2", "not valid YAML"),
        # refused on the bytes (a tag or alias where a token starts) ...
        ("application/yaml", b"a: !!python/object/apply:os.system ['true']", "tags"),
        ("application/yaml", b"a: &x [1]\nb: *x\n", "aliases"),
        # ... and, where the byte check cannot see them (no space after ":"), on the nodes
        ("application/yaml", b'{"a":!!python/object/apply:os.system [true]}', "tag:yaml.org,2002:python"),
        ("application/yaml", b'{"a":&x [1], "b":*x}', "aliases are not accepted"),
    ],
)
def test_malformed_bodies_name_the_problem(media: str, body: bytes, fragment: str) -> None:
    with pytest.raises(BodyError, match=fragment):
        parse_body(media, body)


_DEEP = 65  # one level more than MAX_BODY_DEPTH
_NESTED = functools.reduce(lambda inner, _: [inner], range(_DEEP - 1), [])


@pytest.mark.parametrize(
    ("media", "body", "fragment"),
    [
        ("application/json", b"[" * _DEEP + b"]" * _DEEP, "nested more than 64"),
        ("application/json", b'{"urls": [' + b"[" * 300 + b"]" * 300 + b"]}", "nested more than 64"),
        ("application/vnd.msgpack", msgpack.packb(_NESTED), "nested more than 64"),
        ("application/yaml", b"[" * _DEEP + b"]" * _DEEP, "nested more than 64"),
        ("application/yaml", b"1: a", "keys must be strings"),
        ("application/yaml", b'{"a":!!set {x, y}}', "tag:yaml.org,2002:set is not accepted"),
        ("application/yaml", b'{"a":!!binary aGk=}', "tag:yaml.org,2002:binary is not accepted"),
        ("application/yaml", b"a: 1180591620717411303424", "64-bit range"),
        ("application/vnd.msgpack", msgpack.packb({"a": b"raw"}), "holds a bytes"),
    ],
)
def test_bodies_hold_only_what_json_can(media: str, body: bytes, fragment: str) -> None:
    """Every handler may echo, store or publish its body: no depth orjson cannot write, no
    value JSON has no form for (a 300-deep URL item made POST /process-urls answer 500)."""
    with pytest.raises(BodyError, match=fragment):
        parse_body(media, body)


def test_bodies_at_the_depth_limit_and_yaml_timestamps_are_accepted() -> None:
    deep = b"[" * 64 + b"]" * 64
    assert parse_body("application/json", deep) == parse_body("application/yaml", deep)
    assert parse_body("application/yaml", b"at: 2026-11-25")["at"] == dt.date(2026, 11, 25)
    assert parse_body("application/json", b"[18446744073709551615]") == [2**64 - 1]


def test_unknown_body_type_is_key_error() -> None:
    with pytest.raises(KeyError):
        parse_body("text/csv", b"a,b")
