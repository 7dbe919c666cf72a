"""A lean, pipelined Redis connection for the one hot command of the rate limiter.

redis-py's asyncio client spends about 65 µs of our CPU per command here (pool checkout with
a condition variable, retry and health-check wrappers, argument encoding, stream reader),
on top of the ~26 µs a bare asyncio protocol needs for the round trip itself. The rate
limiter sends one script call per event-loop pass, so that overhead is paid constantly.
This connection is an asyncio.Protocol with hiredis (a well-kept C parser) doing the parsing:
commands are written as they come, replies are matched to callers in order (RESP
guarantees it), and any failure closes the connection and fails every caller waiting on it,
so no reply can ever be matched to the wrong request. The next call reconnects.

Everything else in hotpath (readiness, caching, the feed) uses redis-py.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
import redis.exceptions as redis_exc


def _encode(args: tuple[Any, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        else:
            data = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiters = self.waiters
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(redis_exc.ConnectionError(f"protocol error: {exc}"))
                return
            if reply is False:
                return
            if not waiters:  # a reply nobody asked for: the stream cannot be trusted
                self._fail(redis_exc.ConnectionError("unexpected reply from Redis"))
                return
            fut = waiters.popleft()
            if not fut.done():
                if isinstance(reply, hiredis.ReplyError):
                    fut.set_exception(redis_exc.ResponseError(str(reply)))
                else:
                    fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or redis_exc.ConnectionError("connection closed by Redis")
        self._fail(redis_exc.ConnectionError(f"connection to Redis lost: {self.lost}"))

    def _fail(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


class RespConnection:
    """One pipelined connection, opened lazily and reopened after any failure."""

    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        self._unix = parts.path if parts.scheme == "unix" else None
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._tls = parts.scheme == "rediss"
        self._db = (
            int(query["db"][0])
            if "db" in query
            else (int(parts.path.strip("/") or 0) if not self._unix else 0)
        )
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self.timeout = timeout
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        if self._unix is not None:
            _, proto = await loop.create_unix_connection(_Protocol, unquote(self._unix))
        else:
            _, proto = await loop.create_connection(_Protocol, self._host, self._port, ssl=self._tls or None)
        setup: list[tuple[Any, ...]] = []
        if self._password is not None:
            setup.append(
                ("AUTH", self._username, self._password) if self._username else ("AUTH", self._password)
            )
        if self._db:
            setup.append(("SELECT", self._db))
        for command in setup:
            await self._send(proto, command)
        return proto

    async def _protocol(self) -> _Protocol:
        proto = self._proto
        if proto is not None and proto.lost is None:
            return proto
        if self._connecting is None:  # one connect attempt at a time; the others wait for it
            self._connecting = asyncio.ensure_future(asyncio.wait_for(self._connect(), self.timeout))
        connecting = self._connecting
        try:
            proto = await asyncio.shield(connecting)
        except BaseException as exc:
            if isinstance(exc, OSError | TimeoutError):
                raise redis_exc.ConnectionError(f"cannot connect to Redis: {exc}") from None
            raise
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None
        self._proto = proto
        return proto

    async def _send(self, proto: _Protocol, args: tuple[Any, ...]) -> Any:
        if proto.lost is not None or proto.transport is None:
            raise redis_exc.ConnectionError(f"connection to Redis lost: {proto.lost}")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        proto.waiters.append(fut)
        proto.transport.write(_encode(args))
        # A reply that does not come in time leaves the stream out of step: drop the connection.
        timer = asyncio.get_running_loop().call_later(
            self.timeout,
            proto._fail,
            redis_exc.TimeoutError(f"no reply from Redis within {self.timeout:g} s"),
        )
        try:
            return await fut
        finally:
            timer.cancel()

    async def call(self, *args: Any) -> Any:
        """Send one command and return its reply (ResponseError for an error reply)."""
        return await self._send(await self._protocol(), args)

    async def evalsha(self, sha: str, script: str, *args: Any) -> Any:
        """EVALSHA with no keys, loading the script once if the server does not know it."""
        try:
            return await self.call("EVALSHA", sha, 0, *args)
        except redis_exc.ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.call("SCRIPT", "LOAD", script)
        return await self.call("EVALSHA", sha, 0, *args)

    def close(self) -> None:
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()
