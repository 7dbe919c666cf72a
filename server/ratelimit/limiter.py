"""Rate limiting: the decision for one request, with Redis or, while it is down, by fail mode.

The windows are exact and shared through Redis (windows.py). When Redis fails, `fail_mode`
decides: `open` allows (logged once, counted), `closed` refuses with 503, `local` falls back to
the same algorithm in process memory with each limit divided by the number of processes
(local.py). After a failure Redis is left alone for `retry_interval` seconds, then tried
again; recovery needs nothing else (server/storage/outage.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from server.ratelimit.identity import ClientIdentity
from server.ratelimit.local import LocalWindows
from server.ratelimit.policy import Decision, Policy
from server.ratelimit.windows import RedisWindows
from server.storage.outage import REDIS_FAILED, Outage

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
        self.outage = Outage(
            log,
            retry_interval,
            # fail_mode is one of FAIL_MODES (no % in it): part of the message, not an argument
            down=f"rate limiting: Redis failed (%s: %s); fail_mode={fail_mode} until it answers again",
            up="rate limiting: Redis answers again; limits are shared and exact again",
        )
        self._degraded_counts = {"fail_open": 0, "fail_closed": 0, "local": 0}

    @property
    def stats(self) -> dict[str, int]:
        """Checks answered without Redis, by what happened (the metrics' `mode` label)."""
        return {"redis_errors": self.outage.failures, **self._degraded_counts}

    def policy_for(self, route_name: str | None) -> Policy | None:
        return self.policies.get(route_name) if route_name else None

    @property
    def redis_down(self) -> bool:
        """Redis failed and its retry time has not come yet."""
        return not self.outage.usable()

    async def check(self, identity: str, policy: Policy) -> Decision | None:
        """The decision, or None when Redis is down and fail_mode is `closed` (caller answers 503)."""
        # Outage.usable() and ok() written out: this runs once per rate-limited request, and
        # while Redis answers it costs one attribute test, not two method calls.
        outage = self.outage
        if not outage.down_until or time.monotonic() >= outage.down_until:
            try:
                decision = await self.redis.check(identity, policy)
            except REDIS_FAILED as exc:  # fail_mode answers: never a 500
                outage.failed(exc)
            else:
                if outage.down_until:
                    outage.ok()
                return decision
        return self._degraded(identity, policy)

    def _degraded(self, identity: str, policy: Policy) -> Decision | None:
        counts = self._degraded_counts
        if self.fail_mode == "closed":
            counts["fail_closed"] += 1
            return None
        if self.fail_mode == "open":
            counts["fail_open"] += 1
            tight = policy.windows[0]
            return Decision(True, policy, tight, tight.limit, 0.0, 0.0)
        counts["local"] += 1
        return self.local.check(identity, policy)

    async def close(self) -> None:
        await self.redis.close()
