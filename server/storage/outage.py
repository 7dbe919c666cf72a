"""What "Redis is not there right now" means, and how long a user of it waits before trying again.

The cache, the rate limiter and the feed each keep serving without Redis (from process memory,
by fail_mode, by retrying the reader). They share the same two things: which exceptions mean
an outage rather than a bug, and a down-until timer, so a dead Redis costs one failed attempt
per `retry_interval` instead of one per request, with one log line when it goes and one when
it comes back.
"""

from __future__ import annotations

import logging
import time

import redis.exceptions as redis_exc

__all__ = ["REDIS_DOWN", "REDIS_FAILED", "Outage"]

# Redis failures that mean "Redis is not there right now" (refused, reset, timed out, still
# loading its data set): the caller degrades instead of failing the request.
REDIS_DOWN: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    redis_exc.ConnectionError,
    redis_exc.TimeoutError,
    redis_exc.BusyLoadingError,
)
# Wider, for callers that must never fail because of Redis: a Redis that answers with an error
# (OOM under maxmemory, LOADING or a failed AUTH as the rate limiter's lean RESP connection
# reports them, a key holding another type) leaves them without an answer just as an outage
# does. The rate limiter's check (fail_mode answers, never a 500) and the feed's background
# loops (reader, ticker: nothing would restart them) catch this set.
REDIS_FAILED: tuple[type[BaseException], ...] = (*REDIS_DOWN, redis_exc.RedisError)


class Outage:
    """The down-until retry of one user of Redis.

    After a failure Redis is skipped for `retry_interval` seconds, then tried again by the next
    caller; a success ends the outage. The failure that begins an outage and the success that
    ends it are logged once each (`down` gets the exception's type and text as `%s: %s`).
    """

    __slots__ = ("_down", "_log", "_up", "down_until", "failures", "outages", "retry_interval")

    def __init__(self, log: logging.Logger, retry_interval: float, *, down: str, up: str) -> None:
        self._log = log
        self._down = down
        self._up = up
        self.retry_interval = retry_interval
        self.down_until = 0.0  # 0 while Redis answers; else the monotonic time of the next attempt
        self.failures = 0  # failed attempts
        self.outages = 0  # outages begun

    @property
    def active(self) -> bool:
        """In an outage: the last attempt failed and none has succeeded since."""
        return self.down_until != 0.0

    def usable(self) -> bool:
        """Try Redis now? Yes outside an outage, and once its retry time has come."""
        return not self.down_until or time.monotonic() >= self.down_until

    def failed(self, exc: BaseException) -> bool:
        """Record a failed attempt; True when it begins an outage (then logged)."""
        self.failures += 1
        began = not self.down_until
        self.down_until = time.monotonic() + self.retry_interval
        if began:
            self.outages += 1
            self._log.warning(self._down, type(exc).__name__, exc)
        return began

    def ok(self) -> None:
        """Record a success: an outage in progress ends (then logged)."""
        if self.down_until:
            self.down_until = 0.0
            self._log.warning(self._up)
