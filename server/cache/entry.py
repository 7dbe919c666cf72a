"""One cached value: its key, the Entry both layers hold, and the bytes Redis stores for it.

Values are msgpack (server/http/packing.py: extension types for datetime, date, Decimal and UUID;
anything else is refused with TypeError). Never pickle: bytes in Redis must not be able to run
code here. The "v1" in every key versions the stored format.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from server.errors import NotFound
from server.http.packing import pack, unpack

R = TypeVar("R")
KEY_PREFIX = "hotpath:v1:"
GROUP_PREFIX = "hotpath:v1:group:"


def make_key(namespace: str, parts: Any) -> str:
    """`hotpath:v1:<namespace>:<hash of the packed parts>`: versioned, readable in redis-cli."""
    digest = hashlib.blake2b(pack(parts), digest_size=16).hexdigest()
    return f"{KEY_PREFIX}{namespace}:{digest}"


@dataclass(slots=True)
class Entry:
    """One cached value: `missing` holds the detail of a cached not-found instead of a value."""

    value: Any
    etag: str
    fresh_until: float  # wall clock (time.time()), shared between processes through L2
    stale_until: float
    size: int
    missing: str | None = None
    group: str | None = None
    # what a caller derived from the value once (the middleware's ready-made headers)
    derived: Any = None

    def result(self) -> Any:
        if self.missing is not None:
            raise NotFound(self.missing)
        return self.value


@dataclass(frozen=True, slots=True)
class Hit(Generic[R]):
    """A value with where it came from: "hit-l1", "hit-l2" or "miss", and its ETag; `missing`
    is the detail of a cached not-found (only with raise_missing=False; value is then None)."""

    value: R
    source: str
    etag: str
    missing: str | None = None


def encode(
    value: Any, ttl: float, grace: float, missing: str | None, group: str | None
) -> tuple[Entry, bytes]:
    """A new Entry for `value` (or for a not-found, `missing`), fresh for `ttl` seconds and
    servable stale for `grace` more, with the bytes L2 stores for it."""
    now = time.time()
    body = pack(value) if missing is None else b""
    etag = hashlib.blake2b(body or (missing or "").encode(), digest_size=12).hexdigest()
    entry = Entry(value, etag, now + ttl, now + ttl + grace, len(body) + 64, missing, group)
    raw = pack([entry.fresh_until, entry.stale_until, etag, missing, group, body])
    return entry, raw


def decode(raw: bytes) -> Entry:
    """The Entry that encode() stored as `raw`."""
    fresh_until, stale_until, etag, missing, group, body = unpack(raw)
    value = unpack(body) if missing is None else None
    return Entry(value, etag, fresh_until, stale_until, len(body) + 64, missing, group)
