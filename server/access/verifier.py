"""Verifying keys on every request without asking PostgreSQL each time, and hearing every
process's changes to them.

Each process keeps the active keys (by lookup prefix) in memory, and the keys it has verified
(by the exact credential sent) in a memo, so a request with a known key costs one dict lookup.
A well-formed key found nowhere is remembered as unknown for `auth.unknown_ttl` seconds
(bounded), by the key itself, never by a header text an attacker can pad.

Changes (a key made, rotated, revoked) are announced on a Redis pub/sub channel: every process
reloads that key from PostgreSQL and drops what it had verified of it, so a revoked key is
refused everywhere within the time of one message. While the subscription is up and the table
was loaded after subscribing, the table is complete: a prefix it does not hold is refused with
no PostgreSQL lookup at all (a flood of invented keys costs a dict miss each). While it is down,
nothing announced can be trusted to arrive: unknown prefixes are looked up in PostgreSQL, and
the memo is emptied at least once a second, so a revocation is still seen within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub

from server.access import tokens
from server.access.apikeys import KeyRecord, KeyStore, digest_of, split_key
from server.access.changes import announce, change_channel
from server.access.scopes import FEED_PUBLISH, METRICS
from server.config import Config
from server.errors import Unauthorized, Unavailable
from server.http.auth import Principal
from server.storage.outage import REDIS_DOWN

log = logging.getLogger("hotpath.access")

# What may go wrong while (re)loading keys: the database or Redis away.
_DOWN = (*REDIS_DOWN, OSError, asyncpg.PostgresError, asyncpg.InterfaceError, Unavailable, TimeoutError)
_MEMO_MAX = 100_000  # verified credentials kept; beyond, the memo starts afresh
# The subscription to key changes: probed after _PROBE s of silence, down after _SILENT s without
# an answer, retried at most _RETRY_MAX s apart while down (see Access._listen_forever)
_PROBE = 0.25
_SILENT = 0.75
_RETRY_MAX = 0.25
# While not live, the table reloaded from PostgreSQL is used for this long (seconds), then
# each key is looked up in PostgreSQL until it is reloaded again (each retry reloads it).
_TABLE_FRESH = 1.0
# Longest scheme and separator remembered before a credential ("Bearer "): the memo is keyed by
# the header's exact text, and a header padded with spaces (up to aiohttp's 8 KiB) is the same
# key under another text. Remembering each such text let one key fill the memo with 100,000
# headers of 8 KiB (800 MB); padded forms are verified each time instead (no I/O while live).
_SCHEME_MAX = len("Bearer ")
STREAM_SECRET = "stream_tokens"


def principal_of(record: KeyRecord) -> Principal:
    return Principal(
        key_id=record.id,
        owner=record.owner,
        name=record.name,
        scopes=frozenset(record.scopes),
        rate=record.rate,
        expires_at=record.expires_at.timestamp() if record.expires_at else None,
    )


class Access:
    """This process's view of the keys: verification, change announcements, last use."""

    def __init__(self, config: Config) -> None:
        self.config = config.auth
        self.store: KeyStore | None = None
        self.stream_secret = b""
        self._by_prefix: dict[str, KeyRecord] = {}
        self._by_id: dict[int, KeyRecord] = {}
        # credentials verified, by their header's exact text (Guard reads it directly)
        self.memo: dict[str, Principal] = {}
        self._unknown: dict[str, float] = {}
        self.used: dict[int, None] = {}  # key ids used since the last write of last_used_at
        self.live = False  # subscribed, and the table loaded since: it is complete
        self._loaded_at = -1e9  # time.monotonic() of the last load of the whole table
        self.synced = asyncio.Event()
        self._on_revoke: list[Callable[[int], None]] = []
        self._aliases: list[tuple[bytes, Principal]] = []
        for token, scope, name in (
            (config.metrics.token, METRICS, "metrics.token"),
            (config.feed.admin_token, FEED_PUBLISH, "feed.admin_token"),
        ):
            if token:
                alias = Principal(None, None, name, frozenset({scope}))
                self._aliases.append((hashlib.sha256(token.encode()).digest(), alias))
        self._redis: aioredis.Redis | None = None
        self._sub: aioredis.Redis | None = None
        self.channel = config.auth.channel
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    # ------------------------------------------------------------------ per request

    async def verify(self, token: str, sent: str | None = None) -> Principal:
        """Verify a credential the memo does not hold: a configured shared token, or a key.
        `sent`: the header's text it came in, which the memo is keyed by (the token itself when
        None). Raises Unauthorized."""
        sent = token if sent is None else sent
        principal = self.memo.get(sent)
        if principal is not None:
            if principal.expires_at is not None and principal.expires_at <= time.time():
                del self.memo[sent]
                raise Unauthorized("this key has expired", invalid=True)
            return principal
        until = self._unknown.get(token)
        if until is not None:
            if until > time.monotonic():
                raise Unauthorized("unknown, revoked or expired key", invalid=True)
            del self._unknown[token]
        given = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        for digest, alias in self._aliases:
            if hmac.compare_digest(given, digest):
                self._remember(sent, token, alias)
                return alias
        parts = split_key(token)
        if parts is None:  # refused again at no cost: not remembered (it could be 8 KiB long)
            raise Unauthorized("not a hotpath key (hp_<prefix>_<secret>)", invalid=True)
        prefix, secret = parts
        if self.live or self.store is None or time.monotonic() - self._loaded_at < _TABLE_FRESH:
            record = self._by_prefix.get(prefix)
        else:  # the table is not kept fresh (a revocation may not be heard): ask PostgreSQL
            record = await self.store.by_prefix(prefix)
        now = datetime.now(UTC)
        if record is None or not hmac.compare_digest(record.digest, digest_of(secret)):
            self._refuse(token)
            raise Unauthorized("unknown, revoked or expired key", invalid=True)
        if not record.active(now):
            self._refuse(token)
            raise Unauthorized(
                "this key has expired" if record.revoked_at is None else "this key was revoked", invalid=True
            )
        principal = principal_of(record)
        self._remember(sent, token, principal)
        self.used[record.id] = None
        return principal

    def stream_principal(self, token: str) -> Principal:
        """The principal of a stream token (POST /feed/tokens): its key's, limited to the
        token's channels and lifetime. Raises Unauthorized when it is not valid now."""
        claims = tokens.read(self.stream_secret, token)
        if claims is None:
            raise Unauthorized(
                "invalid or expired stream token; ask POST /feed/tokens for another", invalid=True
            )
        record = self._by_id.get(claims.key_id)
        if record is None or not record.active(datetime.now(UTC)):
            raise Unauthorized("the key this stream token was issued to is no longer valid", invalid=True)
        principal = principal_of(record)
        expires = (
            claims.expires_at
            if principal.expires_at is None
            else min(claims.expires_at, principal.expires_at)
        )
        return Principal(
            principal.key_id,
            principal.owner,
            principal.name,
            principal.scopes,
            principal.rate,
            expires,
            claims.channels,
        )

    def _remember(self, sent: str, token: str, principal: Principal) -> None:
        """Keep `principal` under the header text `sent` it came in, unless that text is the
        token padded (see _SCHEME_MAX)."""
        if len(sent) > len(token) + _SCHEME_MAX:
            return
        if len(self.memo) >= _MEMO_MAX:
            self.memo.clear()
        self.memo[sent] = principal

    def _refuse(self, token: str) -> None:
        """Remember a well-formed key (fixed length) as unknown, by the key itself."""
        cap = self.config.unknown_max
        if cap == 0 or self.config.unknown_ttl == 0:
            return
        if len(self._unknown) >= cap:  # the oldest goes first
            del self._unknown[next(iter(self._unknown))]
        self._unknown[token] = time.monotonic() + self.config.unknown_ttl

    # ------------------------------------------------------------------ changes

    def on_revoke(self, callback: Callable[[int], None]) -> None:
        """Call `callback(key_id)` whenever a key stops being valid here (revoked, retired)."""
        self._on_revoke.append(callback)

    def is_active(self, key_id: int) -> bool:
        record = self._by_id.get(key_id)
        return record is not None and record.active(datetime.now(UTC))

    def _apply(self, key_id: int, record: KeyRecord | None) -> None:
        """What this process knows of one key, replaced by `record` (None: gone or inactive)."""
        old = self._by_id.pop(key_id, None)
        if old is not None:
            self._by_prefix.pop(old.prefix, None)
        active = record is not None and record.active(datetime.now(UTC))
        if record is not None and active:
            self._by_id[key_id] = record
            self._by_prefix[record.prefix] = record
        for token in [t for t, p in self.memo.items() if p.key_id == key_id]:
            del self.memo[token]
        self._unknown.clear()  # a key made just now may have been remembered as unknown
        if not active:
            for callback in self._on_revoke:
                callback(key_id)

    async def changed(self, key_id: int) -> None:
        """A key was made, rotated or revoked here: apply it now, and tell every process. The
        change is committed already: a failure here is logged, never raised (this process hears
        its own announcement too, and reloads the table while it cannot hear any)."""
        if self.store is not None:
            try:
                self._apply(key_id, await self.store.get(key_id))
            except _DOWN as exc:
                log.warning("could not reload key %d here (%s); its announcement still goes out", key_id, exc)
        if self._redis is not None:
            try:
                await announce(self._redis, self.channel, key_id)
            except REDIS_DOWN as exc:
                log.warning(
                    "could not announce a change of key %d (%s); others see it within a second", key_id, exc
                )

    async def _reload_all(self) -> None:
        assert self.store is not None
        records = await self.store.active()
        self._loaded_at = time.monotonic()
        gone = set(self._by_id) - {r.id for r in records}
        self._by_id = {r.id: r for r in records}
        self._by_prefix = {r.prefix: r for r in records}
        self.memo.clear()
        self._unknown.clear()
        for key_id in gone:
            for callback in self._on_revoke:
                callback(key_id)

    # ------------------------------------------------------------------ lifecycle

    async def open(
        self, store: KeyStore, redis: aioredis.Redis | None, db_number: int, timeout: float
    ) -> None:
        self.store = store
        self.stream_secret = await store.shared_secret(STREAM_SECRET)
        await self._reload_all()
        loop = asyncio.get_running_loop()
        if redis is not None:
            self._redis = redis
            pool = redis.connection_pool
            self._sub = aioredis.Redis(
                connection_pool=aioredis.ConnectionPool(
                    connection_class=pool.connection_class, **pool.connection_kwargs
                )
            )
            self.channel = change_channel(self.config.channel, db_number)
            self._tasks.append(loop.create_task(self._listen_forever()))
            try:
                await asyncio.wait_for(self.synced.wait(), timeout)
            except TimeoutError:
                log.warning("not subscribed to key changes after %g s; still trying", timeout)
        self._tasks.append(loop.create_task(self._record_use_forever()))

    @property
    def closing(self) -> bool:
        return self._closing

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        if self._sub is not None:
            await self._sub.connection_pool.disconnect()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._sub is not None:
            await self._sub.aclose()
        with contextlib.suppress(*_DOWN):
            await self._record_use()

    async def _listen_forever(self) -> None:
        """Hear key changes; while not subscribed (or not sure to be), not live: verify afresh.

        A subscription that hears nothing is not proven alive: a Redis that hangs, or a network
        that drops packets, raises nothing on a quiet connection, and a process that trusted it
        kept every key it had verified (a revoked one too) for as long as that lasted (40 s and
        more, measured with Redis stopped by SIGSTOP). So the subscription is probed with a PING
        every _PROBE seconds of silence, and taken as down after _SILENT seconds without a word
        from Redis; it goes live only once Redis has confirmed the subscription, each attempt
        bounded by _SILENT, and retries at most _RETRY_MAX apart, so that while it is down what
        was verified is forgotten at least once a second."""
        assert self._sub is not None
        loop = asyncio.get_running_loop()
        delay = 0.05
        while not self._closing:
            pubsub = self._sub.pubsub()  # subscribe confirmations and pongs are what we hear
            try:
                await self._subscribe(pubsub)
                await self._reload_all()  # after subscribing: no change falls between the two
                self.live = True
                self.synced.set()
                delay = 0.05
                heard = loop.time()
                while not self._closing:
                    msg = await pubsub.get_message(timeout=_PROBE)
                    if msg is not None:
                        heard = loop.time()
                        if msg["type"] == "message":
                            await self._on_message(msg["data"])
                    elif loop.time() - heard > _SILENT:
                        raise TimeoutError(f"Redis did not answer for {_SILENT:g} s")
                    else:
                        await pubsub.ping()
            except Exception as exc:  # CancelledError (close()) is a BaseException and ends the task
                if self.closing:
                    return
                if not isinstance(exc, _DOWN):  # a bug must not leave the table trusted
                    log.exception("listening to key changes failed")
                elif self.live:
                    log.warning("key changes not heard (%s); verifying against PostgreSQL meanwhile", exc)
                self.live = False
                self.synced.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            # not live: what was verified may have been revoked meanwhile; verify afresh, against
            # the table reloaded from PostgreSQL about once a second (so a flood of invented keys
            # costs no query each, stream tokens and open streams follow revocations too)
            self.memo.clear()
            if time.monotonic() - self._loaded_at >= _TABLE_FRESH - _RETRY_MAX:
                with contextlib.suppress(*_DOWN):
                    await self._reload_all()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX)

    async def _subscribe(self, pubsub: PubSub) -> None:
        """Subscribe to the key changes, and wait (within _SILENT) until Redis confirms it."""
        async with asyncio.timeout(_SILENT):
            await pubsub.subscribe(self.channel)
            while True:
                msg = await pubsub.get_message(timeout=_SILENT)
                if msg is not None and msg["type"] == "subscribe":
                    return

    async def _on_message(self, data: bytes) -> None:
        try:
            key_id = int(json.loads(data)["key"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed key change message")
            return
        assert self.store is not None
        self._apply(key_id, await self.store.get(key_id))

    async def _record_use(self) -> None:
        if not self.used or self.store is None:
            return
        used = list(self.used)
        self.used.clear()  # the same dict: each Guard holds it
        now = datetime.now(UTC)
        try:
            await self.store.touch(dict.fromkeys(used, now))
        except BaseException:
            self.used.update(dict.fromkeys(used))
            raise

    async def _record_use_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.last_used_interval)
            try:
                await self._record_use()
            except _DOWN as exc:
                log.warning("could not record the keys' last use (%s); trying again later", exc)
