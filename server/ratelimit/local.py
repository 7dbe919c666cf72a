"""The rate limiter's fallback while Redis is down (fail_mode = local): the same sliding
windows in process memory."""

from __future__ import annotations

import time
from collections import deque

from server.ratelimit.policy import Decision, Policy


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
