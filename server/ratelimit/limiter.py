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
from server.ratelimit.policy import Decision, Policy, key_policy
from server.ratelimit.windows import RedisWindows
from server.storage.outage import REDIS_FAILED, Outage

log = logging.getLogger("hotpath.ratelimit")

FAIL_MODES = ("open", "closed", "local")
_TIERS_MAX = 1024  # distinct key rates whose policies are kept; beyond, they are built afresh


class RateLimiter:
    """Policies by route name, key tiers, client identity, and decisions with Redis or the
    fail mode.

    A key's own rate (`Principal.rate`, its tier) replaces the route's policy wherever this
    limiter runs (middlewares/ratelimit.py: every route with a policy, and every write):
    `tiers` keeps the policy built from each rate text, so a request with one costs one
    dict lookup."""

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
        self.tiers: dict[str, Policy] = {}
        self._bad_tiers: set[str] = set()
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

    def tier(self, rate: str, route_name: str | None) -> Policy | None:
        """The policy of a key's rate (kept in `tiers`). A rate that does not parse (keys are
        checked when made, so only a hand-edited row) falls back to the route's own policy,
        logged once per rate."""
        try:
            policy = key_policy(rate)
        except ValueError as exc:
            if rate not in self._bad_tiers and len(self._bad_tiers) < _TIERS_MAX:
                self._bad_tiers.add(rate)
                log.warning("a key's rate %r is not a policy (%s); its routes' policies apply", rate, exc)
            return self.policy_for(route_name)
        if len(self.tiers) >= _TIERS_MAX:
            self.tiers.clear()
        self.tiers[rate] = policy
        return policy

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
