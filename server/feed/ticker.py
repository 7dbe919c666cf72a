"""The feed's ticker: one leader in the whole deployment, elected by a Redis lease, publishes a
tick on the `ticker` channel every ticker_interval."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

import redis.asyncio as aioredis

from server.config import FeedConfig
from server.feed.stream import EventStream
from server.storage.outage import REDIS_FAILED

log = logging.getLogger("hotpath.feed")

# Lease for the ticker: renew it when we hold it, take it when nobody does. Returns the next
# tick number while we lead, 0 otherwise (so a tick is only numbered by the current leader).
_LEASE_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
elseif not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  return 0
end
return redis.call('INCR', KEYS[2])
"""
_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Ticker:
    """This process's bid for the ticker: `run()` holds or tries to take the lease, and ticks
    while it leads; `release()` gives the lease up at close, so another takes over at once."""

    def __init__(self, redis: aioredis.Redis, stream: EventStream, config: FeedConfig, node: str) -> None:
        self._stream = stream
        self._interval = config.ticker_interval
        self.node = node
        self._lock_key = f"{config.key_prefix}ticker:leader"
        self._seq_key = f"{config.key_prefix}ticker:seq"
        self.lease = redis.register_script(_LEASE_SCRIPT)
        self._release = redis.register_script(_RELEASE_SCRIPT)
        self.leader = False
        self.stopping = False

    def _stopped(self) -> bool:
        return self.stopping

    async def run(self) -> None:
        """Every ticker_interval: hold (or try to take) the deployment-wide lease; the holder
        publishes the tick. A leader that dies stops renewing and another takes over when the
        lease runs out (3 intervals, at least 0.5 s)."""
        interval = self._interval
        lease_ms = int(max(3 * interval, 0.5) * 1000)
        loop = asyncio.get_running_loop()
        due = loop.time()
        # The flag, not only cancellation, ends the loop: redis-py cancelled mid-command may
        # raise a connection error instead of CancelledError, which the loop would survive and
        # close() would wait for forever (seen as a test teardown hanging now and then).
        while not self._stopped():
            try:
                value = int(
                    await self.lease(keys=[self._lock_key, self._seq_key], args=[self.node, lease_ms])
                )
                if bool(value) != self.leader:
                    log.info("feed ticker: %s", "leading" if value else "following")
                self.leader = bool(value)
                if value:
                    await self._stream.publish("ticker", "message", self._tick(value))
            except REDIS_FAILED as exc:
                if self._stopped():
                    return
                log.warning("feed ticker: %s: %s", type(exc).__name__, exc)
            due += interval
            now = loop.time()
            if due < now:  # fell behind (a stall): skip the missed ticks rather than burst
                due = now + interval
            await asyncio.sleep(due - now)

    async def release(self) -> None:
        """Give the lease up if this process holds it."""
        if self.leader:
            self.leader = False
            try:
                await self._release(keys=[self._lock_key], args=[self.node])
            except REDIS_FAILED as exc:
                log.warning("could not release the ticker lease: %s", exc)

    def _tick(self, value: int) -> dict[str, Any]:
        """The ticker event's data: the fields the old /stream-real-time clients read."""
        return {
            "timestamp": dt.datetime.now(dt.UTC).isoformat(),
            "value": value,
            "status": "active",
            "leader": self.node,
        }
