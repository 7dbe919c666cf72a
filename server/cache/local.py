"""L1: the bounded in-process LRU, by entries and by bytes, with the keys of each group."""

from __future__ import annotations

import time
from collections import OrderedDict

from server.cache.entry import Entry
from server.cache.stats import Stats


class LocalCache:
    """At most `max_entries` entries and `max_bytes` bytes of packed values, least recently
    used first out. An entry past its stale time is never returned (it is dropped when met);
    between its fresh and stale times get() returns it for the caller to serve stale."""

    def __init__(self, max_entries: int, max_bytes: int, stats: Stats) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.bytes = 0
        self._groups: dict[str, set[str]] = {}
        self._stats = stats

    def peek(self, key: str) -> Entry | None:
        """The fresh entry of `key`, if any, counting a hit (the middleware's fast path)."""
        entry = self.entries.get(key)
        if entry is None or time.time() >= entry.fresh_until:
            return None
        self.entries.move_to_end(key)
        self._stats.hits_l1 += 1
        return entry

    def get(self, key: str, now: float) -> Entry | None:
        """The entry of `key` unless past its stale time at `now` (wall clock); fresh or not."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        if now >= entry.stale_until:
            self.drop(key)
            self._stats.expired += 1
            return None
        self.entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: Entry) -> None:
        """Store `entry` (unless it alone is over max_bytes), evicting the least recently used."""
        if entry.size > self.max_bytes:
            return
        self.drop(key)
        self.entries[key] = entry
        self.bytes += entry.size
        if entry.group is not None:
            self._groups.setdefault(entry.group, set()).add(key)
        while len(self.entries) > self.max_entries or self.bytes > self.max_bytes:
            oldest = next(iter(self.entries))
            self.drop(oldest)
            self._stats.evictions += 1

    def drop(self, key: str) -> None:
        entry = self.entries.pop(key, None)
        if entry is None:
            return
        self.bytes -= entry.size
        if entry.group is not None:
            keys = self._groups.get(entry.group)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._groups[entry.group]

    def drop_group(self, group: str) -> None:
        for key in list(self._groups.get(group, ())):
            self.drop(key)

    def clear(self) -> None:
        self.entries.clear()
        self._groups.clear()
        self.bytes = 0
