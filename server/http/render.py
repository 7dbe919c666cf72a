"""Representations: one table from media type to renderer (request bodies: server/http/bodies.py).

Every renderer takes plain data (dicts, lists, str, int, float, bool, None, datetime, date,
Decimal, UUID, Enum) and a Shape, and returns bytes. None of them sees a web.Request.
"""

from __future__ import annotations

import csv
import datetime as dt
import enum
import io
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import jinja2
import msgpack
import orjson
import yaml

from server.http import bodies

JSON = "application/json"
MSGPACK = "application/vnd.msgpack"
YAML = "application/yaml"
XML = "application/xml"
CSV = "text/csv"
TEXT = "text/plain"
HTML = "text/html"


@dataclass(frozen=True, slots=True)
class Shape:
    """What a document is, for the formats that need to know.

    root: XML root element and HTML title ("user", "users", "products").
    rows: the key holding a collection's items (CSV rows, HTML table), None for one object.
    """

    root: str
    rows: str | None = None


@dataclass(frozen=True, slots=True)
class RenderOptions:
    pretty: bool = False
    templates: jinja2.Environment | None = None


# ---------------------------------------------------------------- plain values


def _plain_scalar(value: Any) -> Any:
    """datetime/date → ISO 8601, Decimal → exact text, UUID → str, Enum → its value."""
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return _plain_scalar(value.value)
    return value


def _text(value: Any) -> str:
    """One cell or value as text: scalars as themselves, nested values as compact JSON."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping | list | tuple):
        return orjson.dumps(value, default=_json_default).decode()
    return str(_plain_scalar(value))


# ---------------------------------------------------------------- JSON


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return orjson.Fragment(str(value).encode())  # exact: 12.50 stays 12.50, a JSON number
    if isinstance(value, uuid.UUID | enum.Enum | dt.date):
        return _plain_scalar(value)
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"cannot represent {type(value).__name__} as JSON")


def render_json(data: Any, shape: Shape, opts: RenderOptions) -> bytes:
    option = orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE if opts.pretty else 0
    return orjson.dumps(data, default=_json_default, option=option)


def dumps_json(data: Any) -> bytes:
    """Compact JSON with the same type rules as the JSON representation."""
    return orjson.dumps(data, default=_json_default)


# ---------------------------------------------------------------- msgpack


def _msgpack_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)  # msgpack has no decimal; clients expect a number
    if isinstance(value, dt.datetime):  # naive datetimes: msgpack's Timestamp needs a zone
        return value.isoformat()
    if isinstance(value, dt.date | uuid.UUID | enum.Enum):
        return _plain_scalar(value)
    if isinstance(value, set | frozenset):
        return list(value)
    raise TypeError(f"cannot represent {type(value).__name__} as msgpack")


def render_msgpack(data: Any, shape: Shape, opts: RenderOptions) -> bytes:
    # aware datetimes become the msgpack Timestamp extension (-1): decode with timestamp=3
    return msgpack.packb(data, default=_msgpack_default, datetime=True)  # type: ignore[no-any-return]


# ---------------------------------------------------------------- YAML

_YamlDumperBase: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _YamlDumper(_YamlDumperBase):  # type: ignore[misc,valid-type]
    """Safe dumping (plain tags only) plus the types our data carries."""


def _yaml_decimal(dumper: yaml.SafeDumper, value: Decimal) -> yaml.Node:
    # a float tag with the exact decimal text: 12.50 reads back as the number 12.5
    return dumper.represent_scalar("tag:yaml.org,2002:float", str(value))


def _yaml_str(dumper: yaml.SafeDumper, value: Any) -> yaml.Node:
    return dumper.represent_str(str(value))


def _yaml_enum(dumper: yaml.SafeDumper, value: enum.Enum) -> yaml.Node:
    return dumper.represent_data(value.value)


def _yaml_datetime(dumper: yaml.SafeDumper, value: dt.datetime) -> yaml.Node:
    # ISO 8601 with a "T" (RFC 3339): still a YAML timestamp, and what JSON clients expect
    return dumper.represent_scalar("tag:yaml.org,2002:timestamp", value.isoformat())


_YamlDumper.add_representer(Decimal, _yaml_decimal)
_YamlDumper.add_representer(dt.datetime, _yaml_datetime)
_YamlDumper.add_multi_representer(uuid.UUID, _yaml_str)
_YamlDumper.add_multi_representer(enum.Enum, _yaml_enum)
_YamlDumper.add_representer(tuple, _YamlDumper.represent_list)
# dates are YAML timestamps natively (SafeDumper represents them as YYYY-MM-DD).


def render_yaml(data: Any, shape: Shape, opts: RenderOptions) -> bytes:
    text: str = yaml.dump(
        data, Dumper=_YamlDumper, allow_unicode=True, sort_keys=False, default_flow_style=False, width=120
    )
    return text.encode()


# ---------------------------------------------------------------- XML

_XML_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9._-]*$")
# Characters XML 1.0 cannot carry at all, escaped or not.
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


def _xml_text(value: str) -> str:
    return escape(_XML_INVALID.sub("\ufffd", value))


def _xml_open(key: str) -> tuple[str, str]:
    """(open tag, close tag) for a key; keys that are not XML names (or start with "xml")
    become <field name="...">."""
    if _XML_NAME.match(key) and not key.lower().startswith("xml"):
        return f"<{key}", f"</{key}>"
    return f"<field name={quoteattr(_XML_INVALID.sub(chr(0xFFFD), key))}", "</field>"


def _xml_value(out: list[str], key: str, value: Any, attrs: str = "") -> None:
    open_, close = _xml_open(key)
    open_ += attrs
    if value is None:
        out.append(f'{open_} nil="true"/>')
    elif isinstance(value, Mapping):
        out.append(open_ + ">")
        for k, v in value.items():
            _xml_value(out, str(k), v)
        out.append(close)
    elif isinstance(value, list | tuple | set | frozenset):
        out.append(open_ + ">")
        for item in value:
            _xml_value(out, "item", item)
        out.append(close)
    else:
        out.append(f"{open_}>{_xml_text(_text(value))}{close}")


def xml_document(root: str, data: Any, *, pretty: bool = False, namespace: str | None = None) -> bytes:
    """A complete, well-formed XML document for any data, `root` as the outer element."""
    out: list[str] = ['<?xml version="1.0" encoding="UTF-8"?>']
    _xml_value(out, root, data, f" xmlns={quoteattr(namespace)}" if namespace else "")
    return ("\n" if pretty else "").join(out).encode()


def render_xml(data: Any, shape: Shape, opts: RenderOptions) -> bytes:
    return xml_document(shape.root, data, pretty=opts.pretty)


# ---------------------------------------------------------------- CSV

# What makes a spreadsheet read a cell as a formula: = + - @, a tab or CR, and the fullwidth
# (＝ ＋ － ＠) and small-form (﹦ ﹢ ﹣ ﹫) variants that spreadsheet programs fold to the
# ASCII ones. server/records.py's export guard is built from the same string.
FORMULA_START = "=+-@\t\r\uff1d\uff0b\uff0d\uff20\ufe66\ufe62\ufe63\ufe6b"
_FORMULA_START = tuple(FORMULA_START)


def _csv_cell(value: Any) -> str:
    text = _text(value)
    # Spreadsheets run cells that start like a formula; numbers stay numbers (-5 is data).
    if isinstance(value, str) and text.startswith(_FORMULA_START):
        return "'" + text
    return text


def _rows_of(data: Any, shape: Shape) -> list[Mapping[str, Any]]:
    rows = data.get(shape.rows) if shape.rows and isinstance(data, Mapping) else data
    if isinstance(rows, Mapping):
        return [rows]
    if isinstance(rows, list | tuple):
        return [r if isinstance(r, Mapping) else {"value": r} for r in rows]
    return [{"value": rows}]


def csv_header(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """The union of the rows' keys, in order of first appearance."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(str(key), None)
    return list(seen)


def render_csv(data: Any, shape: Shape, opts: RenderOptions) -> bytes:
    rows = _rows_of(data, shape)
    header = csv_header(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")  # RFC 4180 line ends and quoting
    writer.writerow([_csv_cell(h) for h in header])
    for row in rows:
        writer.writerow([_csv_cell(row.get(h)) for h in header])
    return buf.getvalue().encode()


# ---------------------------------------------------------------- text/plain


def _plain_lines(out: list[str], data: Any, indent: str) -> None:
    if isinstance(data, Mapping):
        for key, value in data.items():
            if isinstance(value, Mapping) and value:
                out.append(f"{indent}{key}:")
                _plain_lines(out, value, indent + "  ")
            elif isinstance(value, list | tuple) and value and all(isinstance(v, Mapping) for v in value):
                out.append(f"{indent}{key}:")
                for i, item in enumerate(value):
                    out.append(f"{indent}  - [{i + 1}]")
                    _plain_lines(out, item, indent + "    ")
            else:
                out.append(f"{indent}{key}: {_text(value)}")
    else:
        out.append(f"{indent}{_text(data)}")


def render_text(data: Any, shape: Shape, opts: RenderOptions) -> bytes:
    out: list[str] = []
    _plain_lines(out, data, "")
    return ("\n".join(out) + "\n").encode()


# ---------------------------------------------------------------- HTML


def render_html(data: Any, shape: Shape, opts: RenderOptions) -> bytes:
    if opts.templates is None:
        raise RuntimeError("HTML needs the app's jinja2 environment")
    if shape.rows is not None and isinstance(data, Mapping):
        rows = _rows_of(data, shape)
        meta = {k: v for k, v in data.items() if k != shape.rows}
        template = opts.templates.get_template("collection.html")
        html = template.render(
            title=shape.root, header=csv_header(rows), rows=rows, meta=meta, text=_text, next=data.get("next")
        )
    else:
        template = opts.templates.get_template("object.html")
        html = template.render(
            title=shape.root, item=data if isinstance(data, Mapping) else {"value": data}, text=_text
        )
    return html.encode()


# ---------------------------------------------------------------- the tables


@dataclass(frozen=True, slots=True)
class Format:
    name: str  # the ?format= value
    media_type: str  # canonical media type
    content_type: str  # the full Content-Type header value sent
    render: Callable[[Any, Shape, RenderOptions], bytes]


FORMATS: tuple[Format, ...] = (
    Format("json", JSON, JSON, render_json),
    Format("msgpack", MSGPACK, MSGPACK, render_msgpack),
    Format("yaml", YAML, YAML, render_yaml),
    Format("xml", XML, f"{XML}; charset=utf-8", render_xml),
    Format("txt", TEXT, f"{TEXT}; charset=utf-8", render_text),
    Format("csv", CSV, f"{CSV}; charset=utf-8; header=present", render_csv),
    Format("html", HTML, f"{HTML}; charset=utf-8", render_html),
)
BY_NAME: dict[str, Format] = {f.name: f for f in FORMATS}
BY_MEDIA: dict[str, Format] = {f.media_type: f for f in FORMATS}
# Other names clients use for the same representations, answered with the name they asked for.
ALIASES: dict[str, str] = {
    "application/x-msgpack": MSGPACK,
    "application/x-yaml": YAML,
    "text/yaml": YAML,
    "text/xml": XML,
}
for _alias, _canonical in ALIASES.items():
    _base = BY_MEDIA[_canonical]
    BY_MEDIA[_alias] = Format(
        _base.name, _alias, _base.content_type.replace(_canonical, _alias, 1), _base.render
    )
# Server preference for ties: canonical types in table order (JSON first), then aliases.
OFFERS: tuple[str, ...] = (*(f.media_type for f in FORMATS), *ALIASES)


def render(media_type: str, data: Any, shape: Shape, opts: RenderOptions = RenderOptions()) -> bytes:
    """Render `data` in the representation registered for `media_type`."""
    return BY_MEDIA[media_type].render(data, shape, opts)


# ---------------------------------------------------------------- request bodies

# The parsers live in server/http/bodies.py (the YAML child process imports it without the rest);
# these names stay here for the callers that know them from this module.
BodyError = bodies.BodyError
BodyTooLarge = bodies.BodyTooLarge
MAX_BODY_DEPTH = bodies.MAX_BODY_DEPTH
BODY_TYPES = bodies.BODY_TYPES
parse_body = bodies.parse_body
