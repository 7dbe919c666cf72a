"""Bearer tokens: read from Authorization, compared in constant time, on the header's bytes."""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["bearer_token", "token_matches"]


def bearer_token(header: str | None) -> str | None:
    """The token of `Authorization: Bearer <token>` (scheme case-insensitive), else None."""
    scheme, _, token = (header or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _digest(text: str) -> bytes:
    # aiohttp decodes header bytes that are not UTF-8 as lone surrogates (surrogateescape):
    # encoding them back the same way gives the bytes the client sent, never an exception
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


def token_matches(given: str | None, expected: str) -> bool:
    """`given` equals `expected` (never when either is empty), in time independent of where
    they differ and of the given token's length (both sides are hashed first)."""
    if not given or not expected:
        return False
    return hmac.compare_digest(_digest(given), _digest(expected))
