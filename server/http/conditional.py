"""Validators and conditional GETs (RFC 9110 sections 8.8.3 and 13.1.2): strong ETags over a
representation's bytes and If-None-Match matching. Bodies served again and again hash once
(server.http.compression.Compression.kept)."""

from __future__ import annotations

import hashlib
import re

_ENTITY_TAG = re.compile(r'\s*(W/)?("[^"]*")\s*(?:,|$)')
MAX_HEADER = 4096


def etag_of(body: bytes, suffix: str = "") -> str:
    """A strong ETag for exactly these bytes (BLAKE2b, 96 bits), `suffix` naming a variant."""
    digest = hashlib.blake2b(body, digest_size=12).hexdigest()
    return f'"{digest}-{suffix}"' if suffix else f'"{digest}"'


def none_match(header: str, etag: str) -> bool:
    """Whether If-None-Match `header` matches `etag` by weak comparison (what GET and HEAD
    use): `*` matches any current representation; W/ is ignored on both sides. A malformed
    list matches nothing (the full response is always a safe answer)."""
    header = header[:MAX_HEADER].strip()
    if header == "*":
        return True
    opaque = etag[2:] if etag.startswith("W/") else etag
    pos = 0
    while pos < len(header):
        m = _ENTITY_TAG.match(header, pos)
        if m is None:
            return False
        if m.group(2) == opaque:
            return True
        pos = m.end()
    return False


def weak(etag: str) -> str:
    """The weak form of `etag` (for a compressed body: same representation, other bytes)."""
    return etag if etag.startswith("W/") else "W/" + etag
