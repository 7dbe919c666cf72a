"""Request-body parsers (JSON, msgpack, YAML, bulk CSV), each under a size, a depth and a CPU bound.

Size is the caller's (handlers read at most the route's limit). Here every parser refuses
more arrays/objects and more values than its Limits (what parsing costs is the Python objects
it builds: ~0.1 µs an array or object, ~10-50 ns a number or string, against ~2 ns a byte of
text), more than MAX_BODY_DEPTH levels, and anything JSON cannot hold, so every handler can
echo, store or publish what it was given. Failures are BodyError (400) or BodyTooLarge (413).

YAML is the costly one (libyaml composes, but resolving and constructing each value is
Python: ~1.5 ms per KiB), so it is checked on its raw bytes before any YAML parser sees it
(precheck_yaml), then composed, then checked node by node before a single value is built.
YAML bodies above YAML_INLINE_MAX, and bulk CSV above CSV_INLINE_MAX, are parsed in a child
process (server/http/parser_process.py).

No aiohttp here: the parser process imports this module.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from typing import Any

import msgpack
import orjson
import yaml

JSON = "application/json"
MSGPACK = "application/vnd.msgpack"
YAML = "application/yaml"
YAML_TYPES = frozenset({YAML, "application/x-yaml", "text/yaml"})
MSGPACK_TYPES = frozenset({MSGPACK, "application/x-msgpack"})

# Deepest nesting a request body may have. Ours need three or four levels; orjson writes at
# most 254 (and reads 1024), so a deeper body echoed or stored would fail on the way out.
MAX_BODY_DEPTH = 64


@dataclass(frozen=True, slots=True)
class Limits:
    """What one body may hold: arrays/objects (server.body_max_containers) and values, the
    items of arrays and members of objects (server.body_max_items)."""

    containers: int = 4096
    items: int = 65536


class BodyError(ValueError):
    """A request body that cannot be decoded in its declared format, or breaks a bound (400)."""


class BodyTooLarge(BodyError):
    """A body within its byte limit that holds more than we parse (413)."""


# ---------------------------------------------------------------- JSON-ability, in C


def _orjson_max_depth() -> int:
    """The deepest nesting orjson.dumps writes (254 in orjson 3.x), found by trying, so the
    check below follows whatever orjson is installed."""

    def fits(depth: int) -> bool:
        value: list[Any] = []
        for _ in range(depth - 1):
            value = [value]
        try:
            orjson.dumps(value)
        except TypeError:
            return False
        return True

    low, high = 1, 4096  # fits(low); the answer is below high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


# A value nested d deep inside _WRAP single-item lists is nested d + _WRAP deep: orjson.dumps
# refuses it exactly when d > MAX_BODY_DEPTH. One C call checks depth, string keys, 64-bit
# integers and types (set, bytes, ext types raise) at ~2 ms a MiB, where a Python walk over the
# same value took 50-100 ms.
_WRAP = _orjson_max_depth() - MAX_BODY_DEPTH
assert _WRAP > 0, "orjson writes fewer levels than MAX_BODY_DEPTH"
_NOT_SERIALIZABLE = "Type is not JSON serializable: "


def check_json_like(value: Any) -> None:
    """BodyError unless `value` is data JSON can hold (objects with string keys, arrays,
    strings, 64-bit integers, floats, booleans, null, and the timestamps YAML and msgpack have)
    nested at most MAX_BODY_DEPTH deep."""
    wrapped = value
    for _ in range(_WRAP):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped)
    except TypeError as exc:
        raise BodyError(_json_like_problem(str(exc))) from None


def _json_like_problem(message: str) -> str:
    if message.startswith("Recursion limit"):
        return f"the body is nested more than {MAX_BODY_DEPTH} levels deep"
    if message.startswith("Dict key must be str"):
        return "object keys must be strings"
    if message.startswith("Integer exceeds 64-bit range"):
        return "an integer in the body is outside the 64-bit range"
    if message.startswith(_NOT_SERIALIZABLE):
        return f"the body holds a {message[len(_NOT_SERIALIZABLE) :]}, which JSON cannot represent"
    return f"the body holds a value JSON cannot represent ({message})"


def _too_many(max_containers: int) -> BodyTooLarge:
    return BodyTooLarge(f"the body holds more than {max_containers} arrays/objects")


def _too_many_items(max_items: int) -> BodyTooLarge:
    return BodyTooLarge(f"the body holds more than {max_items} values")


# ---------------------------------------------------------------- JSON


def parse_json(body: bytes, limits: Limits = Limits()) -> Any:
    """orjson under our bounds, counted on the bytes before a single object is built (at
    memchr speed): every '[' and '{' counts as an array/object and every ',' as a value, those
    inside strings too. orjson itself refuses more than 1024 levels and numbers beyond a
    double."""
    brackets = body.count(b"[") + body.count(b"{")
    if brackets > limits.containers:
        raise _too_many(limits.containers)
    if body.count(b",") > limits.items:  # values = commas + non-empty arrays/objects
        raise _too_many_items(limits.items)
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BodyError(f"the body is not valid JSON: {exc}") from None
    # fewer brackets than the depth limit: it can neither nest too deep nor hold anything
    # but JSON (the common case, a small object)
    if brackets > MAX_BODY_DEPTH:
        check_json_like(value)
    return value


# ---------------------------------------------------------------- msgpack


def parse_msgpack(body: bytes, limits: Limits = Limits()) -> Any:
    """msgpack's C unpacker (its own stack stops at 1024 levels; lengths are checked against
    the buffer, so a header claiming 2^32 items allocates nothing). No array or map may
    announce more than `limits.items` values (refused before it is built), and arrays/objects
    and values are counted as they are built, stopping at the first one over a bound."""
    containers = items = 0

    def counted(container: Any) -> Any:
        nonlocal containers, items
        containers += 1
        items += len(container)
        if containers > limits.containers:
            raise _too_many(limits.containers)
        if items > limits.items:
            raise _too_many_items(limits.items)
        return container

    try:
        value = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            timestamp=3,
            list_hook=counted,
            object_hook=counted,
            max_array_len=limits.items,
            max_map_len=limits.items,
        )
    except BodyError:
        raise
    except msgpack.StackError:
        raise BodyError(f"the body is nested more than {MAX_BODY_DEPTH} levels deep") from None
    except (ValueError, OverflowError, msgpack.UnpackException, TypeError) as exc:
        # OverflowError: a Timestamp extension beyond what datetime holds
        if "exceeds max_array_len" in str(exc) or "exceeds max_map_len" in str(exc):
            raise _too_many_items(limits.items) from None
        raise BodyError(f"the body is not valid msgpack: {exc}") from None
    check_json_like(value)
    return value


# ---------------------------------------------------------------- YAML

# libyaml when PyYAML was built with it (its wheels are): composing 1 KiB takes ~0.5-2.5 ms,
# against ~10 ms in pure Python, where YAML_INLINE_MAX shrinks to keep the loop's share short.
_YamlLoaderBase: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_HAS_LIBYAML = _YamlLoaderBase is not yaml.SafeLoader
# Bodies up to this size are parsed where they are read (on the event loop): the worst one,
# 1 KiB of plain integers, takes ~2.5 ms; bigger ones go to the YAML child process.
YAML_INLINE_MAX = 1024 if _HAS_LIBYAML else 128

# Where a YAML token may begin: after a line's indentation, after a flow indicator, after a
# block indicator and its space. Anything judged on the bytes is judged at these places only,
# so "Tom & Jerry", "5 *bold*" or a quoted "#1 [draft" pass; what starts a token there is
# refused even inside a quoted or block scalar (conservative: quote differently or use JSON).
# YAML 1.1 (libyaml) breaks lines at CR, LF, NEL, LS and PS, not only at "\n".
_LINE_START = rb"(?:\A|[\r\n]|\xc2\x85|\xe2\x80[\xa8\xa9])"
_TOKEN_START = rb"(?:" + _LINE_START + rb"[ \t]*|[\[{,][ \t]*|[-?:][ \t]+)"
# An anchor (&a), an alias (*a) or a tag (!x, !!x, !<x>); looked for only when one of those
# characters occurs at all.
_PROPERTY = re.compile(_TOKEN_START + rb"[&*!][^\s,\[\]{}]")
# A number longer than any 64-bit integer: 21+ digits (underscores and YAML 1.1's base-60
# colons count as digits: "1:00:00:..." is an integer), or a hex/octal/binary one of 21+;
# looked for where 21 such characters follow each other.
_LONG_RUN = re.compile(rb"[0-9a-fA-F_:]{21}")
_LONG_NUMBER = re.compile(_TOKEN_START + rb"[-+]?(?:0[xob][0-9a-fA-F_]{21,}|[0-9][0-9_:]{20,})")
# %YAML / %TAG directives.
_DIRECTIVE = re.compile(_LINE_START + rb"%")
# Block nesting needs a column per level (a sequence may share its parent mapping's column:
# two levels per column), and everything left of a block collection's first entry on its line
# is indentation or indicators. A line starting with more than this many of those is refused.
_MAX_BLOCK_PREFIX = 2 * MAX_BODY_DEPTH
_DEEP_BLOCK = re.compile(_LINE_START + rb"[ \t?:-]{%d}" % (_MAX_BLOCK_PREFIX + 1))
# Flow nesting: the brackets alone ("{" as "[", "}" as "]"), and runs of either.
_ONLY_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))
_BRACKET_RUNS = re.compile(rb"\[+|\]+")
_TOO_DEEP_RUN = b"[" * (MAX_BODY_DEPTH + 1)


def precheck_yaml(body: bytes, limits: Limits = Limits()) -> None:
    """Bound a YAML body on its raw bytes, before any YAML parser sees it (linear, ~1 ms for
    64 KiB at worst, nearly all of it in C).

    Flow nesting: every '[' or '{' counts as an opener (an upper bound on the flow
    collections, so it is refused past `limits.containers`: it also bounds any depth a parser can
    reach), and the running depth (openers minus closers, never below 0, quoting ignored) may
    not pass MAX_BODY_DEPTH. Block nesting: see _DEEP_BLOCK. Also refused: anchors, aliases
    and tags where a token may start, directives, integers longer than 64 bits, non-UTF-8.
    The exact checks follow on the composed nodes (_check_nodes); these keep the parser's work
    small and linear whatever libyaml it was built with (0.2.5 scans nested flow collections in
    quadratic time and recurses without a limit; 0.2.6 stops at 1,000 levels).
    """
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyError("a YAML body must be UTF-8") from None
    brackets = body.translate(_ONLY_BRACKETS, _NOT_BRACKETS)
    openers = brackets.count(b"[")
    if _TOO_DEEP_RUN in brackets:
        raise BodyError(f"the body is nested more than {MAX_BODY_DEPTH} levels deep")
    if openers > limits.containers:
        raise _too_many(limits.containers)
    if openers > MAX_BODY_DEPTH:  # else the running depth cannot pass it: no walk
        depth = 0
        for run in _BRACKET_RUNS.finditer(brackets):  # at most 2 * openers + 1 runs
            if brackets[run.start()] == 0x5B:  # "["
                depth += run.end() - run.start()
                if depth > MAX_BODY_DEPTH:
                    raise BodyError(f"the body is nested more than {MAX_BODY_DEPTH} levels deep")
            else:
                depth = max(0, depth - (run.end() - run.start()))
    if _DEEP_BLOCK.search(body):
        raise BodyError(
            f"the body is nested more than {MAX_BODY_DEPTH} levels deep "
            f"(a line is indented by more than {_MAX_BLOCK_PREFIX} characters)"
        )
    if (b"&" in body or b"*" in body or b"!" in body) and _PROPERTY.search(body):
        raise BodyError("YAML anchors, aliases and tags (&, *, !) are not accepted")
    if b"%" in body and _DIRECTIVE.search(body):
        raise BodyError("YAML directives (%) are not accepted")
    if _LONG_RUN.search(body) and _LONG_NUMBER.search(body):
        raise BodyError(
            "an integer in the body is outside the 64-bit range (more than 20 digits; quote it to send text)"
        )


_TAG = "tag:yaml.org,2002:"
_STR, _INT = _TAG + "str", _TAG + "int"
# The core schema and YAML 1.1 timestamps: what YAML's implicit resolution produces. Not
# merge (<<, which needs aliases to be useful), binary, set, omap, pairs, value or any other.
_ALLOWED_TAGS = frozenset(
    _TAG + t for t in ("str", "int", "float", "bool", "null", "timestamp", "seq", "map")
)
# "-0x" plus 20 digits plus a few underscores: anything longer is not a 64-bit integer
_MAX_INT_TEXT = 24


def _check_nodes(root: yaml.Node, limits: Limits) -> None:
    """The exact rules, on the composed document before any value is built: no node reached
    twice (aliases: a billion laughs is small as nodes but exponential as values), only the
    tags above, string keys, integers of at most 64 bits' length, depth, and the counts of
    collections and of values."""
    seen: set[int] = set()
    containers = items = 0
    stack: list[tuple[yaml.Node, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if id(node) in seen:
            raise BodyError("YAML anchors and aliases are not accepted")
        seen.add(id(node))
        if node.tag not in _ALLOWED_TAGS:
            raise BodyError(f"the YAML tag {node.tag} is not accepted")
        if isinstance(node, yaml.ScalarNode):
            if node.tag == _INT and len(node.value) > _MAX_INT_TEXT:
                raise BodyError("an integer in the body is outside the 64-bit range")
            continue
        containers += 1
        items += len(node.value)
        if containers > limits.containers:
            raise _too_many(limits.containers)
        if items > limits.items:
            raise _too_many_items(limits.items)
        if depth > MAX_BODY_DEPTH:
            raise BodyError(f"the body is nested more than {MAX_BODY_DEPTH} levels deep")
        if isinstance(node, yaml.MappingNode):
            for key, child in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag != _STR:
                    raise BodyError("object keys must be strings")
                stack.append((key, depth + 1))
                stack.append((child, depth + 1))
        else:
            stack.extend((child, depth + 1) for child in node.value)


def parse_yaml(body: bytes, limits: Limits = Limits()) -> Any:
    """A YAML body through precheck_yaml, the (C) safe loader and _check_nodes; then the value
    passes check_json_like like every other format's."""
    precheck_yaml(body, limits)
    loader = _YamlLoaderBase(body)
    try:
        node = loader.get_single_node()
        if node is None:  # a document of comments only
            return None
        _check_nodes(node, limits)
        value = loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise BodyError(f"the body is not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:  # pure-Python composer only, beyond the bounds above
        raise BodyError(f"the body is nested more than {MAX_BODY_DEPTH} levels deep") from None
    except (ValueError, OverflowError, TypeError) as exc:
        # a value the constructors cannot build: a timestamp like 2001-02-30 or +99:00
        raise BodyError(f"the body holds a YAML value that cannot be built: {exc}") from None
    finally:
        loader.dispose()
    check_json_like(value)
    return value


# ---------------------------------------------------------------- by media type


def parse_body(media_type: str, body: bytes, limits: Limits = Limits()) -> Any:
    """Decode a request body by its media type (`+json` suffixes count as JSON).

    Whatever the format, the result is data JSON can hold nested at most MAX_BODY_DEPTH deep,
    within `limits`. Raises KeyError for a type we do not read, BodyError (BodyTooLarge) for
    a malformed body or one outside those bounds.
    """
    if media_type == JSON or media_type.endswith("+json"):
        return parse_json(body, limits)
    if media_type in MSGPACK_TYPES:
        return parse_msgpack(body, limits)
    if media_type in YAML_TYPES:
        return parse_yaml(body, limits)
    raise KeyError(media_type)


def readable(media_type: str) -> bool:
    """Whether parse_body reads this media type."""
    return media_type in _READABLE or media_type.endswith("+json")


_READABLE = frozenset({JSON, *MSGPACK_TYPES, *YAML_TYPES})
BODY_TYPES: tuple[str, ...] = (JSON, MSGPACK, YAML)


# ---------------------------------------------------------------- bulk CSV

# Bulk CSV bodies up to this size are parsed where they are read: ~0.7 µs a row (the csv
# module's and the dict's), so 4 KiB of the shortest rows (",\n") take ~1.4 ms; bigger ones
# go to the parser process.
CSV_INLINE_MAX = 4 * 1024
# Columns a bulk CSV row may have (records need two: name, email). The csv module builds
# every field of a row before we can count them: a 2 MiB row of commas costs ~20 ms, which
# only the parser process (or an inline body of at most CSV_INLINE_MAX) ever pays.
CSV_MAX_COLUMNS = 32


def parse_csv_records(body: bytes, max_rows: int) -> list[dict[str, str]]:
    """Records from a CSV document whose header row names the fields (as csv.DictReader
    gives them: fields past the header dropped, missing ones left out, blank lines skipped).

    BodyError when it is not UTF-8 CSV or a row has more than CSV_MAX_COLUMNS columns;
    BodyTooLarge past 2 * (max_rows + 1) lines. At most max_rows + 1 records are built: the
    caller answers more than max_rows with 413.
    """
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BodyError("CSV must be UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[dict[str, str]] = []
    max_lines = 2 * (max_rows + 1)  # blank lines are skipped, but not for free
    try:
        header = next(reader, None)
        if not header:
            raise BodyError("CSV needs a header row (name,email)")
        if len(header) > CSV_MAX_COLUMNS:
            raise BodyError(f"a CSV row has more than {CSV_MAX_COLUMNS} columns")
        for row in reader:
            if reader.line_num > max_lines:
                raise BodyTooLarge(f"the CSV has more than {max_lines} lines")
            if len(row) > CSV_MAX_COLUMNS:
                raise BodyError(f"a CSV row has more than {CSV_MAX_COLUMNS} columns")
            if row:
                rows.append(dict(zip(header, row, strict=False)))
                if len(rows) > max_rows:
                    break
    except csv.Error as exc:
        raise BodyError(f"malformed CSV: {exc}") from None
    return rows
