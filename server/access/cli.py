"""`python run.py keys ...`: make, list, rotate and revoke API keys from the command line, and the
development key of an embedded start (run.py serve).

The command line works on the keys table directly (the configured PostgreSQL, or the embedded
one under the data dir, shared with a server running there) and then announces each change on
Redis exactly as a server does (server/access/changes.py), so running servers apply it within a
message's time. With embedded servers and no server running there is nobody to tell. Every
change is written to the audit log with the actor "cli".

Output: what was done on standard output, a new key alone on its last line (for scripts:
`KEY=$(python run.py keys create ... | tail -n 1)`); errors as one line on standard error, with
exit status 2 for a bad command line and 1 for anything that failed while running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import asyncpg
import redis.asyncio as aioredis

from server.access.apikeys import KeyRecord, KeyStore
from server.access.changes import announce, change_channel, redis_db
from server.access.devkey import DevKey, ensure_dev_key
from server.access.inputs import (
    InvalidInput,
    check_name,
    check_rate,
    describe,
    parse_expiry,
    parse_overlap,
    scopes_from_text,
)
from server.access.scopes import SCOPES
from server.config import Config
from server.errors import Conflict, NotFound, StartupError, Unavailable
from server.runtime.embedded import EmbeddedError, EmbeddedPostgres, EmbeddedRedis
from server.storage.db import Database
from server.storage.migrations import MigrationError, apply_migrations
from server.storage.outage import REDIS_DOWN
from server.storage.pool import PG_TRANSIENT
from server.storage.retry import retry_until
from server.urls import mask_url

__all__ = ["EXIT_RUNTIME", "EXIT_USAGE", "bootstrap_dev_key", "keys_main", "open_store"]

log = logging.getLogger("hotpath.keys")

EXIT_USAGE = 2
EXIT_RUNTIME = 1
ACTOR = "cli"
# Failures of the database while a command runs (after it was reached).
_DB_FAILED = (OSError, TimeoutError, Unavailable, asyncpg.PostgresError, asyncpg.InterfaceError)


class CommandFailed(Exception):
    """A command that cannot be carried out: its message, and the exit status."""

    def __init__(self, message: str, status: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- the command line


def keys_main(
    config: Config, args: argparse.Namespace, new_loop: Callable[[], asyncio.AbstractEventLoop]
) -> int:
    """Run one `keys` command as run.py parsed it; its exit status."""
    out, err = sys.stdout, sys.stderr
    try:
        if args.keys_command == "scopes":
            _print_scopes(out)
            return 0
        request = _parse(config, args)  # before any server is started: a typo costs nothing
        return _with_database(config, lambda url: _run(config, url, request, out), new_loop)
    except CommandFailed as exc:
        err.write(f"hotpath keys: {exc}\n")
        return exc.status


def _parse(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    """The command's arguments, checked; CommandFailed (usage) for a bad one."""
    try:
        if args.keys_command == "create":
            scopes = tuple(SCOPES) if args.all_scopes else scopes_from_text(args.scopes)
            return {
                "command": "create",
                "name": check_name(args.name, "--name"),
                "scopes": scopes,
                "expires_at": parse_expiry(args.expires, "--expires") if args.expires is not None else None,
                "rate": check_rate(args.rate, "--rate"),
            }
        if args.keys_command == "rotate":
            overlap = (
                parse_overlap(args.overlap, "--overlap")
                if args.overlap is not None
                else config.auth.rotate_overlap
            )
            return {"command": "rotate", "key_id": args.key_id, "overlap": overlap}
        if args.keys_command == "revoke":
            return {"command": "revoke", "key_id": args.key_id}
        return {"command": "list", "all": args.all}
    except InvalidInput as exc:
        raise CommandFailed(str(exc), EXIT_USAGE) from None


def _with_database(
    config: Config, work: Callable[[str], Any], new_loop: Callable[[], asyncio.AbstractEventLoop]
) -> int:
    """Run `work(database_url)` on a loop of its own: against the configured database, or the
    embedded PostgreSQL under the data dir (shared with a server running there, else started
    for the command and stopped after it)."""
    embedded: EmbeddedPostgres | None = None
    try:
        url = config.database.url
        if config.embedded_mode:
            embedded = EmbeddedPostgres(config.embedded_data_dir / "postgres")
            try:
                config.embedded_data_dir.mkdir(parents=True, exist_ok=True)
                embedded.start()
            except (EmbeddedError, OSError) as exc:
                raise CommandFailed(str(exc)) from None
            url = embedded.url
        loop = new_loop()
        try:
            return int(loop.run_until_complete(work(url)))
        except (StartupError, MigrationError) as exc:
            raise CommandFailed(str(exc)) from None
        except _DB_FAILED as exc:
            raise CommandFailed(f"the database failed: {type(exc).__name__}: {exc}") from None
        finally:
            loop.close()
    finally:
        if embedded is not None:
            embedded.stop()


@asynccontextmanager
async def open_store(config: Config, url: str) -> AsyncIterator[KeyStore]:
    """The keys table of the database at `url` (migrated first when database.migrate_on_start
    is on, as a server would), through a pool of two connections."""
    cfg = config.database

    async def connect() -> asyncpg.Pool:
        return await asyncpg.create_pool(
            url,
            min_size=1,
            max_size=2,
            command_timeout=cfg.command_timeout,
            timeout=min(10.0, max(1.0, cfg.start_timeout)),
        )

    pool = await retry_until(f"PostgreSQL at {mask_url(url)}", connect, PG_TRANSIENT, cfg.start_timeout)
    try:
        if cfg.migrate_on_start:
            async with pool.acquire() as conn:
                await apply_migrations(conn)
        yield KeyStore(Database(pool, cfg.acquire_timeout, 2))
    finally:
        with contextlib.suppress(*_DB_FAILED):
            await asyncio.wait_for(pool.close(), 5.0)


# ---------------------------------------------------------------- telling running servers


def _redis_url(config: Config) -> str | None:
    """Where running servers listen for key changes: the configured Redis; with embedded
    servers, the embedded Redis when a server runs on this data dir (else nobody listens)."""
    if not config.embedded_mode:
        return config.redis.url
    redis = EmbeddedRedis(config.embedded_data_dir / "redis")
    return redis.url if redis.answers() else None


async def _announce(config: Config, key_ids: Sequence[int], err: TextIO) -> bool:
    """Announce the changes of `key_ids`; False (and a line on stderr) when Redis could not be told."""
    url = _redis_url(config)
    if url is None:
        return True
    rcfg = config.redis
    client = aioredis.Redis.from_url(
        url, socket_timeout=rcfg.socket_timeout, socket_connect_timeout=rcfg.connect_timeout
    )
    try:
        channel = change_channel(config.auth.channel, redis_db(client))
        for key_id in key_ids:
            await announce(client, channel, key_id)
    except REDIS_DOWN as exc:
        ids = ", ".join(map(str, key_ids))
        err.write(
            f"hotpath keys: the change is saved, but running servers could not be told through Redis at "
            f"{mask_url(url)} ({type(exc).__name__}: {exc}): they apply it once they reload the keys "
            f"(when their subscription comes back, or on restart); key {ids}\n"
        )
        return False
    finally:
        with contextlib.suppress(*REDIS_DOWN):
            await client.aclose()
    return True


# ---------------------------------------------------------------- the commands


async def _run(config: Config, url: str, request: dict[str, Any], out: TextIO) -> int:
    err = sys.stderr
    async with open_store(config, url) as store:
        command = request["command"]
        if command == "list":
            records = await store.all(include_revoked=request["all"])
            await store.audit(ACTOR, "key.list", None, {"all": request["all"]})
            now = datetime.now(UTC)
            if not request["all"]:
                records = [r for r in records if r.active(now)]
            _print_table(records, now, out)
            return 0
        if command == "create":
            record, key = await store.create(
                ACTOR,
                request["name"],
                request["scopes"],
                expires_at=request["expires_at"],
                rate=request["rate"],
            )
            told = await _announce(config, [record.id], err)
            out.write(f"created key {record.id}\n")
            _print_record(record, out)
            err.write("hotpath keys: the key is shown this once (the last line); keep it now\n")
            out.write(f"{key}\n")
            out.flush()
            return 0 if told else EXIT_RUNTIME
        if command == "revoke":
            try:
                record = await store.revoke(ACTOR, request["key_id"])
            except NotFound:
                raise CommandFailed(await _why_not_active(store, request["key_id"])) from None
            told = await _announce(config, [record.id], err)
            out.write(f"revoked key {record.id}\n")
            _print_record(record, out)
            return 0 if told else EXIT_RUNTIME
        assert command == "rotate"
        try:
            old, new, key = await store.rotate(ACTOR, request["key_id"], request["overlap"])
        except NotFound:
            raise CommandFailed(await _why_not_active(store, request["key_id"])) from None
        except Conflict as exc:
            raise CommandFailed(exc.detail) from None
        told = await _announce(config, [old.id, new.id], err)
        until = _when(old.expires_at) if old.expires_at else "never"
        out.write(f"rotated key {old.id}: it keeps working until {until}\n")
        out.write(f"replacement: key {new.id}\n")
        _print_record(new, out)
        err.write("hotpath keys: the new key is shown this once (the last line); keep it now\n")
        out.write(f"{key}\n")
        out.flush()
        return 0 if told else EXIT_RUNTIME


async def _why_not_active(store: KeyStore, key_id: int) -> str:
    record = await store.get(key_id)
    if record is None:
        return f"no key with id {key_id} (see `keys list --all`)"
    if record.revoked_at is not None:
        return f"key {key_id} is already revoked (at {record.revoked_at.isoformat()})"
    return f"key {key_id} has expired (at {record.expires_at.isoformat() if record.expires_at else '?'})"


# ---------------------------------------------------------------- output


def _when(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value is not None else "-"


def _status(record: KeyRecord, now: datetime) -> str:
    if record.revoked_at is not None:
        return "revoked"
    if record.expires_at is not None and record.expires_at <= now:
        return "expired"
    if record.replaced_by is not None:
        return f"rotated (-> {record.replaced_by})"
    return "active"


def _print_record(record: KeyRecord, out: TextIO) -> None:
    rows = [
        ("name", record.name),
        ("prefix", f"hp_{record.prefix}"),
        ("scopes", ", ".join(record.scopes)),
        ("rate", record.rate or "(the routes' policies)"),
        ("created", _when(record.created_at)),
        ("expires", _when(record.expires_at) if record.expires_at else "never"),
    ]
    if record.revoked_at is not None:
        rows.append(("revoked", _when(record.revoked_at)))
    if record.owner != record.id:
        rows.append(("owner", f"{record.owner} (its tasks belong to the first key of its rotations)"))
    for label, value in rows:
        out.write(f"  {label + ':':<9} {value}\n")


def _print_table(records: Sequence[KeyRecord], now: datetime, out: TextIO) -> None:
    header = ("ID", "NAME", "PREFIX", "SCOPES", "RATE", "CREATED", "EXPIRES", "LAST USED", "STATUS")
    rows = [
        (
            str(r.id),
            r.name,
            f"hp_{r.prefix}",
            ",".join(r.scopes),
            r.rate or "-",
            _when(r.created_at),
            _when(r.expires_at),
            _when(r.last_used_at),
            _status(r, now),
        )
        for r in records
    ]
    if not rows:
        out.write("no keys (make one: python run.py keys create --name NAME --scopes ...)\n")
        return
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n")


def _print_scopes(out: TextIO) -> None:
    scopes = describe(SCOPES)
    width = max(len(s["name"]) for s in scopes)
    for scope in scopes:
        out.write(f"{scope['name']:<{width}}  {scope['allows']}\n")


# ---------------------------------------------------------------- the development key


def bootstrap_dev_key(
    config: Config, data_dir: Path, new_loop: Callable[[], asyncio.AbstractEventLoop]
) -> DevKey:
    """The development key of an embedded start (config's URLs point at the embedded servers,
    just started): made with every scope when none is active, kept in <data_dir>/dev-key.
    Migrations are applied first (they would be by the server anyway). Raises StartupError or
    MigrationError when the database cannot be used."""

    async def work() -> DevKey:
        async with open_store(config, config.database.url) as store:
            return await ensure_dev_key(store, data_dir)

    loop = new_loop()
    try:
        return loop.run_until_complete(work())
    finally:
        loop.close()
