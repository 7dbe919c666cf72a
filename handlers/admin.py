"""The admin routes (the `admin` scope, server/routes.py): scopes, keys (list, create, rotate,
revoke) and the audit log. A new key is shown once, in the answer that made it; no answer
carries a digest."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from handlers.common import PG_BIGINT_MAX, json_response, page_link, path_id, query_int
from server.access import ACCESS
from server.access.admin import KeyAdmin, actor_of
from server.access.inputs import (
    DURATION_PATTERN,
    NAME_MAX,
    OVERLAP_MAX,
    RATE_MAX,
    InvalidInput,
    check_name,
    check_rate,
    check_scopes,
    parse_expiry,
    parse_overlap,
)
from server.access.scopes import SCOPES
from server.errors import ValidationFailed
from server.http.auth import PRINCIPAL
from server.http.operations import Param, Schema, query
from server.http.reading import read_body

AUDIT_PAGE_DEFAULT = 50
AUDIT_PAGE_MAX = 200
_CREATE_FIELDS = ("name", "scopes", "expires_at", "rate")
_ROTATE_FIELDS = ("overlap",)

# ---------------------------------------------------------------- shapes (the API document)

_TIME = {"type": "string", "format": "date-time"}
_TIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}
_SCOPE = {"enum": list(SCOPES)}
# KeyRecord.public()
_KEY_PROPERTIES: dict[str, Any] = {
    "id": {"type": "integer"},
    "owner": {"type": "integer", "description": "the first key of its line of rotations: its tasks' owner"},
    "prefix": {"type": "string", "description": "hp_ and the lookup prefix: the key's start, no secret"},
    "name": {"type": "string"},
    "scopes": {"type": "array", "items": _SCOPE},
    "rate": {"type": ["string", "null"], "description": "its own rate policy (null: the routes')"},
    "created_at": _TIME,
    "expires_at": _TIME_OR_NULL,
    "revoked_at": _TIME_OR_NULL,
    "last_used_at": {**_TIME_OR_NULL, "description": "recorded every auth.last_used_interval seconds"},
    "replaced_by": {"type": ["integer", "null"], "description": "the key a rotation issued in its place"},
}
API_KEY = Schema(
    "ApiKey", {"type": "object", "required": list(_KEY_PROPERTIES), "properties": _KEY_PROPERTIES}
)
_KEY_SHOWN = {"type": "string", "description": "the key (hp_<prefix>_<secret>), shown this once"}
API_KEY_CREATED = Schema(
    "ApiKeyCreated",
    {
        "type": "object",
        "required": ["key", *_KEY_PROPERTIES],
        "properties": {"key": _KEY_SHOWN, **_KEY_PROPERTIES},
    },
)
API_KEY_ROTATED = Schema(
    "ApiKeyRotated",
    {
        "type": "object",
        "required": ["key", *_KEY_PROPERTIES, "replaced"],
        "properties": {
            "key": _KEY_SHOWN,
            **_KEY_PROPERTIES,
            "replaced": API_KEY,  # the rotated key: it works until its expires_at
        },
    },
)
API_KEY_LIST = Schema(
    "ApiKeyList",
    {"type": "object", "required": ["items"], "properties": {"items": {"type": "array", "items": API_KEY}}},
)
_DURATION = {"type": "string", "pattern": DURATION_PATTERN}
# What _create_fields() takes.
API_KEY_CREATE = Schema(
    "ApiKeyCreate",
    {
        "type": "object",
        "required": ["name", "scopes"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": NAME_MAX},
            "scopes": {"type": "array", "minItems": 1, "items": _SCOPE},
            "expires_at": {
                "description": "when it stops working: an ISO 8601 date-time (no zone: UTC) or a "
                "duration from now (30d, 12h); null or absent: never",
                "anyOf": [{"type": "string", "format": "date-time"}, _DURATION, {"type": "null"}],
            },
            "rate": {
                "type": ["string", "null"],
                "maxLength": RATE_MAX,
                "description": 'its own rate policy, e.g. "1000/minute" or "10/second, 500/hour"',
            },
        },
    },
)
# What _rotate_fields() takes.
API_KEY_ROTATE = Schema(
    "ApiKeyRotate",
    {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "overlap": {
                "description": "how long the old key keeps working: seconds, or a duration (90m, 1h, 2d); "
                "default auth.rotate_overlap",
                "anyOf": [{"type": "number", "minimum": 0, "maximum": OVERLAP_MAX}, _DURATION],
            }
        },
    },
)
SCOPE_LIST = Schema(
    "ScopeList",
    {
        "type": "object",
        "required": ["items"],
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "allows"],
                    "properties": {"name": _SCOPE, "allows": {"type": "string"}},
                },
            }
        },
    },
)
AUDIT_ENTRY = Schema(
    "AuditEntry",
    {
        "type": "object",
        "required": ["id", "at", "actor", "action", "target", "detail"],
        "properties": {
            "id": {"type": "integer"},
            "at": _TIME,
            "actor": {"type": "string", "description": 'key:<id>, "cli", or "dev-bootstrap"'},
            "action": {"type": "string", "description": "key.create, key.rotate, key.revoke, key.list, ..."},
            "target": {"type": ["string", "null"], "description": "the key id acted on"},
            "detail": {"type": "object"},
        },
    },
)
AUDIT_PAGE = Schema(
    "AuditPage",
    {
        "type": "object",
        "required": ["items", "limit", "next"],
        "properties": {
            "items": {"type": "array", "items": AUDIT_ENTRY},
            "limit": {"type": "integer"},
            "next": {"type": ["string", "null"], "description": "the next (older) page"},
        },
    },
)
KEYS_QUERY: tuple[Param, ...] = (query("all", "1: revoked and expired keys too", {"enum": ["0", "1"]}),)
AUDIT_QUERY: tuple[Param, ...] = (
    query("before", "entries older than this id (newest first)", {"type": "integer", "minimum": 1}),
    query(
        "limit",
        f"page size (default {AUDIT_PAGE_DEFAULT}, at most {AUDIT_PAGE_MAX})",
        {"type": "integer", "minimum": 1},
    ),
)

# ---------------------------------------------------------------- the handlers


def _admin(request: web.Request) -> tuple[KeyAdmin, str]:
    return KeyAdmin(request.app[ACCESS]), actor_of(request.get(PRINCIPAL))


def _fields(
    data: Any, allowed: tuple[str, ...], checks: Mapping[str, Callable[[Any], Any]], required: tuple[str, ...]
) -> dict[str, Any]:
    """The checked fields of a body object; ValidationFailed listing every field at fault."""
    if not isinstance(data, Mapping):
        raise ValidationFailed(
            [{"field": "", "message": "the body must be a JSON object"}], "the body must be a JSON object"
        )
    errors = [{"field": str(k), "message": "unknown field"} for k in data if k not in allowed]
    clean: dict[str, Any] = {}
    for name in allowed:
        if name not in data:
            if name in required:
                errors.append({"field": name, "message": "is required"})
            continue
        try:
            clean[name] = checks[name](data[name])
        except InvalidInput as exc:
            errors.append(exc.error())
    if errors:
        raise ValidationFailed(errors)
    return clean


async def scopes(request: web.Request) -> web.Response:
    """GET /admin/scopes"""
    admin, actor = _admin(request)
    return json_response({"items": await admin.scopes(actor)})


async def list_keys(request: web.Request) -> web.Response:
    """GET /admin/keys[?all=1]"""
    raw = request.query.get("all", "0")
    if raw not in ("0", "1", ""):
        raise ValidationFailed([{"field": "all", "message": "must be 0 or 1"}])
    admin, actor = _admin(request)
    records = await admin.keys(actor, raw == "1")
    return json_response({"items": [r.public() for r in records]})


async def create_key(request: web.Request) -> web.Response:
    """POST /admin/keys {name, scopes, expires_at?, rate?}: 201, the key shown this once."""
    fields = _fields(
        await read_body(request),
        _CREATE_FIELDS,
        {"name": check_name, "scopes": check_scopes, "expires_at": parse_expiry, "rate": check_rate},
        ("name", "scopes"),
    )
    admin, actor = _admin(request)
    record, key = await admin.create(
        actor, fields["name"], fields["scopes"], fields.get("expires_at"), fields.get("rate")
    )
    return json_response({"key": key, **record.public()}, status=201)


async def rotate_key(request: web.Request) -> web.Response:
    """POST /admin/keys/{key_id}/rotate {overlap?}: 201, the replacement shown this once."""
    key_id = path_id(request, "key_id", "key")
    fields = _fields(await read_body(request, empty={}), _ROTATE_FIELDS, {"overlap": parse_overlap}, ())
    admin, actor = _admin(request)
    overlap = fields.get("overlap", request.app[ACCESS].config.rotate_overlap)
    old, new, key = await admin.rotate(actor, key_id, overlap)
    return json_response({"key": key, **new.public(), "replaced": old.public()}, status=201)


async def revoke_key(request: web.Request) -> web.Response:
    """DELETE /admin/keys/{key_id}: the revoked key's record."""
    key_id = path_id(request, "key_id", "key")
    admin, actor = _admin(request)
    return json_response((await admin.revoke(actor, key_id)).public())


async def audit(request: web.Request) -> web.Response:
    """GET /admin/audit[?before=&limit=]: newest first."""
    before = query_int(request, "before", 0, minimum=1, maximum=PG_BIGINT_MAX) or None
    limit = query_int(request, "limit", AUDIT_PAGE_DEFAULT, minimum=1, maximum=AUDIT_PAGE_MAX)
    admin, actor = _admin(request)
    items = await admin.audit(actor, before, limit)
    following = (
        page_link(request, "admin_audit", before=str(items[-1]["id"]), limit=str(limit))
        if len(items) == limit and items[-1]["id"] > 1
        else None
    )
    return json_response({"items": items, "limit": limit, "next": following})
