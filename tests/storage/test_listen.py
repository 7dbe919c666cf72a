"""server/storage/listen.py on a real PostgreSQL whose server end of the LISTEN connection is killed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import pytest

from server.config import Config
from server.storage.listen import listen_forever
from tests.helpers import until
from tests.pgproxy import Relay

log = logging.getLogger("hotpath.test_listen")


@dataclass
class Probe:
    """What the helper reported: reconnects (on_listen calls) and NOTIFYs received."""

    channel: str = field(default_factory=lambda: f"hotpath_test_{secrets.token_hex(4)}")
    listening: asyncio.Event = field(default_factory=asyncio.Event)
    listens: int = 0
    notifies: int = 0

    def on_listen(self) -> None:
        self.listens += 1

    def on_notify(self) -> None:
        self.notifies += 1


@pytest.fixture
async def admin(base_config: Config) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(base_config.database.url)
    yield conn
    await conn.close()


@contextlib.asynccontextmanager
async def listener(dsn: str, probe: Probe, ping_every: float = 30.0) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(
        listen_forever(
            dsn,
            probe.channel,
            probe.on_notify,
            on_listen=probe.on_listen,
            listening=probe.listening,
            what="test",
            log=log,
            ping_every=ping_every,
        )
    )
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # anything but the cancellation (the helper died) fails the test here
    assert not probe.listening.is_set()


async def kill(admin: asyncpg.Connection, probe: Probe) -> int:
    """pg_terminate_backend on whichever backend ran our LISTEN; how many were killed."""
    sql = (
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE pid <> pg_backend_pid() AND query LIKE 'LISTEN %' || $1 || '%'"
    )
    return int(await admin.fetchval(sql, probe.channel))


async def delivers(
    admin: asyncpg.Connection, probe: Probe, task: asyncio.Task[None], *, resend: bool = False
) -> None:
    """A NOTIFY sent now reaches the helper's callback, and the task is still running.

    With `resend`, NOTIFY is sent again until one arrives: for when the test cannot know
    whether the connection that is listening now is the one that will stay."""
    before = probe.notifies

    async def notify() -> bool:
        await admin.execute("SELECT pg_notify($1, 'x')", probe.channel)
        return False

    await notify()
    await until(lambda: probe.notifies > before or (resend and notify()), "the NOTIFY delivered")
    assert not task.done()


async def kill_and_see_it_back(admin: asyncpg.Connection, probe: Probe) -> None:
    listens = probe.listens
    assert await kill(admin, probe) == 1
    await until(lambda: probe.listens > listens and probe.listening.is_set(), "listening again")


async def test_reconnects_after_every_termination_and_still_delivers(
    base_config: Config, admin: asyncpg.Connection
) -> None:
    probe = Probe()
    async with listener(base_config.database.url, probe) as task:
        await until(probe.listening.is_set, "listening")
        await delivers(admin, probe, task)
        for round_ in range(6):
            if round_ % 2:  # once it has proved itself working ...
                await delivers(admin, probe, task)
            # ... or at once: right after the reconnect, as soon as `listening` is set
            await kill_and_see_it_back(admin, probe)
        await delivers(admin, probe, task)
        assert probe.listens == 7  # the first connection and one per termination


async def test_survives_terminations_at_any_moment(base_config: Config, admin: asyncpg.Connection) -> None:
    """Kill the backend as soon as its LISTEN shows in pg_stat_activity, which the server
    reports from the Parse on: some kills land while add_listener's statement is still under
    way. With a ping every 10 ms others land in a ping."""
    probe = Probe()
    async with listener(base_config.database.url, probe, ping_every=0.01) as task:
        killed = 0
        while killed < 20:
            killed += await kill(admin, probe)
            await asyncio.sleep(0.002)  # a poll interval, not a wait for an effect
            assert not task.done()
        # the last kill may have hit a connection whose LISTEN completes before it dies, so
        # `listening` may still be set for a moment: NOTIFY until one gets through
        await delivers(admin, probe, task, resend=True)


async def test_internal_client_error_in_add_listener_is_a_lost_connection(
    base_config: Config, admin: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """The exact failure seen in the tests and the soak drill, made certain by the relay: the
    server's FATAL arrives together with its reply to LISTEN's Parse/Describe, so asyncpg
    raises InternalClientError from add_listener. The helper must treat it as a lost
    connection (a warning, no traceback), reconnect and deliver."""
    probe = Probe()
    async with Relay(base_config.database.url) as relay:
        relay.hold_after(b"LISTEN")
        with caplog.at_level(logging.WARNING, logger=log.name):
            async with listener(relay.url, probe) as task:
                await until(relay.described, "the server's answer to LISTEN's Describe, held")
                assert await kill(admin, probe) == 1
                await until(relay.delivered.is_set, "the held answer and the FATAL delivered")
                await until(probe.listening.is_set, "listening through a new connection")
                await delivers(admin, probe, task)
                assert probe.listens == 1  # the first connection never got as far as listening
    [record] = [r for r in caplog.records if r.name == log.name]
    message = record.getMessage()
    assert "InternalClientError" in message and "cannot switch to state" in message
    assert record.levelno == logging.WARNING and record.exc_info is None  # an outage, not a bug
