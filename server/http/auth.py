"""Who a request comes from: the bearer token of an Authorization header, and the verified
caller (`Principal`) the access layer (server/access/) puts on the request for the layers and
handlers inside it."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from aiohttp import web

__all__ = ["PRINCIPAL", "Principal", "bearer_token"]


def bearer_token(header: str | None) -> str | None:
    """The token of `Authorization: Bearer <token>` (scheme case-insensitive), else None."""
    scheme, _, token = (header or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller: an API key, a configured shared token (an alias with fixed scopes),
    or a stream token issued to a key (limited to `channels`).

    `owner` is what the caller's tasks belong to: the key's family (a rotated key and its
    replacement share it); None for a shared token. `rate` is the key's own rate policy
    ("1000/minute"), used instead of a route's. `expires_at` (epoch seconds) ends the
    credential: a key's expiry, or a stream token's."""

    key_id: int | None
    owner: int | None
    name: str
    scopes: frozenset[str]
    rate: str | None = None
    expires_at: float | None = None
    channels: frozenset[str] | None = None  # a stream token: only these feed channels
    # What the rate limiter counts this caller as: its key's family (a rotated key and its
    # replacement share one budget), or the shared token's name. Made once, with the principal
    # (the verifier keeps principals per credential), so the limiter reads one attribute.
    identity: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        identity = f"key:{self.owner}" if self.owner is not None else f"alias:{self.name}"
        object.__setattr__(self, "identity", identity)

    def allows(self, scopes: Collection[str]) -> bool:
        """Holds one of `scopes` (a route's scopes are alternatives)."""
        return not self.scopes.isdisjoint(scopes)


# The verified caller of a request; absent for an anonymous request on an open route.
PRINCIPAL = web.RequestKey("hotpath.principal", Principal)
