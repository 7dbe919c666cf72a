"""Invalidation across processes: pub/sub with acknowledgements, and the subscription loop.

Invalidating deletes the key (or a group of keys) in Redis and publishes it; every process drops
it from L1 and acknowledges, and the writer waits (bounded) for as many acknowledgements as
PUBLISH reported listeners, so a write that has returned is never followed by a stale read.
A load that spans an invalidation of its key (or group) does not keep what it read: see
`epoch` and `dropped_since()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

import msgpack

from server.cache.local import LocalCache
from server.cache.shared import SharedLayer
from server.cache.stats import Stats
from server.config import CacheConfig
from server.http.packing import pack, unpack
from server.storage.outage import REDIS_DOWN

log = logging.getLogger("hotpath.cache")


class Invalidation:
    """This process's side of invalidation: it sends them, and (from `start()` until `stop()`)
    a reconnecting subscription hears every process's, its own included."""

    def __init__(self, shared: SharedLayer, local: LocalCache, stats: Stats, config: CacheConfig) -> None:
        self._shared = shared
        self._local = local
        self._stats = stats
        self._wait = config.invalidate_wait
        # Invalidations go out per Redis database, so separate deployments (and test runs)
        # sharing one Redis server never hear each other.
        db = shared.redis.connection_pool.connection_kwargs.get("db", 0)
        self.channel = f"{config.channel}:{db}"
        # Acknowledgements of our invalidations come back on a channel of this cache's own, to
        # the same subscription: a writer waits on a local future, holding no Redis connection
        # (a blocking pop per waiting write ran the shared pool dry under concurrent writes).
        self._reply_channel = f"{self.channel}:ack:{secrets.token_hex(8)}"
        self._waiting: dict[str, _AckWait] = {}
        # A load that spans an invalidation of its key (or group) must not store what it read:
        # every invalidation gets a number, kept per key and group (bounded, see drop_local).
        self.epoch = 0
        self._dropped: dict[str, int] = {}
        self._cleared_at = 0
        self.subscribed = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._closing = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self, timeout: float) -> None:
        """Subscribe (a reconnecting task owned by this object), waiting up to `timeout` for the
        subscription so that no invalidation is missed once serving."""
        self._listener = asyncio.get_running_loop().create_task(self._listen_forever())
        try:
            await asyncio.wait_for(self.subscribed.wait(), timeout)
        except TimeoutError:
            log.warning("cache not subscribed to invalidations after %g s; still trying", timeout)

    async def stop(self) -> None:
        # _closing as well as cancel(): a cancellation that lands inside redis-py while it
        # connects may come out as a ConnectionError, which the listener would retry forever.
        self._closing = True
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
        await self._shared.sub_pool.disconnect()
        if listener is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        await self._shared.sub_pool.disconnect()

    @property
    def closing(self) -> bool:
        return self._closing

    # ------------------------------------------------------------------ sending

    async def invalidate(self, keys: list[str], groups: list[str]) -> None:
        """Drop these keys and groups here, in Redis and (acknowledged) in every other process."""
        self.drop_local(keys, groups)
        self._stats.invalidations_sent += 1
        shared = self._shared
        if not shared.usable():
            return
        token = secrets.token_hex(8)
        wait = self._waiting[token] = _AckWait(asyncio.get_running_loop().create_future())
        message = pack([keys, groups, self._reply_channel, token])
        try:
            await shared.delete(keys, groups)
            # every process (this one too) acknowledges once it has dropped the key from L1
            wait.expect(int(await shared.redis.publish(self.channel, message)))
            try:
                await asyncio.wait_for(asyncio.shield(wait.done), self._wait)
            except TimeoutError:
                log.warning("invalidation acknowledged by %d of %d processes in time", wait.got, wait.needed)
            # a loader elsewhere may have written the old value between our delete and its ack
            await shared.delete(keys, groups)
        except REDIS_DOWN as exc:
            await shared.failed(exc)
            return
        finally:
            del self._waiting[token]
        shared.ok()

    # ------------------------------------------------------------------ what was dropped, when

    def drop_local(self, keys: list[str], groups: list[str]) -> None:
        """Drop these keys and groups from L1, marking them dropped as of a new epoch."""
        self.epoch += 1
        if len(self._dropped) > 10_000:  # forget the marks: every load in flight counts as dropped
            self._dropped.clear()
            self._cleared_at = self.epoch
        for key in keys:
            self._dropped[key] = self.epoch
            self._local.drop(key)
        for group in groups:
            self._dropped["\0" + group] = self.epoch
            self._local.drop_group(group)

    def dropped_since(self, epoch: int, key: str, group: str | None) -> bool:
        """Was `key` (or its group) invalidated after `epoch`? Then what was read is not kept."""
        if self._cleared_at > epoch or self._dropped.get(key, -1) > epoch:
            return True
        return group is not None and self._dropped.get("\0" + group, -1) > epoch

    def _forget_everything(self) -> None:
        self.epoch += 1
        self._cleared_at = self.epoch
        self._local.clear()

    # ------------------------------------------------------------------ receiving

    def _on_message(self, data: bytes) -> tuple[str, str] | None:
        """Drop what an invalidation names; (reply channel, token) to acknowledge it on."""
        try:
            keys, groups, reply, token = unpack(data)
        except (ValueError, TypeError, msgpack.UnpackException):
            log.warning("ignoring a malformed invalidation message")
            return None
        self._stats.invalidations_received += 1
        self.drop_local([str(k) for k in keys], [str(g) for g in groups])
        return str(reply), str(token)

    def _on_ack(self, data: bytes) -> None:
        wait = self._waiting.get(data.decode(errors="replace"))
        if wait is not None:
            wait.acknowledged()

    async def _listen_forever(self) -> None:
        delay = 0.1
        first = True
        while not self._closing:
            pubsub = self._shared.sub.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel, self._reply_channel)
                if not first:
                    # invalidations published while we were not listening are lost: start afresh
                    self._forget_everything()
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
                        await self._shared.redis.publish(reply[0], reply[1])
            except REDIS_DOWN as exc:
                if self.closing:
                    return
                await self._shared.failed(exc)
                self.subscribed.clear()
                # not in a finally: when cancelled at shutdown, stop() disconnects the pool
                with contextlib.suppress(*REDIS_DOWN, RuntimeError):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


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
