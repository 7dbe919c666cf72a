"""The development key of an embedded start (auth.dev_key): a key with every scope, made once,
kept in <embedded.data_dir>/dev-key (mode 0600) so that `KEY=$(cat var/dev-key)` works, and
reused by every later start while it stays active.

Only run.py's embedded (development) start calls this: with configured URLs nothing is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from server.access.apikeys import KeyRecord, KeyStore, digest_of, split_key
from server.access.scopes import SCOPES

__all__ = ["DEV_KEY_FILE", "DEV_KEY_NAME", "DevKey", "ensure_dev_key", "read_key_file", "write_key_file"]

DEV_KEY_NAME = "development"
DEV_KEY_FILE = "dev-key"
ACTOR = "dev-bootstrap"


@dataclass(frozen=True)
class DevKey:
    """What ensure_dev_key() found or did. `state`: "created" (`key` is the new key, to show
    once), "kept" (the file holds an active key), "elsewhere" (an active development key exists
    but the file does not hold it: `record` is that key)."""

    state: Literal["created", "kept", "elsewhere"]
    path: Path
    record: KeyRecord
    key: str | None = None


def read_key_file(path: Path) -> str | None:
    """The key kept in `path`, or None when there is none (or it cannot be read)."""
    try:
        return path.read_text(encoding="ascii").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def write_key_file(path: Path, key: str) -> None:
    """Write `key` to `path`, readable by its owner only, replacing the file at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an older file of that name may have had other bits
        os.write(fd, f"{key}\n".encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


async def _active_record(store: KeyStore, key: str | None) -> KeyRecord | None:
    """The record of `key` when it is a key of this database and active."""
    parts = split_key(key) if key else None
    if parts is None:
        return None
    record = await store.by_prefix(parts[0])
    if record is None or not hmac.compare_digest(record.digest, digest_of(parts[1])):
        return None
    return record if record.active(datetime.now(UTC)) else None


async def ensure_dev_key(store: KeyStore, data_dir: Path) -> DevKey:
    """Make the development key unless the data dir keeps an active one, or another active
    key named "development" exists (then nothing is made: its secret is not known here)."""
    path = data_dir / DEV_KEY_FILE
    kept = await _active_record(store, await asyncio.to_thread(read_key_file, path))
    if kept is not None:
        return DevKey("kept", path, kept)
    now = datetime.now(UTC)
    for record in await store.active():
        if record.name == DEV_KEY_NAME and record.active(now):
            return DevKey("elsewhere", path, record)
    record, key = await store.create(ACTOR, DEV_KEY_NAME, list(SCOPES))
    await asyncio.to_thread(write_key_file, path, key)
    return DevKey("created", path, record, key)
