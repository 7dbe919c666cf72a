"""Rate-limit policies: the windows a route is limited by, and the decision reported for one request.

Each policy is one or more windows ("100/hour, 10/minute"); a request is allowed only when every
window has room, and then it is counted in all of them. The rate grammar itself is
server/config/loading.py's `parse_rates` (a bad policy stops the process when the config loads).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.config import parse_rates
from server.http.operations import Schema


@dataclass(frozen=True, slots=True)
class Window:
    limit: int
    seconds: int

    @property
    def label(self) -> str:
        return f"{self.limit} per {self.seconds} s"


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    windows: tuple[Window, ...]
    # the RateLimit-Policy header value: constant per policy, built once
    header: str = field(default="", compare=False)


def parse_policy(name: str, text: str) -> Policy:
    """ "100/hour, 10/minute" (also "5/30s", "1000/day") → Policy. Raises ValueError."""
    rates = sorted(parse_rates(text), key=lambda rate: rate[1])
    windows = [Window(limit, seconds) for limit, seconds in rates]
    header = ", ".join(f'"{name}-{w.seconds}s";q={w.limit};w={w.seconds}' for w in windows)
    return Policy(name, tuple(windows), header)


def key_policy(text: str) -> Policy:
    """A key's own policy (its tier, `Principal.rate`), named by its windows ("tier-3per60s",
    "tier-10per60s-100per3600s"): keys with the same windows share the name, and so count in
    buckets of that name; a different rate is a different name, so its buckets never mix with
    another policy's (the name is part of every Redis key, windows.py). Route names have no
    hyphen, so no route's policy takes a tier's name. Raises ValueError."""
    windows = parse_policy("tier", text).windows
    return parse_policy("tier-" + "-".join(f"{w.limit}per{w.seconds}s" for w in windows), text)


def build_policies(
    route_names: Sequence[str], policies: Mapping[str, str], default: str, exempt: Iterable[str]
) -> dict[str, Policy]:
    """Policy per route name: its own, else the default (if any), never for exempt routes.

    Raises ValueError for a policy naming a route that does not exist (a typo would
    otherwise silently leave a route unlimited) or a malformed rate.
    """
    unknown = sorted(set(policies) - set(route_names))
    if unknown:
        raise ValueError(
            f"policies for unknown routes: {', '.join(unknown)} (routes: {', '.join(route_names)})"
        )
    taken = sorted(name for name in route_names if name.startswith("tier-"))
    if taken:  # such a route's buckets could be a key tier's (key_policy)
        raise ValueError(f"route names starting with 'tier-' are reserved for key tiers: {', '.join(taken)}")
    exempt = set(exempt)
    parsed = {name: parse_policy(name, text) for name, text in policies.items()}
    default_policy = parse_policy("default", default) if default.strip() else None
    out: dict[str, Policy] = {}
    for name in route_names:
        if name in exempt:
            continue
        policy = parsed.get(name, default_policy)
        if policy is not None:
            out[name] = policy
    return out


@dataclass(slots=True)  # not frozen: a frozen __init__ costs a setattr call per field, per request
class Decision:
    """The outcome for one request, reported for its tightest window."""

    allowed: bool
    policy: Policy
    window: Window  # the window with the least room left (or the one that refused)
    remaining: int
    reset_after: float  # seconds until that window frees a slot (0 when it is empty)
    retry_after: float  # seconds until a refused request could succeed (0 when allowed)

    def headers(self) -> dict[str, str]:
        """IETF RateLimit-Policy / RateLimit headers, plus Retry-After and the legacy
        X-Rate-* headers on a refusal."""
        name = f"{self.policy.name}-{self.window.seconds}s"
        out = {
            "RateLimit-Policy": self.policy.header,
            "RateLimit": f'"{name}";r={self.remaining};t={math.ceil(self.reset_after)}',
        }
        if not self.allowed:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
            out["X-Rate-Limit"] = str(self.window.limit)
            out["X-Rate-Remaining"] = "0"
            out["X-Rate-Reset"] = str(math.ceil(time.time() + self.retry_after))
        return out

    def info(self) -> dict[str, Any]:
        """The `rate_info` object of the old API: allowed, limit, remaining, reset_time (epoch s)."""
        wait = self.reset_after if self.allowed else self.retry_after
        return {
            "allowed": self.allowed,
            "limit": self.window.limit,
            "remaining": self.remaining,
            "reset_time": math.ceil(time.time() + wait),
        }


# The API document's view of Decision.info() and Decision.headers().
RATE_INFO = Schema(
    "RateInfo",
    {
        "type": "object",
        "required": ["allowed", "limit", "remaining", "reset_time"],
        "properties": {
            "allowed": {"type": "boolean"},
            "limit": {"type": "integer"},
            "remaining": {"type": "integer"},
            "reset_time": {"type": "integer", "description": "Unix time the window frees a slot"},
        },
    },
)
RATE_HEADERS: Mapping[str, Any] = {
    "RateLimit-Policy": {"schema": {"type": "string"}, "description": "draft-ietf-httpapi-ratelimit-headers"},
    "RateLimit": {"schema": {"type": "string"}, "description": "the tightest window: r=remaining, t=seconds"},
}
REFUSED_HEADERS: Mapping[str, Any] = {
    **RATE_HEADERS,
    "Retry-After": {"schema": {"type": "integer"}},
    "X-Rate-Limit": {"schema": {"type": "integer"}},
    "X-Rate-Remaining": {"schema": {"type": "integer"}},
    "X-Rate-Reset": {"schema": {"type": "integer"}, "description": "Unix time"},
}
