"""Two-layer cache: a bounded in-process LRU (L1) in front of Redis (L2), shared by every process.

- L1 holds at most `max_entries` entries and `max_bytes` bytes of packed values; an entry past its
  TTL is never served (within its grace window it may be served stale while one refresh runs).
- L2 stores the same packed bytes with the TTL plus a little random jitter, so keys written
  together do not all expire together. An L2 hit fills L1.
- Values are msgpack with extension types for datetime, date, Decimal and UUID; anything else is
  refused with TypeError. Never pickle: bytes in Redis must not be able to run code here.
- Single flight: concurrent misses of one key in a process share one load; across processes a
  SET NX PX lock with a random token (released by a compare-and-delete script) lets one process
  load while the others poll L2 for its result, for a bounded time, then load themselves.
- Invalidation deletes the key (or a group of keys) in Redis and publishes it; every process
  drops it from L1 and acknowledges, and the writer waits (bounded) for as many acknowledgements
  as PUBLISH reported listeners, so a write that has returned is never followed by a stale read.
- Redis down: L1 + loader only, a warning once per outage, a counter, retried every
  `retry_interval` seconds until it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from dataclasses import dataclass
from functools import update_wrapper
from typing import Any, Generic, ParamSpec, TypeVar

import msgpack
import redis.asyncio as aioredis

from server.config import CacheConfig
from server.errors import NotFound
from server.http.codec import pack, unpack
from server.storage.outage import REDIS_DOWN, Outage

log = logging.getLogger("hotpath.cache")

P = ParamSpec("P")
R = TypeVar("R")
KEY_PREFIX = "hotpath:v1:"
GROUP_PREFIX = "hotpath:v1:group:"

# msgpack extension codes (stable: they are part of the stored format, "v1" in every key)

# Release the loader lock only if it still holds our token (it may have expired and been taken).
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
# Delete every key of a group and the group itself, atomically.
_DROP_GROUP = (
    "local keys = redis.call('smembers', KEYS[1]) "
    "for _, k in ipairs(keys) do redis.call('del', k) end "
    "redis.call('del', KEYS[1]) return #keys"
)


def make_key(namespace: str, parts: Any) -> str:
    """`hotpath:v1:<namespace>:<hash of the packed parts>`: versioned, readable in redis-cli."""
    digest = hashlib.blake2b(pack(parts), digest_size=16).hexdigest()
    return f"{KEY_PREFIX}{namespace}:{digest}"


# ----------------------------------------------------------------------------- entries and stats


@dataclass(slots=True)
class Entry:
    """One cached value: `missing` holds the detail of a cached not-found instead of a value."""

    value: Any
    etag: str
    fresh_until: float  # wall clock (time.time()), shared between processes through L2
    stale_until: float
    size: int
    missing: str | None = None
    group: str | None = None
    # what a caller derived from the value once (the middleware's ready-made headers)
    derived: Any = None

    def result(self) -> Any:
        if self.missing is not None:
            raise NotFound(self.missing)
        return self.value


@dataclass(frozen=True, slots=True)
class Hit(Generic[R]):
    """A value with where it came from: "hit-l1", "hit-l2" or "miss", and its ETag; `missing`
    is the detail of a cached not-found (only with raise_missing=False; value is then None)."""

    value: R
    source: str
    etag: str
    missing: str | None = None


def _hit(entry: Entry, source: str, raise_missing: bool) -> Hit[Any]:
    if raise_missing or entry.missing is None:
        return Hit(entry.result(), source, entry.etag)
    return Hit(None, source, entry.etag, entry.missing)


def _normal_param(value: object) -> str:
    # isdecimal, what a route's \\d matches (isdigit also takes "²", which int() refuses)
    if isinstance(value, str) and value.isdecimal():
        try:
            return str(int(value))
        except ValueError:  # beyond int()'s 4,300 digits: no id is that long, it stays as sent
            return value
    return str(value)


def response_group(route: str, **params: object) -> str:
    """The group of every cached variant (representation, query, encoding) of one route's
    response for these path parameters: what a write invalidates."""
    # "007" and "7" are the same user: digits are normalised, or a write would miss a variant
    values = {k: _normal_param(v) for k, v in params.items()}
    return route + ":" + ",".join(f"{k}={values[k]}" for k in sorted(values))


@dataclass
class Stats:
    hits_l1: int = 0
    hits_l2: int = 0
    misses_l1: int = 0
    misses_l2: int = 0
    stale_served: int = 0
    evictions: int = 0
    expired: int = 0
    loads: int = 0
    load_errors: int = 0
    negative_stored: int = 0
    lock_waits: int = 0
    lock_wait_timeouts: int = 0
    invalidations_sent: int = 0
    invalidations_received: int = 0
    degraded: int = 0
    redis_errors: int = 0


class Cache:
    """The two-layer cache of one process. Build it in a cleanup context; `start()` subscribes to
    invalidations, `close()` ends the subscription and every background refresh."""

    def __init__(self, redis: aioredis.Redis, config: CacheConfig) -> None:
        self.redis = redis
        self.config = config
        # Invalidations go out per Redis database, so separate deployments (and test runs)
        # sharing one Redis server never hear each other.
        self.channel = f"{config.channel}:{redis.connection_pool.connection_kwargs.get('db', 0)}"
        self.stats = Stats()
        self._l1: OrderedDict[str, Entry] = OrderedDict()
        self._l1_bytes = 0
        self._groups: dict[str, set[str]] = {}
        self._inflight: dict[str, asyncio.Future[Entry]] = {}
        self._refreshing: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        # A load that spans an invalidation of its key (or group) must not store what it read:
        # every invalidation gets a number, kept per key and group (bounded, see _mark_dropped).
        self._epoch = 0
        self._dropped: dict[str, int] = {}
        self._cleared_at = 0
        self._outage = Outage(
            log,
            config.retry_interval,
            down="Redis unavailable (%s: %s): cache serves from process memory and loaders until it is back",
            up="Redis is back: the shared cache layer is in use again",
        )
        self._listener: asyncio.Task[None] | None = None
        self._closing = False
        # For callers that derive keys from raw request parts: raw parts -> (key, group), so a
        # hit costs a dict lookup instead of packing and hashing (cleared when it grows large).
        self.key_memo: dict[Hashable, tuple[str, str]] = {}
        # The subscription gets a pool of its own: closing that pool at shutdown closes the
        # subscribed connection whatever state the cancelled listener left it in.
        pool = redis.connection_pool
        self._sub_pool = aioredis.ConnectionPool(
            connection_class=pool.connection_class, **pool.connection_kwargs
        )
        self._sub = aioredis.Redis(connection_pool=self._sub_pool)
        self.subscribed = asyncio.Event()
        # Acknowledgements of our invalidations come back on a channel of this cache's own, to
        # the same subscription: a writer waits on a local future, holding no Redis connection
        # (a blocking pop per waiting write ran the shared pool dry under concurrent writes).
        self._reply_channel = f"{self.channel}:ack:{secrets.token_hex(8)}"
        self._waiting: dict[str, _AckWait] = {}
        self._release = redis.register_script(_RELEASE)
        self._drop_group = redis.register_script(_DROP_GROUP)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, timeout: float = 5.0) -> None:
        """Subscribe to invalidations (a reconnecting task owned by this cache), waiting up to
        `timeout` for the subscription so that no invalidation is missed once serving."""
        self._listener = asyncio.get_running_loop().create_task(self._listen_forever())
        try:
            await asyncio.wait_for(self.subscribed.wait(), timeout)
        except TimeoutError:
            log.warning("cache not subscribed to invalidations after %g s; still trying", timeout)

    async def close(self) -> None:
        # _closing as well as cancel(): a cancellation that lands inside redis-py while it
        # connects may come out as a ConnectionError, which the listener would retry forever.
        self._closing = True
        tasks = [*self._tasks, *([self._listener] if self._listener else [])]
        for task in tasks:
            task.cancel()
        await self._sub_pool.disconnect()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self._listener = None
        await self._sub_pool.disconnect()

    @property
    def closing(self) -> bool:
        return self._closing

    # ------------------------------------------------------------------ Redis health

    @property
    def degraded(self) -> bool:
        return self._outage.active

    def _l2_usable(self) -> bool:
        return self._outage.usable()

    async def _redis_failed(self, exc: BaseException) -> None:
        self.stats.redis_errors += 1
        if self._outage.failed(exc):
            self.stats.degraded += 1
            # Every connection to the server that went away is dropped now, the subscription's
            # included, so that each fails within this outage rather than once more after Redis
            # is back (which would count as another outage): idle pooled connections reconnect
            # when next used, the subscription loop resubscribes.
            with contextlib.suppress(Exception):
                await self.redis.connection_pool.disconnect(inuse_connections=False)
            with contextlib.suppress(Exception):
                await self._sub_pool.disconnect()

    def _redis_ok(self) -> None:
        self._outage.ok()

    # ------------------------------------------------------------------ L1

    def _l1_get(self, key: str, now: float) -> Entry | None:
        entry = self._l1.get(key)
        if entry is None:
            return None
        if now >= entry.stale_until:
            self._l1_drop(key)
            self.stats.expired += 1
            return None
        self._l1.move_to_end(key)
        return entry

    def _l1_put(self, key: str, entry: Entry) -> None:
        if entry.size > self.config.max_bytes:
            return
        self._l1_drop(key)
        self._l1[key] = entry
        self._l1_bytes += entry.size
        if entry.group is not None:
            self._groups.setdefault(entry.group, set()).add(key)
        s = self.config
        while len(self._l1) > s.max_entries or self._l1_bytes > s.max_bytes:
            oldest = next(iter(self._l1))
            self._l1_drop(oldest)
            self.stats.evictions += 1

    def _l1_drop(self, key: str) -> None:
        entry = self._l1.pop(key, None)
        if entry is None:
            return
        self._l1_bytes -= entry.size
        if entry.group is not None:
            keys = self._groups.get(entry.group)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._groups[entry.group]

    def _l1_drop_group(self, group: str) -> None:
        for key in list(self._groups.get(group, ())):
            self._l1_drop(key)

    @property
    def l1_size(self) -> int:
        return len(self._l1)

    @property
    def l1_bytes(self) -> int:
        return self._l1_bytes

    def peek(self, key: str) -> Entry | None:
        """The fresh L1 entry of `key`, if any, counting a hit (the middleware's fast path)."""
        entry = self._l1.get(key)
        if entry is None or time.time() >= entry.fresh_until:
            return None
        self._l1.move_to_end(key)
        self.stats.hits_l1 += 1
        return entry

    # ------------------------------------------------------------------ encode / decode

    def _encode(
        self, value: Any, ttl: float, grace: float, missing: str | None, group: str | None
    ) -> tuple[Entry, bytes]:
        now = time.time()
        body = pack(value) if missing is None else b""
        etag = hashlib.blake2b(body or (missing or "").encode(), digest_size=12).hexdigest()
        entry = Entry(value, etag, now + ttl, now + ttl + grace, len(body) + 64, missing, group)
        raw = pack([entry.fresh_until, entry.stale_until, etag, missing, group, body])
        return entry, raw

    def _decode(self, raw: bytes) -> Entry:
        fresh_until, stale_until, etag, missing, group, body = unpack(raw)
        value = unpack(body) if missing is None else None
        return Entry(value, etag, fresh_until, stale_until, len(body) + 64, missing, group)

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
        no-cache). `group` tags the key so `invalidate_group` can drop it with its siblings.
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
            entry = self._l1_get(key, now)
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
        entry = self._l1_get(key, now)
        if entry is not None and now < entry.fresh_until:
            self.stats.hits_l1 += 1
            return _hit(entry, "hit-l1", True)
        self.stats.misses_l1 += 1
        entry = await self._l2_get(key)
        if entry is None or time.time() >= entry.fresh_until:
            self.stats.misses_l2 += 1
            return None
        self.stats.hits_l2 += 1
        self._l1_put(key, entry)
        return _hit(entry, "hit-l2", True)

    async def set(self, namespace: str, parts: Any, value: Any, ttl: float | None = None) -> None:
        """Store `value` under (namespace, parts) in both layers."""
        key = make_key(namespace, parts)
        entry, raw = self._encode(value, self.config.default_ttl if ttl is None else ttl, 0.0, None, None)
        self._l1_put(key, entry)
        await self._l2_set(key, raw, entry, None)

    async def _l2_get(self, key: str) -> Entry | None:
        if not self._l2_usable():
            return None
        try:
            raw = await self.redis.get(key)
        except REDIS_DOWN as exc:
            await self._redis_failed(exc)
            return None
        self._redis_ok()
        if raw is None:
            return None
        entry = self._decode(raw if isinstance(raw, bytes) else raw.encode())
        return entry if time.time() < entry.stale_until else None

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
        epoch = self._epoch
        if not refresh:
            entry = await self._l2_get(key)
            if entry is not None and time.time() < entry.fresh_until:
                self.stats.hits_l2 += 1
                self._fill_l1(key, entry, epoch)
                return entry, "hit-l2"
            self.stats.misses_l2 += 1
        token = await self._lock(key)
        if token is None and self._l2_usable() and not refresh:
            # another process is loading: wait for its value, bounded, then load ourselves
            self.stats.lock_waits += 1
            deadline = time.monotonic() + self.config.lock_wait
            while time.monotonic() < deadline:
                await asyncio.sleep(self.config.lock_poll)
                entry = await self._l2_get(key)
                if entry is not None and time.time() < entry.fresh_until:
                    self.stats.hits_l2 += 1
                    self._fill_l1(key, entry, epoch)
                    return entry, "hit-l2"
                if not self._l2_usable():
                    break
            else:
                self.stats.lock_wait_timeouts += 1
        try:
            entry = await self._load(key, loader, ttl, grace, neg, group)
        finally:
            if token is not None:
                await self._unlock(key, token)
        return entry, "miss"

    def _fill_l1(self, key: str, entry: Entry, epoch: int) -> None:
        # read before an invalidation of this key arrived: may be the old value, serve it once
        if not self._dropped_since(epoch, key, entry.group):
            self._l1_put(key, entry)

    async def _load(
        self,
        key: str,
        loader: Callable[[], Awaitable[Any]],
        ttl: float,
        grace: float,
        neg: float,
        group: str | None,
    ) -> Entry:
        epoch = self._epoch
        self.stats.loads += 1
        try:
            value = await loader()
        except NotFound as exc:
            if neg <= 0:
                raise
            entry, raw = self._encode(None, neg, 0.0, exc.detail, group)
            self.stats.negative_stored += 1
        except Exception:
            self.stats.load_errors += 1
            raise
        else:
            entry, raw = self._encode(value, ttl, grace, None, group)
        if not self._dropped_since(epoch, key, group):
            # an invalidation seen while loading may concern this value: then it is not kept
            self._l1_put(key, entry)
            await self._l2_set(key, raw, entry, group)
        return entry

    async def _l2_set(self, key: str, raw: bytes, entry: Entry, group: str | None) -> None:
        if not self._l2_usable():
            return
        life = entry.stale_until - time.time()
        ms = max(1, int(life * 1000 * (1.0 + random.uniform(0.0, self.config.jitter))))
        try:
            if group is None:
                await self.redis.set(key, raw, px=ms)
            else:
                gkey = GROUP_PREFIX + group
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.set(key, raw, px=ms)
                    pipe.sadd(gkey, key)
                    pipe.pexpire(gkey, ms, gt=True)
                    pipe.pexpire(gkey, ms, nx=True)
                    await pipe.execute()
        except REDIS_DOWN as exc:
            await self._redis_failed(exc)
            return
        self._redis_ok()

    async def _lock(self, key: str) -> str | None:
        if not self._l2_usable():
            return None
        token = secrets.token_hex(8)
        try:
            got = await self.redis.set(key + ":lock", token, nx=True, px=int(self.config.lock_ttl * 1000))
        except REDIS_DOWN as exc:
            await self._redis_failed(exc)
            return None
        self._redis_ok()
        return token if got else None

    async def _unlock(self, key: str, token: str) -> None:
        if not self._l2_usable():
            return
        try:
            await self._release(keys=[key + ":lock"], args=[token])
        except REDIS_DOWN as exc:
            await self._redis_failed(exc)

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

    # ------------------------------------------------------------------ invalidation

    async def invalidate(self, namespace: str, parts: Any) -> None:
        """Drop one key everywhere: here, in Redis, and (acknowledged) in every other process."""
        await self._invalidate([make_key(namespace, parts)], [])

    async def invalidate_groups(self, *groups: str) -> None:
        """Drop every key stored with one of these groups, everywhere."""
        await self._invalidate([], list(groups))

    def invalidate_group_soon(self, group: str) -> None:
        """invalidate_groups from synchronous code (a NOTIFY callback), as an owned task."""
        self._drop_local([], [group])
        self.spawn(self.invalidate_groups(group))

    async def _invalidate(self, keys: list[str], groups: list[str]) -> None:
        self._drop_local(keys, groups)
        self.stats.invalidations_sent += 1
        if not self._l2_usable():
            return
        token = secrets.token_hex(8)
        wait = self._waiting[token] = _AckWait(asyncio.get_running_loop().create_future())
        message = pack([keys, groups, self._reply_channel, token])
        try:
            await self._delete_l2(keys, groups)
            # every process (this one too) acknowledges once it has dropped the key from L1
            wait.expect(int(await self.redis.publish(self.channel, message)))
            try:
                await asyncio.wait_for(asyncio.shield(wait.done), self.config.invalidate_wait)
            except TimeoutError:
                log.warning("invalidation acknowledged by %d of %d processes in time", wait.got, wait.needed)
            # a loader elsewhere may have written the old value between our delete and its ack
            await self._delete_l2(keys, groups)
        except REDIS_DOWN as exc:
            await self._redis_failed(exc)
            return
        finally:
            del self._waiting[token]
        self._redis_ok()

    async def _delete_l2(self, keys: list[str], groups: list[str]) -> None:
        if keys:
            await self.redis.delete(*keys)
        for group in groups:
            await self._drop_group(keys=[GROUP_PREFIX + group])

    def _drop_local(self, keys: list[str], groups: list[str]) -> None:
        self._epoch += 1
        if len(self._dropped) > 10_000:  # forget the marks: every load in flight counts as dropped
            self._dropped.clear()
            self._cleared_at = self._epoch
        for key in keys:
            self._dropped[key] = self._epoch
            self._l1_drop(key)
        for group in groups:
            self._dropped["\0" + group] = self._epoch
            self._l1_drop_group(group)

    def _dropped_since(self, epoch: int, key: str, group: str | None) -> bool:
        if self._cleared_at > epoch or self._dropped.get(key, -1) > epoch:
            return True
        return group is not None and self._dropped.get("\0" + group, -1) > epoch

    def _on_message(self, data: bytes) -> tuple[str, str] | None:
        """Drop what an invalidation names; (reply channel, token) to acknowledge it on."""
        try:
            keys, groups, reply, token = unpack(data)
        except (ValueError, TypeError, msgpack.UnpackException):
            log.warning("ignoring a malformed invalidation message")
            return None
        self.stats.invalidations_received += 1
        self._drop_local([str(k) for k in keys], [str(g) for g in groups])
        return str(reply), str(token)

    def _on_ack(self, data: bytes) -> None:
        wait = self._waiting.get(data.decode(errors="replace"))
        if wait is not None:
            wait.acknowledged()

    async def _listen_forever(self) -> None:
        delay = 0.1
        first = True
        while not self._closing:
            pubsub = self._sub.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel, self._reply_channel)
                if not first:
                    # invalidations published while we were not listening are lost: start afresh
                    self._epoch += 1
                    self._cleared_at = self._epoch
                    self._l1.clear()
                    self._groups.clear()
                    self._l1_bytes = 0
                first = False
                self.subscribed.set()
                delay = 0.1
                while not self._closing:
                    msg = await pubsub.get_message(timeout=30.0)
                    if msg is None:
                        await pubsub.ping()
                        continue
                    if msg["type"] != "message":
                        continue
                    channel = msg["channel"]
                    if channel == self._reply_channel or channel == self._reply_channel.encode():
                        self._on_ack(msg["data"])
                        continue
                    reply = self._on_message(msg["data"])
                    if reply is not None:
                        await self.redis.publish(reply[0], reply[1])
            except REDIS_DOWN as exc:
                if self.closing:
                    return
                await self._redis_failed(exc)
                self.subscribed.clear()
                # not in a finally: when cancelled at shutdown, close() disconnects the pool
                with contextlib.suppress(*REDIS_DOWN, RuntimeError):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    # ------------------------------------------------------------------ stats

    def snapshot(self) -> dict[str, Any]:
        """Counters plus L1 size, bytes and whether Redis is currently missing."""
        out: dict[str, Any] = dict(vars(self.stats))
        out.update(
            l1_entries=len(self._l1),
            l1_bytes=self._l1_bytes,
            l1_max_entries=self.config.max_entries,
            l1_max_bytes=self.config.max_bytes,
            degraded_now=self._outage.active,
            inflight=len(self._inflight),
        )
        return out


class _AckWait:
    """Acknowledgements of one invalidation: `done` resolves once `needed` have come (they may
    arrive before PUBLISH has told us how many processes received it)."""

    __slots__ = ("done", "got", "needed")

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.got = 0
        self.needed: int | None = None

    def expect(self, needed: int) -> None:
        self.needed = needed
        self._check()

    def acknowledged(self) -> None:
        self.got += 1
        self._check()

    def _check(self) -> None:
        if self.needed is not None and self.got >= self.needed and not self.done.done():
            self.done.set_result(None)


# ----------------------------------------------------------------------------- the decorator


class CachedFunction(Generic[P, R]):
    """A service function whose results are cached: call it with the app's Cache first."""

    def __init__(
        self,
        func: Callable[P, Awaitable[R]],
        namespace: str,
        ttl: float | None,
        grace: float,
        negative_ttl: float | None,
        key: Callable[..., Hashable] | None,
    ) -> None:
        self.func = func
        self.namespace = namespace
        self.ttl = ttl
        self.grace = grace
        self.negative_ttl = negative_ttl
        self._key = key
        update_wrapper(self, func)

    def _parts(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        if self._key is not None:
            return self._key(*args, **kwargs)
        return [list(args), sorted(kwargs.items())]

    async def fetch(self, cache: Cache, *args: P.args, **kwargs: P.kwargs) -> Hit[R]:
        """The result with where it came from (hit-l1, hit-l2, miss) and its ETag."""
        parts = self._parts(*args, **kwargs)
        hit: Hit[R] = await cache.get_or_load(
            self.namespace,
            parts,
            lambda: self.func(*args, **kwargs),
            ttl=self.ttl,
            grace=self.grace,
            negative_ttl=self.negative_ttl,
        )
        return hit

    async def __call__(self, cache: Cache, *args: P.args, **kwargs: P.kwargs) -> R:
        return (await self.fetch(cache, *args, **kwargs)).value

    async def invalidate(self, cache: Cache, *args: P.args, **kwargs: P.kwargs) -> None:
        """Forget the result for these arguments, in every process."""
        await cache.invalidate(self.namespace, self._parts(*args, **kwargs))


def cached(
    namespace: str,
    *,
    ttl: float | None = None,
    grace: float = 0.0,
    negative_ttl: float | None = 0.0,
    key: Callable[..., Hashable] | None = None,
) -> Callable[[Callable[P, Awaitable[R]]], CachedFunction[P, R]]:
    """Cache an async service function per arguments: `await fn(cache, *args)`.

    The Cache comes from the caller (the app's, under the CACHE key), never from a global; the
    function itself is called without it. Arguments (or `key(*args)`) must be msgpack-able.
    `negative_ttl` > 0 also caches a NotFound the function raises.
    """

    def wrap(func: Callable[P, Awaitable[R]]) -> CachedFunction[P, R]:
        return CachedFunction(func, namespace, ttl, grace, negative_ttl, key)

    return wrap
