"""Rate limiting: exact sliding windows in Redis, checked in one round trip per loop pass.

Each policy is one or more windows ("100/hour, 10/minute"); a request is allowed only when
every window has room, and then it is counted in all of them. A window is a Redis sorted
set of the request times inside it (microseconds from Redis `TIME`, so hosts with skewed
clocks agree), which makes "at most N in any W seconds" exact rather than approximate.

All checks made during one event-loop pass go to Redis together: one EVALSHA of one Lua
script that handles them in arrival order, atomically. Exactness is kept (the script sees
every earlier check of the batch), and under load a process pays one round trip for many
requests instead of one each.

When Redis fails, `fail_mode` decides: `open` allows (logged once, counted), `closed`
refuses with 503, `local` falls back to the same algorithm in process memory with each
limit divided by the number of processes. After a failure Redis is left alone for
`retry_interval` seconds, then tried again; recovery needs nothing else.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import itertools
import logging
import math
import os
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.exceptions as redis_exc

from server.config import parse_rates
from server.http.operations import Schema
from server.ratelimit.resp import RespConnection

log = logging.getLogger("hotpath.ratelimit")

KEY_PREFIX = "hotpath:v1:rl"
FAIL_MODES = ("open", "closed", "local")


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


# ---------------------------------------------------------------- client identity


class ClientIdentity:
    """Who a request counts against: an API key when configured and sent, else the client IP.

    X-Forwarded-For / Forwarded are believed only when the socket peer is a trusted proxy,
    and then walked right to left past trusted hops: the first untrusted address is the
    client. A header from an untrusted peer changes nothing. IPv6 clients are grouped by
    their /ipv6_prefix network (one host usually owns a whole /64).
    """

    def __init__(self, trusted_proxies: Iterable[str], key_header: str = "", ipv6_prefix: int = 64) -> None:
        self.trusted = tuple(ipaddress.ip_network(c, strict=False) for c in trusted_proxies)
        self.key_header = key_header
        self.ipv6_prefix = ipv6_prefix
        self._trusted_memo: dict[str, bool] = {}
        self._key_memo: dict[str, str] = {}

    def is_trusted(self, address: str) -> bool:
        known = self._trusted_memo.get(address)
        if known is None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                known = False
            else:
                known = any(ip in net for net in self.trusted)
            if len(self._trusted_memo) >= 4096:
                self._trusted_memo.clear()
            self._trusted_memo[address] = known
        return known

    def client_ip(self, headers: Mapping[str, str], peer: str | None) -> str:
        if peer is None or not self.trusted or not self.is_trusted(peer):
            return peer or "unknown"
        hops = _forwarded_for(headers)
        for hop in reversed(hops):
            if not self.is_trusted(hop):
                return hop
        return hops[0] if hops else peer

    def identify(self, headers: Mapping[str, str], peer: str | None) -> str:
        if self.key_header:
            key = headers.get(self.key_header)
            if key:
                ident = self._key_memo.get(key)
                if ident is None:
                    # never store raw API keys in Redis
                    ident = "key:" + hashlib.sha256(key.encode()).hexdigest()[:32]
                    if len(self._key_memo) >= 4096:
                        self._key_memo.clear()
                    self._key_memo[key] = ident
                return ident
        ip = self.client_ip(headers, peer)
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:  # not an address (a proxy's "unknown", say): keyed by its digest
            return "raw:" + hashlib.sha256(ip.encode(errors="replace")).hexdigest()[:32]
        if isinstance(addr, ipaddress.IPv6Address):
            if addr.ipv4_mapped is not None:
                return f"ip:{addr.ipv4_mapped}"
            net = ipaddress.ip_network(f"{addr}/{self.ipv6_prefix}", strict=False)
            return f"ip:{net.network_address}/{self.ipv6_prefix}"
        return f"ip:{addr}"


def _strip_port(value: str) -> str:
    value = value.strip().strip('"')
    if value.startswith("["):  # [2001:db8::1]:4711
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:  # 192.0.2.1:4711
        return value.split(":", 1)[0]
    return value


def _forwarded_for(headers: Mapping[str, str]) -> list[str]:
    """Addresses from X-Forwarded-For, else from RFC 7239 Forwarded `for=`, left to right."""
    xff = headers.get("X-Forwarded-For")
    if xff:
        return [_strip_port(h) for h in xff.split(",") if h.strip()]
    fwd = headers.get("Forwarded")
    if not fwd:
        return []
    out = []
    for element in fwd.split(","):
        for pair in element.split(";"):
            name, _, value = pair.partition("=")
            if name.strip().lower() == "for" and value:
                out.append(_strip_port(value))
    return out


# ---------------------------------------------------------------- Redis (one script per batch)

# ARGV[1]: a token unique to this call. ARGV[2]: how many policies follow, then per policy:
# its key prefix, its number of windows, and per window: limit, seconds.
# The last argument: every check as "policy index (1-based) SP identity", joined by LF.
# Keys are built here rather than passed in KEYS: hotpath targets one Redis (or a primary),
# not Redis Cluster, and one joined argument instead of 7 per check saves the client the
# encoding work that bounds this path (Redis has CPU to spare for the splitting).
# Returns per check: allowed, index of the reported window (0-based), remaining, reset µs, retry µs.
SLIDING_WINDOW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local stamp = t[1] .. '.' .. t[2] .. ':' .. ARGV[1] .. ':'
local policies = {}
local ai = 3
for p = 1, tonumber(ARGV[2]) do
  local prefix, nwin = ARGV[ai], tonumber(ARGV[ai + 1])
  ai = ai + 2
  local wins = {}
  for w = 1, nwin do
    local limit, secs = tonumber(ARGV[ai]), ARGV[ai + 1]
    wins[w] = {limit, tonumber(secs) * 1000000, prefix .. secs .. ':', tonumber(secs) * 1000}
    ai = ai + 2
  end
  policies[p] = wins
end
local out = {}
local seq = 0
for pi, ident in string.gmatch(ARGV[ai], '(%d+) ([^\\n]+)') do
  local wins = policies[tonumber(pi)]
  local allowed, retry = 1, 0
  local keys, counts = {}, {}
  for w = 1, #wins do
    local win = wins[w]
    local key = win[3] .. ident
    keys[w] = key
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - win[2])
    local count = redis.call('ZCARD', key)
    counts[w] = count
    if count >= win[1] then
      allowed = 0
      local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      local wait = tonumber(oldest[2]) + win[2] - now
      if wait > retry then retry = wait end
    end
  end
  if allowed == 1 then
    seq = seq + 1
    local member = stamp .. seq
    for w = 1, #wins do
      redis.call('ZADD', keys[w], now, member)
      redis.call('PEXPIRE', keys[w], wins[w][4])
      counts[w] = counts[w] + 1
    end
  end
  local best, best_left = 1, nil
  for w = 1, #wins do
    local left = wins[w][1] - counts[w]
    if left < 0 then left = 0 end
    if best_left == nil or left < best_left then best, best_left = w, left end
  end
  local reset = 0
  if counts[best] == 1 and allowed == 1 then
    reset = wins[best][2]  -- this request is the window's only entry
  elseif counts[best] > 0 then
    local oldest = redis.call('ZRANGE', keys[best], 0, 0, 'WITHSCORES')
    reset = tonumber(oldest[2]) + wins[best][2] - now
  end
  out[#out + 1] = allowed
  out[#out + 1] = best - 1
  out[#out + 1] = best_left
  out[#out + 1] = reset
  out[#out + 1] = retry
end
return out
"""


class RedisWindows:
    """Coalesces the checks of one loop pass into one EVALSHA (see the module docstring)."""

    def __init__(self, conn: RespConnection, max_batch: int = 32) -> None:
        self._conn = conn
        self._sha = hashlib.sha1(SLIDING_WINDOW_LUA.encode()).hexdigest()
        self._max_batch = max_batch
        self._pending: list[tuple[str, Policy, asyncio.Future[Decision]]] = []
        self._scheduled: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._token_prefix = os.urandom(6).hex()
        self._calls = itertools.count()
        # per policy, the arguments that describe it to the script, built once
        self._spec: dict[Policy, list[str | int]] = {}
        self.batches = 0
        self.checks = 0

    def _policy_args(self, policy: Policy) -> list[str | int]:
        spec = self._spec.get(policy)
        if spec is None:
            spec = [f"{KEY_PREFIX}:{policy.name}:", len(policy.windows)]
            for w in policy.windows:
                spec += [w.limit, w.seconds]
            self._spec[policy] = spec
        return spec

    async def check(self, identity: str, policy: Policy) -> Decision:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Decision] = loop.create_future()
        self._pending.append((identity, policy, fut))
        if len(self._pending) >= self._max_batch:
            self._dispatch()
        elif self._scheduled is None:
            self._scheduled = loop.call_soon(self._dispatch)
        return await fut

    def _dispatch(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[str, Policy, asyncio.Future[Decision]]]) -> None:
        index: dict[Policy, str] = {}
        args: list[str | int] = [f"{self._token_prefix}{next(self._calls):x}", 0]
        lines: list[str] = []
        for identity, policy, _ in batch:
            prefix = index.get(policy)
            if prefix is None:
                prefix = index[policy] = f"{len(index) + 1} "
                args += self._policy_args(policy)
            lines.append(prefix + identity)
        args[1] = len(index)
        args.append("\n".join(lines))
        try:
            raw = await self._conn.evalsha(self._sha, SLIDING_WINDOW_LUA, *args)
        except BaseException as exc:
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self.batches += 1
        self.checks += len(batch)
        for n, (_, policy, fut) in enumerate(batch):
            allowed, window, remaining, reset_us, retry_us = raw[5 * n : 5 * n + 5]
            if not fut.done():
                fut.set_result(
                    Decision(
                        bool(allowed),
                        policy,
                        policy.windows[window],
                        remaining,
                        reset_us / 1e6 if reset_us > 0 else 0.0,
                        retry_us / 1e6 if retry_us > 0 else 0.0,
                    )
                )

    async def close(self) -> None:
        if self._pending:
            self._dispatch()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._conn.close()


# ---------------------------------------------------------------- in-process fallback


class LocalWindows:
    """The same sliding windows in process memory, each limit divided by `processes`."""

    def __init__(self, processes: int = 1, max_keys: int = 100_000) -> None:
        self.processes = max(1, processes)
        self.max_keys = max_keys
        self._logs: dict[tuple[str, int, str], deque[float]] = {}

    def check(self, identity: str, policy: Policy) -> Decision:
        now = time.monotonic()
        if len(self._logs) >= self.max_keys:
            self._sweep(now)
        logs = []
        allowed, retry = True, 0.0
        for w in policy.windows:
            entries = self._logs.setdefault((policy.name, w.seconds, identity), deque())
            while entries and entries[0] <= now - w.seconds:
                entries.popleft()
            limit = max(1, w.limit // self.processes)
            if len(entries) >= limit:
                allowed = False
                retry = max(retry, entries[0] + w.seconds - now)
            logs.append((w, limit, entries))
        if allowed:
            for _, _, entries in logs:
                entries.append(now)
        w, limit, entries = min(logs, key=lambda item: item[1] - len(item[2]))
        reset = entries[0] + w.seconds - now if entries else 0.0
        return Decision(allowed, policy, w, max(0, limit - len(entries)), max(0.0, reset), retry)

    def _sweep(self, now: float) -> None:
        for key in [k for k, v in self._logs.items() if not v or v[-1] <= now - k[1]]:
            del self._logs[key]
        while len(self._logs) >= self.max_keys:  # still full of live keys: forget the oldest
            del self._logs[next(iter(self._logs))]


# ---------------------------------------------------------------- the service


class RateLimiter:
    """Policies by route name, client identity, and decisions with Redis or the fail mode."""

    def __init__(
        self,
        redis_windows: RedisWindows,
        policies: Mapping[str, Policy],
        identity: ClientIdentity,
        *,
        fail_mode: str = "local",
        processes: int = 1,
        retry_interval: float = 1.0,
    ) -> None:
        if fail_mode not in FAIL_MODES:
            raise ValueError(f"fail_mode must be one of {FAIL_MODES}")
        self.redis = redis_windows
        self.policies = dict(policies)
        self.identity = identity
        self.fail_mode = fail_mode
        self.local = LocalWindows(processes)
        self.retry_interval = retry_interval
        self._redis_down_until = 0.0
        self.stats = {"redis_errors": 0, "fail_open": 0, "fail_closed": 0, "local": 0}

    def policy_for(self, route_name: str | None) -> Policy | None:
        return self.policies.get(route_name) if route_name else None

    @property
    def redis_down(self) -> bool:
        return bool(self._redis_down_until) and time.monotonic() < self._redis_down_until

    async def check(self, identity: str, policy: Policy) -> Decision | None:
        """The decision, or None when Redis is down and fail_mode is `closed` (caller answers 503)."""
        if not self._redis_down_until or time.monotonic() >= self._redis_down_until:
            try:
                decision = await self.redis.check(identity, policy)
            except (redis_exc.RedisError, OSError, TimeoutError) as exc:
                self.stats["redis_errors"] += 1
                if self._redis_down_until == 0.0:
                    log.warning(
                        "rate limiting: Redis failed (%s: %s); fail_mode=%s until it answers again",
                        type(exc).__name__,
                        exc,
                        self.fail_mode,
                    )
                self._redis_down_until = time.monotonic() + self.retry_interval
            else:
                if self._redis_down_until:
                    log.warning("rate limiting: Redis answers again; limits are shared and exact again")
                    self._redis_down_until = 0.0
                return decision
        return self._degraded(identity, policy)

    def _degraded(self, identity: str, policy: Policy) -> Decision | None:
        if self.fail_mode == "closed":
            self.stats["fail_closed"] += 1
            return None
        if self.fail_mode == "open":
            self.stats["fail_open"] += 1
            tight = policy.windows[0]
            return Decision(True, policy, tight, tight.limit, 0.0, 0.0)
        self.stats["local"] += 1
        return self.local.check(identity, policy)

    async def close(self) -> None:
        await self.redis.close()


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
