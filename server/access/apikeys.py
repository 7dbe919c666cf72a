"""API keys in PostgreSQL: made (shown once), rotated, revoked, listed; every change and admin
action written to the audit log in the same transaction.

A key is `hp_<prefix>_<secret>`: the prefix (12 hex digits) finds the row, the secret (32
random bytes, base64url) is checked against its SHA-256 digest. The secret has 256 bits of
entropy, so a fast digest is enough: nothing is left to guess by brute force, unlike a
password. The database never holds the secret.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from server.errors import Conflict, NotFound
from server.storage.db import Database

__all__ = ["KEY_PATTERN", "KeyRecord", "KeyStore", "digest_of", "new_key", "split_key"]

KEY_PATTERN = re.compile(r"hp_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_match = KEY_PATTERN.fullmatch


def digest_of(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_key() -> tuple[str, str, bytes]:
    """(the key as shown once, its prefix, the digest of its secret)."""
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return f"hp_{prefix}_{secret}", prefix, digest_of(secret)


def split_key(token: str) -> tuple[str, str] | None:
    """(prefix, secret) of a well-formed key, else None."""
    m = _match(token)
    return (m.group(1), m.group(2)) if m is not None else None


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: int
    owner: int  # the family: the first key of its line of rotations
    prefix: str
    digest: bytes
    name: str
    scopes: tuple[str, ...]
    rate: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    replaced_by: int | None

    def active(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def public(self) -> dict[str, Any]:
        """What the API and the command line show of a key (never its digest)."""
        return {
            "id": self.id,
            "owner": self.owner,
            "prefix": f"hp_{self.prefix}",
            "name": self.name,
            "scopes": list(self.scopes),
            "rate": self.rate,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "last_used_at": self.last_used_at.isoformat() if self.last_used_at else None,
            "replaced_by": self.replaced_by,
        }


_COLS = (
    "id, COALESCE(family, id) AS owner, prefix, digest, name, scopes, rate, created_at, expires_at,"
    " revoked_at, last_used_at, replaced_by"
)
SQL_INSERT = f"""
INSERT INTO api_keys (family, prefix, digest, name, scopes, rate, expires_at)
VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {_COLS}
"""
SQL_GET = f"SELECT {_COLS} FROM api_keys WHERE id = $1"
SQL_GET_FOR_UPDATE = f"SELECT {_COLS} FROM api_keys WHERE id = $1 FOR UPDATE"
SQL_BY_PREFIX = f"SELECT {_COLS} FROM api_keys WHERE prefix = $1"
SQL_ACTIVE = (
    f"SELECT {_COLS} FROM api_keys WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())"
)
SQL_LIST = f"SELECT {_COLS} FROM api_keys WHERE $1 OR revoked_at IS NULL ORDER BY id"
SQL_REVOKE = f"UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL RETURNING {_COLS}"
SQL_RETIRE = f"""
UPDATE api_keys SET replaced_by = $2,
    expires_at = LEAST(COALESCE(expires_at, 'infinity'), now() + make_interval(secs => $3))
WHERE id = $1 RETURNING {_COLS}
"""
SQL_TOUCH = """
UPDATE api_keys SET last_used_at = u.at
FROM unnest($1::bigint[], $2::timestamptz[]) AS u(id, at)
WHERE api_keys.id = u.id AND (last_used_at IS NULL OR last_used_at < u.at)
"""
SQL_AUDIT = "INSERT INTO audit_log (actor, action, target, detail) VALUES ($1, $2, $3, $4::jsonb)"
SQL_AUDIT_PAGE = """
SELECT id, at, actor, action, target, detail::text AS detail FROM audit_log
WHERE $1::bigint IS NULL OR id < $1 ORDER BY id DESC LIMIT $2
"""
SQL_SECRET = """
WITH made AS (
    INSERT INTO access_secrets (name, secret) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING RETURNING secret
)
SELECT secret FROM made UNION ALL SELECT secret FROM access_secrets WHERE name = $1 LIMIT 1
"""


def _record(row: Mapping[str, Any]) -> KeyRecord:
    return KeyRecord(
        id=row["id"],
        owner=row["owner"],
        prefix=row["prefix"],
        digest=bytes(row["digest"]),
        name=row["name"],
        scopes=tuple(row["scopes"]),
        rate=row["rate"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        last_used_at=row["last_used_at"],
        replaced_by=row["replaced_by"],
    )


class KeyStore:
    """The keys table and the audit log. `actor` names who acts: "key:<id>" or "cli"."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def _audit(
        self, conn: asyncpg.Connection, actor: str, action: str, target: str | None, detail: Mapping[str, Any]
    ) -> None:
        await conn.execute(SQL_AUDIT, actor, action, target, json.dumps(detail))

    async def audit(self, actor: str, action: str, target: str | None, detail: Mapping[str, Any]) -> None:
        async with self.db.acquire() as conn:
            await self._audit(conn, actor, action, target, detail)

    async def create(
        self,
        actor: str,
        name: str,
        scopes: Iterable[str],
        *,
        expires_at: datetime | None = None,
        rate: str | None = None,
    ) -> tuple[KeyRecord, str]:
        """A new key: its record and the key itself, which is never shown again."""
        token, prefix, digest = new_key()
        async with self.db.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(SQL_INSERT, None, prefix, digest, name, list(scopes), rate, expires_at)
            assert row is not None
            record = _record(row)
            await self._audit(conn, actor, "key.create", str(record.id), _summary(record))
        return record, token

    async def rotate(self, actor: str, key_id: int, overlap: float) -> tuple[KeyRecord, KeyRecord, str]:
        """A replacement of an active key (same name, scopes, rate and expiry, same owner); the
        old key keeps working for `overlap` seconds. (old record, new record, new key).
        NotFound for a key that is not active, Conflict for one rotated already."""
        token, prefix, digest = new_key()
        async with self.db.acquire() as conn, conn.transaction():
            old_row = await conn.fetchrow(SQL_GET_FOR_UPDATE, key_id)
            if old_row is None or not _record(old_row).active(datetime.now(UTC)):
                raise NotFound(f"no active key {key_id}")
            old = _record(old_row)
            if old.replaced_by is not None:  # one line of rotations: the newest key rotates
                raise Conflict(f"key {key_id} was already rotated: rotate its replacement {old.replaced_by}")
            row = await conn.fetchrow(
                SQL_INSERT, old.owner, prefix, digest, old.name, list(old.scopes), old.rate, old.expires_at
            )
            assert row is not None
            new = _record(row)
            retired = await conn.fetchrow(SQL_RETIRE, key_id, new.id, float(overlap))
            assert retired is not None
            old = _record(retired)
            await self._audit(
                conn,
                actor,
                "key.rotate",
                str(key_id),
                {
                    "replacement": new.id,
                    "old_expires_at": old.expires_at.isoformat() if old.expires_at else None,
                },
            )
        return old, new, token

    async def revoke(self, actor: str, key_id: int) -> KeyRecord:
        """Revoke a key at once (NotFound when it is unknown or revoked already)."""
        async with self.db.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(SQL_REVOKE, key_id)
            if row is None:
                raise NotFound(f"no active key {key_id}")
            record = _record(row)
            await self._audit(conn, actor, "key.revoke", str(key_id), {"name": record.name})
        return record

    async def get(self, key_id: int) -> KeyRecord | None:
        row = await self.db.fetchrow(SQL_GET, key_id)
        return _record(row) if row is not None else None

    async def by_prefix(self, prefix: str) -> KeyRecord | None:
        row = await self.db.fetchrow(SQL_BY_PREFIX, prefix)
        return _record(row) if row is not None else None

    async def active(self) -> list[KeyRecord]:
        return [_record(r) for r in await self.db.fetch(SQL_ACTIVE)]

    async def all(self, include_revoked: bool = False) -> list[KeyRecord]:
        return [_record(r) for r in await self.db.fetch(SQL_LIST, include_revoked)]

    async def touch(self, used: Mapping[int, datetime]) -> None:
        """Record the last use of many keys at once (one statement)."""
        if used:
            await self.db.execute(SQL_TOUCH, list(used), list(used.values()))

    async def audit_page(self, before: int | None, limit: int) -> list[dict[str, Any]]:
        rows = await self.db.fetch(SQL_AUDIT_PAGE, before, limit)
        return [
            {
                "id": r["id"],
                "at": r["at"].isoformat(),
                "actor": r["actor"],
                "action": r["action"],
                "target": r["target"],
                "detail": json.loads(r["detail"]),
            }
            for r in rows
        ]

    async def shared_secret(self, name: str) -> bytes:
        """A secret every process of the deployment shares: made by the first one to ask."""
        return bytes(await self.db.fetchval(SQL_SECRET, name, secrets.token_bytes(32)))


def _summary(record: KeyRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "scopes": list(record.scopes),
        "rate": record.rate,
        "expires_at": record.expires_at.isoformat() if record.expires_at else None,
    }
