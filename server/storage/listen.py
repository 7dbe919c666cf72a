"""One PostgreSQL LISTEN connection kept open until cancelled, whatever breaks it.

The job runner and the product catalogue each hold one such connection per process. A
NOTIFY sent while nobody listens is lost, so after every (re)connect the owner is told to
look again ("something may have changed meanwhile") before `listening` is set.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

PING_EVERY = 30.0  # seconds between liveness checks of an idle LISTEN connection
PING_TIMEOUT = 5.0
CONNECT_TIMEOUT = 5.0
FIRST_DELAY = 0.1  # backoff between attempts: 0.1 s doubling to 5 s, reset once listening
MAX_DELAY = 5.0

# What a lost or unusable connection raises. InternalClientError is not an InterfaceError:
# asyncpg raises it when the server's FATAL (pg_terminate_backend, a restart) lands between
# two steps of one statement, e.g. between the Parse and the Bind of add_listener's LISTEN
# ("cannot switch to state 12; another operation (2) is in progress").
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


async def listen_forever(
    dsn: str,
    channel: str,
    on_notify: Callable[[], object],
    *,
    on_listen: Callable[[], object],
    listening: asyncio.Event,
    what: str,
    log: logging.Logger,
    ping_every: float = PING_EVERY,
) -> None:
    """LISTEN on `channel` over a connection of its own, calling `on_notify()` per NOTIFY.

    After each (re)connect, `on_listen()` is called, then `listening` is set; it is cleared
    as soon as the connection is gone. The connection is pinged every `ping_every` seconds
    and dropped when the server closes it. Every failure, of the connection or unexpected,
    closes the connection (terminate(), never reused) and leads to a reconnect after a
    backoff; one warning per outage names it. Returns only by cancellation.
    """
    delay = FIRST_DELAY
    down_since: float | None = None  # loop time of the first failure of the current outage
    attempts = 0
    loop = asyncio.get_running_loop()

    def notified(_conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        on_notify()

    while True:
        conn: asyncpg.Connection | None = None
        bug: Exception | None = None
        try:
            conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT)
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
            await conn.add_listener(channel, notified)
            on_listen()
            listening.set()
            if down_since is not None:
                log.info(
                    "%s LISTEN connection back after %.1f s (%d reconnect attempts)",
                    what,
                    loop.time() - down_since,
                    attempts,
                )
            down_since, attempts, delay = None, 0, FIRST_DELAY
            await _watch(conn, lost, ping_every)
            reason = "the server closed the connection"
        except CONNECTION_ERRORS as exc:
            reason = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # not an outage but a bug: say so loudly, and keep listening
            reason = f"{type(exc).__name__}: {exc}"
            bug = exc
        finally:
            listening.clear()
            if conn is not None:
                conn.terminate()  # whatever state its protocol is in, it is never used again
        attempts += 1
        if down_since is None:
            down_since = loop.time()
            log.warning("%s LISTEN connection lost (%s); reconnecting", what, reason, exc_info=bug)
        else:
            log.debug("%s LISTEN reconnect failed (%s); retrying in %.1f s", what, reason, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_DELAY)


async def _watch(conn: asyncpg.Connection, lost: asyncio.Event, ping_every: float) -> None:
    """Return when the connection is gone; raise when it stops answering a ping."""
    while not lost.is_set():
        try:
            await asyncio.wait_for(lost.wait(), ping_every)
        except TimeoutError:
            await conn.execute("SELECT 1", timeout=PING_TIMEOUT)
