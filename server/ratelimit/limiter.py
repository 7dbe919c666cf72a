"""Rate limiting: the decision for one request, with Redis or, while it is down, by fail mode.

The windows are exact and shared through Redis (windows.py). When Redis fails, `fail_mode`
decides: `open` allows (logged once, counted), `closed` refuses with 503, `local` falls back to
the same algorithm in process memory with each limit divided by the number of processes
(local.py). After a failure Redis is left alone for `retry_interval` seconds, then tried
again; recovery needs nothing else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import redis.exceptions as redis_exc

from server.ratelimit.identity import ClientIdentity
from server.ratelimit.local import LocalWindows
from server.ratelimit.policy import Decision, Policy
from server.ratelimit.windows import RedisWindows

log = logging.getLogger("hotpath.ratelimit")

FAIL_MODES = ("open", "closed", "local")


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
