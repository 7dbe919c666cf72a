"""Stream tokens: short-lived, signed credentials a browser can carry where it cannot send an
Authorization header (an EventSource URL's query, or a cookie).

A token names the key it was issued to, the feed channels it may read and its expiry; it is
signed with HMAC-SHA256 under a secret every process of the deployment shares (made once in
PostgreSQL, server/access/apikeys.py). It is checked without any I/O: the signature in constant
time, then the expiry, then (by the caller) that its key is still active.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

__all__ = ["StreamClaims", "issue", "read"]

PREFIX = "hps_"
_MAX = 2048  # longest token read: a few channels and numbers


@dataclass(frozen=True, slots=True)
class StreamClaims:
    key_id: int
    channels: frozenset[str]
    expires_at: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue(secret: bytes, key_id: int, channels: list[str], ttl: float) -> tuple[str, float]:
    """(the token, its expiry in epoch seconds)."""
    expires_at = int(time.time() + ttl)
    payload = _b64(json.dumps({"k": key_id, "c": sorted(channels), "e": expires_at}).encode())
    signature = _b64(hmac.new(secret, payload.encode(), hashlib.sha256).digest())
    return f"{PREFIX}{payload}.{signature}", float(expires_at)


def read(secret: bytes, token: str, now: float | None = None) -> StreamClaims | None:
    """The claims of a token signed with `secret` and not expired, else None."""
    if len(token) > _MAX or not token.startswith(PREFIX) or not secret:
        return None
    payload, _, signature = token[len(PREFIX) :].partition(".")
    expected = _b64(hmac.new(secret, payload.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        return None
    try:
        claims = json.loads(_unb64(payload))
        key_id, channels, expires_at = int(claims["k"]), frozenset(map(str, claims["c"])), float(claims["e"])
    except (ValueError, KeyError, TypeError):
        return None
    if expires_at <= (time.time() if now is None else now):
        return None
    return StreamClaims(key_id, channels, expires_at)
