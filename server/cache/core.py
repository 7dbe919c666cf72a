"""The two-layer cache: get_or_load, L1 -> L2 -> single flight -> loader lock -> load, and refresh.

- L1 (local.py) is a bounded in-process LRU; an entry past its TTL is never served, except
  within its grace window, stale, while one background refresh runs.
- L2 (shared.py) is Redis, shared by every process; an L2 hit fills L1.
- Single flight: concurrent misses of one key in a process share one load; across processes a
  SET NX PX lock with a random token (released by a compare-and-delete script) lets one process
  load while the others poll L2 for its result, for a bounded time, then load themselves.
- Invalidation (invalidation.py) reaches every process before a write returns.
- Redis down: L1 + loader only (shared.py, server/storage/outage.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import Any

import redis.asyncio as aioredis

from server.cache.entry import Entry, Hit, encode, make_key
from server.cache.invalidation import Invalidation
from server.cache.local import LocalCache
from server.cache.shared import SharedLayer
from server.cache.stats import Stats, snapshot
from server.config import CacheConfig
from server.errors import NotFound

log = logging.getLogger("hotpath.cache")


def _hit(entry: Entry, source: str, raise_missing: bool) -> Hit[Any]:
    if raise_missing or entry.missing is None:
        return Hit(entry.result(), source, entry.etag)
    return Hit(None, source, entry.etag, entry.missing)


class Cache:
    """The two-layer cache of one process, composed of its parts: L1 (`local`), L2 (`shared`),
    `invalidation` and `stats`. Build it in a cleanup context; `start()` subscribes to
    invalidations, `close()` ends the subscription and every background refresh."""

    def __init__(self, redis: aioredis.Redis, config: CacheConfig) -> None:
        self.config = config
        self.stats = Stats()
        self.local = LocalCache(config.max_entries, config.max_bytes, self.stats)
        # The middleware's fast path (middlewares/cache.py): the fresh L1 entry of a key, if any.
        # The LRU's own bound method, so that a hit costs one lookup and one call, as before.
        self.peek: Callable[[str], Entry | None] = self.local.peek
        self.shared = SharedLayer(redis, config, self.stats)
        self.invalidation = Invalidation(self.shared, self.local, self.stats, config)
        self.subscribed = self.invalidation.subscribed
        self._inflight: dict[str, asyncio.Future[Entry]] = {}
        self._refreshing: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        # For callers that derive keys from raw request parts: raw parts -> (key, group), so a
        # hit costs a dict lookup instead of packing and hashing (cleared when it grows large).
        self.key_memo: dict[Hashable, tuple[str, str]] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self, timeout: float = 5.0) -> None:
        """Subscribe to invalidations, waiting up to `timeout` for the subscription so that no
        invalidation is missed once serving."""
        await self.invalidation.start(timeout)

    async def close(self) -> None:
        self._closing = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await self.invalidation.stop()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run `coro` as a task owned by this cache (cancelled and awaited by close()); once
        close() has begun, `coro` is dropped unrun."""
        if self._closing:
            # A task started now would outlive close(): nobody awaits it, and the Redis
            # connection it opens (after the pools were closed) is left open when the loop ends.
            coro.close()
            return
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ state

    @property
    def degraded(self) -> bool:
        """Redis is missing right now (L1 and loaders only)."""
        return self.shared.outage.active

    @property
    def l1_size(self) -> int:
        return len(self.local.entries)

    @property
    def l1_bytes(self) -> int:
        return self.local.bytes

    def snapshot(self) -> dict[str, Any]:
        """Counters plus L1 size, bytes and whether Redis is currently missing."""
        return snapshot(self.stats, self.local, degraded_now=self.degraded, inflight=len(self._inflight))

    # ------------------------------------------------------------------ reads

    async def get_or_load(
        self,
        namespace: str,
        parts: Any,
        loader: Callable[[], Awaitable[Any]],
        *,
        ttl: float | None = None,
        grace: float = 0.0,
        negative_ttl: float | None = None,
        group: str | None = None,
        refresh: bool = False,
        raise_missing: bool = True,
    ) -> Hit[Any]:
        """The value cached under (namespace, parts), loading it with `loader` on a miss.

        `negative_ttl` > 0 caches a NotFound raised by the loader for that long (it is raised
        again on every hit). `grace` > 0 serves an expired value for that long while one
        background refresh runs. `refresh` skips both reads and loads afresh (Cache-Control:
        no-cache). `group` tags the key so `invalidate_groups` can drop it with its siblings.
        """
        key = make_key(namespace, parts)
        return await self.get_or_load_key(
            key,
            loader,
            ttl=ttl,
            grace=grace,
            negative_ttl=negative_ttl,
            group=group,
            refresh=refresh,
            raise_missing=raise_missing,
        )

    async def get_or_load_key(
        self,
        key: str,
        loader: Callable[[], Awaitable[Any]],
        *,
        ttl: float | None = None,
        grace: float = 0.0,
        negative_ttl: float | None = None,
        group: str | None = None,
        refresh: bool = False,
        raise_missing: bool = True,
    ) -> Hit[Any]:
        """get_or_load for a key already made by make_key()."""
        ttl = self.config.default_ttl if ttl is None else ttl
        neg = self.config.negative_ttl if negative_ttl is None else negative_ttl
        now = time.time()
        if not refresh:
            entry = self.local.get(key, now)
            if entry is not None:
                if now < entry.fresh_until:
                    self.stats.hits_l1 += 1
                    return _hit(entry, "hit-l1", raise_missing)
                # expired, but within its grace window: serve it, refresh once in the background
                self.stats.stale_served += 1
                self._refresh_soon(key, loader, ttl, grace, neg, group)
                return _hit(entry, "hit-l1", raise_missing)
            self.stats.misses_l1 += 1
        fut = self._inflight.get(key)
        while fut is not None:
            try:
                entry = await asyncio.shield(fut)
            except asyncio.CancelledError:
                if not fut.cancelled():
                    raise  # we were cancelled ourselves
                fut = self._inflight.get(key)  # the loading request went away: take over
                continue
            return _hit(entry, "miss", raise_missing)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            entry, source = await self._fill(key, loader, ttl, grace, neg, group, refresh)
        except BaseException as exc:
            if not fut.done():
                if isinstance(exc, asyncio.CancelledError):
                    fut.cancel()
                else:
                    fut.set_exception(exc)
                    fut.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        else:
            fut.set_result(entry)
        finally:
            if self._inflight.get(key) is fut:
                del self._inflight[key]
        return _hit(entry, source, raise_missing)

    async def get(self, namespace: str, parts: Any) -> Hit[Any] | None:
        """The fresh value under (namespace, parts) from L1 or L2, or None (no loading)."""
        key = make_key(namespace, parts)
        now = time.time()
        entry = self.local.get(key, now)
        if entry is not None and now < entry.fresh_until:
            self.stats.hits_l1 += 1
            return _hit(entry, "hit-l1", True)
        self.stats.misses_l1 += 1
        entry = await self.shared.get(key)
        if entry is None or time.time() >= entry.fresh_until:
            self.stats.misses_l2 += 1
            return None
        self.stats.hits_l2 += 1
        self.local.put(key, entry)
        return _hit(entry, "hit-l2", True)

    async def set(self, namespace: str, parts: Any, value: Any, ttl: float | None = None) -> None:
        """Store `value` under (namespace, parts) in both layers."""
        key = make_key(namespace, parts)
        entry, raw = encode(value, self.config.default_ttl if ttl is None else ttl, 0.0, None, None)
        self.local.put(key, entry)
        await self.shared.set(key, raw, entry, None)

    async def _fill(
        self,
        key: str,
        loader: Callable[[], Awaitable[Any]],
        ttl: float,
        grace: float,
        neg: float,
        group: str | None,
        refresh: bool,
    ) -> tuple[Entry, str]:
        epoch = self.invalidation.epoch
        if not refresh:
            entry = await self.shared.get(key)
            if entry is not None and time.time() < entry.fresh_until:
                self.stats.hits_l2 += 1
                self._fill_l1(key, entry, epoch)
                return entry, "hit-l2"
            self.stats.misses_l2 += 1
        token = await self.shared.lock(key)
        if token is None and self.shared.usable() and not refresh:
            # another process is loading: wait for its value, bounded, then load ourselves
            self.stats.lock_waits += 1
            deadline = time.monotonic() + self.config.lock_wait
            while time.monotonic() < deadline:
                await asyncio.sleep(self.config.lock_poll)
                entry = await self.shared.get(key)
                if entry is not None and time.time() < entry.fresh_until:
                    self.stats.hits_l2 += 1
                    self._fill_l1(key, entry, epoch)
                    return entry, "hit-l2"
                if not self.shared.usable():
                    break
            else:
                self.stats.lock_wait_timeouts += 1
        try:
            entry = await self._load(key, loader, ttl, grace, neg, group)
        finally:
            if token is not None:
                await self.shared.unlock(key, token)
        return entry, "miss"

    def _fill_l1(self, key: str, entry: Entry, epoch: int) -> None:
        # read before an invalidation of this key arrived: may be the old value, serve it once
        if not self.invalidation.dropped_since(epoch, key, entry.group):
            self.local.put(key, entry)

    async def _load(
        self,
        key: str,
        loader: Callable[[], Awaitable[Any]],
        ttl: float,
        grace: float,
        neg: float,
        group: str | None,
    ) -> Entry:
        epoch = self.invalidation.epoch
        self.stats.loads += 1
        try:
            value = await loader()
        except NotFound as exc:
            if neg <= 0:
                raise
            entry, raw = encode(None, neg, 0.0, exc.detail, group)
            self.stats.negative_stored += 1
        except Exception:
            self.stats.load_errors += 1
            raise
        else:
            entry, raw = encode(value, ttl, grace, None, group)
        if not self.invalidation.dropped_since(epoch, key, group):
            # an invalidation seen while loading may concern this value: then it is not kept
            self.local.put(key, entry)
            await self.shared.set(key, raw, entry, group)
        return entry

    def _refresh_soon(
        self,
        key: str,
        loader: Callable[[], Awaitable[Any]],
        ttl: float,
        grace: float,
        neg: float,
        group: str | None,
    ) -> None:
        if key in self._refreshing or key in self._inflight:
            return
        self._refreshing.add(key)

        async def refresh() -> None:
            try:
                await self.get_or_load_key(
                    key, loader, ttl=ttl, grace=grace, negative_ttl=neg, group=group, refresh=True
                )
            except Exception as exc:  # the stale value keeps being served until its grace ends
                log.warning("background refresh of %s failed: %s: %s", key, type(exc).__name__, exc)
            finally:
                self._refreshing.discard(key)

        self.spawn(refresh())

    # ------------------------------------------------------------------ invalidation

    async def invalidate(self, namespace: str, parts: Any) -> None:
        """Drop one key everywhere: here, in Redis, and (acknowledged) in every other process."""
        await self.invalidation.invalidate([make_key(namespace, parts)], [])

    async def invalidate_groups(self, *groups: str) -> None:
        """Drop every key stored with one of these groups, everywhere."""
        await self.invalidation.invalidate([], list(groups))

    def invalidate_group_soon(self, group: str) -> None:
        """invalidate_groups from synchronous code (a NOTIFY callback), as an owned task."""
        self.invalidation.drop_local([], [group])
        self.spawn(self.invalidate_groups(group))
