"""L2: the cache's entries in Redis, shared by every process, and the loader locks beside them.

An entry is stored for its TTL (and grace) plus a little random jitter, so that keys written
together do not all expire together. Redis down: every method here degrades (no value, no
lock, nothing stored), a warning once per outage and a counter (server/storage/outage.py), and
Redis is tried again every `retry_interval` seconds until it answers.
"""

from __future__ import annotations

import contextlib
import logging
import random
import secrets
import time

import redis.asyncio as aioredis

from server.cache.entry import GROUP_PREFIX, Entry, decode
from server.cache.stats import Stats
from server.config import CacheConfig
from server.storage.outage import REDIS_DOWN, Outage

log = logging.getLogger("hotpath.cache")

# Release the loader lock only if it still holds our token (it may have expired and been taken).
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
# Delete every key of a group and the group itself, atomically.
_DROP_GROUP = (
    "local keys = redis.call('smembers', KEYS[1]) "
    "for _, k in ipairs(keys) do redis.call('del', k) end "
    "redis.call('del', KEYS[1]) return #keys"
)


class SharedLayer:
    """The cache's connections to Redis (commands, and the subscription's pool of its own), its
    outage, and the commands L2 sends."""

    def __init__(self, redis: aioredis.Redis, config: CacheConfig, stats: Stats) -> None:
        self.redis = redis
        self._config = config
        self._stats = stats
        self.outage = Outage(
            log,
            config.retry_interval,
            down="Redis unavailable (%s: %s): cache serves from process memory and loaders until it is back",
            up="Redis is back: the shared cache layer is in use again",
        )
        # The subscription gets a pool of its own: closing that pool at shutdown closes the
        # subscribed connection whatever state the cancelled listener left it in.
        pool = redis.connection_pool
        self.sub_pool = aioredis.ConnectionPool(
            connection_class=pool.connection_class, **pool.connection_kwargs
        )
        self.sub = aioredis.Redis(connection_pool=self.sub_pool)
        self._release = redis.register_script(_RELEASE)
        self._drop_group = redis.register_script(_DROP_GROUP)

    # ------------------------------------------------------------------ Redis health

    def usable(self) -> bool:
        return self.outage.usable()

    async def failed(self, exc: BaseException) -> None:
        """A command failed with one of REDIS_DOWN: counted, and an outage begins if none has."""
        self._stats.redis_errors += 1
        if self.outage.failed(exc):
            self._stats.degraded += 1
            # Every connection to the server that went away is dropped now, the subscription's
            # included, so that each fails within this outage rather than once more after Redis
            # is back (which would count as another outage): idle pooled connections reconnect
            # when next used, the subscription loop resubscribes.
            with contextlib.suppress(Exception):
                await self.redis.connection_pool.disconnect(inuse_connections=False)
            with contextlib.suppress(Exception):
                await self.sub_pool.disconnect()

    def ok(self) -> None:
        self.outage.ok()

    # ------------------------------------------------------------------ entries

    async def get(self, key: str) -> Entry | None:
        """The entry of `key` unless missing or past its stale time (None too while Redis is down)."""
        if not self.usable():
            return None
        try:
            raw = await self.redis.get(key)
        except REDIS_DOWN as exc:
            await self.failed(exc)
            return None
        self.ok()
        if raw is None:
            return None
        entry = decode(raw if isinstance(raw, bytes) else raw.encode())
        return entry if time.time() < entry.stale_until else None

    async def set(self, key: str, raw: bytes, entry: Entry, group: str | None) -> None:
        """Store `raw` (the bytes of `entry`) until its stale time plus jitter, in its group."""
        if not self.usable():
            return
        life = entry.stale_until - time.time()
        ms = max(1, int(life * 1000 * (1.0 + random.uniform(0.0, self._config.jitter))))
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
            await self.failed(exc)
            return
        self.ok()

    async def delete(self, keys: list[str], groups: list[str]) -> None:
        """Delete these keys and every key of these groups (raises REDIS_DOWN: the caller decides)."""
        if keys:
            await self.redis.delete(*keys)
        for group in groups:
            await self._drop_group(keys=[GROUP_PREFIX + group])

    # ------------------------------------------------------------------ loader locks

    async def lock(self, key: str) -> str | None:
        """The token of the loader lock of `key` if we got it; None if another process holds it
        or Redis is down."""
        if not self.usable():
            return None
        token = secrets.token_hex(8)
        try:
            got = await self.redis.set(key + ":lock", token, nx=True, px=int(self._config.lock_ttl * 1000))
        except REDIS_DOWN as exc:
            await self.failed(exc)
            return None
        self.ok()
        return token if got else None

    async def unlock(self, key: str, token: str) -> None:
        if not self.usable():
            return
        try:
            await self._release(keys=[key + ":lock"], args=[token])
        except REDIS_DOWN as exc:
            await self.failed(exc)
