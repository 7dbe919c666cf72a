"""Users in PostgreSQL through asyncpg: validation rules, CRUD, keyset pages, profiles."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from functools import partial
from typing import Any

import asyncpg
from aiohttp import web

from server.config import CONFIG
from server.errors import Conflict, NotFound, ValidationFailed
from server.http.operations import Schema
from server.storage.batching import KeyBatcher
from server.storage.db import Database
from server.storage.pool import DB

NAME_MAX = 200
EMAIL_MAX = 254
FIELDS = ("name", "email")
# Characters no name or address may hold: C0 and C1 controls and DEL (PostgreSQL's text
# refuses NUL outright; the others have no business in a name or an address and break logs
# and mail headers), and unpaired surrogates (YAML's "\uD800" escape makes them; UTF-8,
# orjson and PostgreSQL cannot store them).
_UNPRINTABLE = "\x00-\x1f\x7f-\x9f\ud800-\udfff"
_CONTROL = re.compile(f"[{_UNPRINTABLE}]")
# Deliberately loose: one @, no spaces or controls, a dot in the domain. Deliverability is
# the mail server's business; this only catches what cannot possibly be an address.
_EMAIL = re.compile(f"^[^@\\s{_UNPRINTABLE}]{{1,64}}@[^@\\s.{_UNPRINTABLE}]+(\\.[^@\\s.{_UNPRINTABLE}]+)+$")


def is_email(text: str) -> bool:
    """An address as hotpath takes it: at most EMAIL_MAX characters, see _EMAIL."""
    return len(text) <= EMAIL_MAX and _EMAIL.match(text) is not None


_COLUMNS = "id, name, email, created_at, updated_at"
SQL_INSERT = f"INSERT INTO users (name, email) VALUES ($1, $2) RETURNING {_COLUMNS}"
SQL_GET = f"SELECT {_COLUMNS} FROM users WHERE id = $1"
SQL_GET_MANY = f"SELECT {_COLUMNS} FROM users WHERE id = ANY($1::bigint[])"
SQL_DELETE = "DELETE FROM users WHERE id = $1"
SQL_PAGE = f"SELECT {_COLUMNS} FROM users WHERE id > $1 ORDER BY id LIMIT $2"
# COALESCE keeps a field that the PATCH did not send; both parameters are typed text.
SQL_UPDATE = f"""
UPDATE users
   SET name = COALESCE($2::text, name),
       email = COALESCE($3::text, email),
       updated_at = now()
 WHERE id = $1
RETURNING {_COLUMNS}
"""
SQL_PROFILE = f"""
SELECT {_COLUMNS},
       split_part(email, '@', 2)                              AS email_domain,
       (created_at AT TIME ZONE 'UTC')::date                  AS member_since,
       floor(extract(epoch FROM now() - created_at) / 86400)::int AS account_age_days,
       updated_at > created_at                                AS has_been_updated
  FROM users WHERE id = $1
"""


def validate_user_fields(data: Any, *, partial: bool) -> dict[str, str]:
    """Check a create (partial=False) or PATCH (partial=True) body; return the clean fields.

    Raises ValidationFailed listing every problem at once, so a client fixes them in one go.
    """
    if not isinstance(data, Mapping):
        raise ValidationFailed(
            [{"field": "", "message": "the body must be a JSON object"}], "the body must be a JSON object"
        )
    errors: list[dict[str, str]] = []
    clean: dict[str, str] = {}
    for key in data:
        if key not in FIELDS:
            errors.append({"field": str(key), "message": "unknown field"})
    name = data.get("name")
    if "name" in data:
        if not isinstance(name, str):
            errors.append({"field": "name", "message": "must be a string"})
        else:
            name = name.strip()
            if not 1 <= len(name) <= NAME_MAX:
                errors.append({"field": "name", "message": f"must be 1 to {NAME_MAX} characters"})
            elif _CONTROL.search(name):
                errors.append({"field": "name", "message": "must not contain control characters"})
            else:
                clean["name"] = name
    elif not partial:
        errors.append({"field": "name", "message": "is required"})
    email = data.get("email")
    if "email" in data:
        if not isinstance(email, str):
            errors.append({"field": "email", "message": "must be a string"})
        else:
            email = email.strip()
            if not is_email(email):
                errors.append({"field": "email", "message": "must be a valid email address"})
            else:
                clean["email"] = email
    elif not partial:
        errors.append({"field": "email", "message": "is required"})
    if partial and not errors and not clean:
        errors.append({"field": "", "message": f"send at least one of: {', '.join(FIELDS)}"})
    if errors:
        raise ValidationFailed(errors)
    return clean


# ---------------------------------------------------------------- shapes (the API document)

# What validate_user_fields() takes, with its limits.
_FIELD_SCHEMAS = {
    "name": {"type": "string", "minLength": 1, "maxLength": NAME_MAX},
    "email": {"type": "string", "format": "email", "maxLength": EMAIL_MAX},
}
USER_CREATE = Schema(
    "UserCreate",
    {"type": "object", "required": list(FIELDS), "additionalProperties": False, "properties": _FIELD_SCHEMAS},
)
USER_PATCH = Schema(
    "UserPatch",
    {"type": "object", "minProperties": 1, "additionalProperties": False, "properties": _FIELD_SCHEMAS},
)
_TIME = {"type": "string", "format": "date-time"}
# A row of _COLUMNS.
USER = Schema(
    "User",
    {
        "type": "object",
        "required": ["id", "name", "email", "created_at", "updated_at"],
        "properties": {
            "id": {"type": "integer"},
            "name": {"type": "string"},
            "email": {"type": "string"},
            "created_at": _TIME,
            "updated_at": _TIME,
        },
    },
)
# A row of SQL_PROFILE.
PROFILE = Schema(
    "Profile",
    {
        "allOf": [
            USER,
            {
                "type": "object",
                "required": ["email_domain", "member_since", "account_age_days", "has_been_updated"],
                "properties": {
                    "email_domain": {"type": "string"},
                    "member_since": {"type": "string", "format": "date"},
                    "account_age_days": {"type": "integer"},
                    "has_been_updated": {"type": "boolean"},
                },
            },
        ]
    },
)


def _record(row: asyncpg.Record) -> dict[str, Any]:
    return dict(row.items())


async def create_user(db: Database, name: str, email: str) -> dict[str, Any]:
    """Insert a user; Conflict when the email (any case) is taken."""
    try:
        row = await db.fetchrow(SQL_INSERT, name, email)
    except asyncpg.UniqueViolationError:
        raise Conflict(f"a user with email {email!r} already exists") from None
    assert row is not None
    return _record(row)


async def get_users_by_ids(db: Database, ids: list[int]) -> dict[int, dict[str, Any]]:
    """Every existing user among `ids`, by id, in one query (the KeyBatcher's load_many)."""
    rows = await db.fetch(SQL_GET_MANY, ids)
    return {row["id"]: _record(row) for row in rows}


async def get_user(
    db: Database, user_id: int, batcher: KeyBatcher[int, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The user with this id; NotFound otherwise.

    With a batcher, concurrent lookups share one query; the dict returned may then be
    shared with other callers asking for the same id, so callers must not mutate it.
    """
    if batcher is not None:
        user = await batcher.load(user_id)
    else:
        row = await db.fetchrow(SQL_GET, user_id)
        user = None if row is None else _record(row)
    if user is None:
        raise NotFound(f"user {user_id} does not exist")
    return user


async def update_user(db: Database, user_id: int, changes: Mapping[str, str]) -> dict[str, Any]:
    """Apply validated changes; NotFound when missing, Conflict when the new email is taken."""
    try:
        row = await db.fetchrow(SQL_UPDATE, user_id, changes.get("name"), changes.get("email"))
    except asyncpg.UniqueViolationError:
        raise Conflict(f"a user with email {changes.get('email')!r} already exists") from None
    if row is None:
        raise NotFound(f"user {user_id} does not exist")
    return _record(row)


async def delete_user(db: Database, user_id: int) -> None:
    """Delete the user; NotFound when there was none."""
    status = await db.execute(SQL_DELETE, user_id)
    if status == "DELETE 0":
        raise NotFound(f"user {user_id} does not exist")


async def list_users(db: Database, after: int, limit: int) -> list[dict[str, Any]]:
    """Up to `limit` users with id > `after`, in id order (keyset pagination)."""
    rows = await db.fetch(SQL_PAGE, after, limit)
    return [_record(r) for r in rows]


async def get_profile(db: Database, user_id: int) -> dict[str, Any]:
    """The user plus fields derived from stored data (account age, email domain, ...)."""
    row = await db.fetchrow(SQL_PROFILE, user_id)
    if row is None:
        raise NotFound(f"user {user_id} does not exist")
    return _record(row)


# None when database.batch_reads is off: reads by id then go straight to the pool.
UserBatcher = KeyBatcher[int, dict[str, Any]]
USER_BATCHER: web.AppKey[UserBatcher | None] = web.AppKey("hotpath.user_batcher")


async def user_batcher_ctx(app: web.Application) -> AsyncIterator[None]:
    """Coalesces concurrent reads of users by id (database.batch_reads); closed before the pool."""
    cfg = app[CONFIG].database
    if not cfg.batch_reads:
        app[USER_BATCHER] = None
        yield
        return
    db = app[DB]
    batcher: KeyBatcher[int, dict[str, Any]] = KeyBatcher(partial(get_users_by_ids, db), cfg.batch_max)
    app[USER_BATCHER] = batcher
    yield
    await batcher.close()
