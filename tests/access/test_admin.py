"""The admin routes (/admin/...): only the admin scope passes, every call is in the audit log,
keys made, rotated and revoked over HTTP take effect at once, and no secret is ever stored."""

from __future__ import annotations

import base64
from typing import Any

import asyncpg
import pytest

from server.access.apikeys import KEY_PATTERN
from server.access.scopes import ADMIN, SCOPES, USERS_READ
from server.config import Config
from server.routes import API
from tests.helpers import bearer, new_key

# (method, path, body) of every admin route, with what an admin key gets for it here.
ADMIN_CALLS: list[tuple[str, str, Any, int]] = [
    ("GET", "/admin/scopes", None, 200),
    ("GET", "/admin/keys", None, 200),
    ("GET", "/admin/keys?all=1", None, 200),
    ("POST", "/admin/keys", {"name": "made", "scopes": ["read"]}, 201),
    ("POST", "/admin/keys/999/rotate", {}, 404),
    ("DELETE", "/admin/keys/999", None, 404),
    ("GET", "/admin/audit", None, 200),
]


async def make_key(api: Any, scopes: list[str], name: str = "test") -> tuple[int, str]:
    """A key made straight in the store (actor "test") and applied: (id, key)."""
    record, key = await new_key(api.app, scopes, name)
    return record.id, key


async def call(api: Any, method: str, path: str, body: Any = None, key: str | None = None) -> Any:
    headers = bearer(key) if key else {}
    return await api.request(method, path, json=body, headers=headers)


async def audit_rows(cfg: Config) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(cfg.database.url)
    try:
        return await conn.fetch(
            "SELECT actor, action, target, detail::text AS detail FROM audit_log ORDER BY id"
        )
    finally:
        await conn.close()


def test_every_admin_route_is_declared_with_the_admin_scope() -> None:
    admin = [r for r in API if r.path.template.startswith("/admin")]
    assert {(r.method, r.path.template) for r in admin} == {
        ("GET", "/admin/scopes"),
        ("GET", "/admin/keys"),
        ("POST", "/admin/keys"),
        ("POST", "/admin/keys/{key_id}/rotate"),
        ("DELETE", "/admin/keys/{key_id}"),
        ("GET", "/admin/audit"),
    }
    for route in admin:
        assert route.operation.scopes == (ADMIN,)
        assert route.operation.tags == ("admin",)
        assert not route.operation.public


@pytest.mark.parametrize(("method", "path", "body", "status"), ADMIN_CALLS)
async def test_admin_routes_need_the_admin_scope(
    api: Any, method: str, path: str, body: Any, status: int
) -> None:
    _, other = await make_key(api, [s for s in SCOPES if s != ADMIN], "everything but admin")
    _, admin = await make_key(api, [ADMIN], "admin")

    resp = await call(api, method, path, body)
    assert resp.status == 401
    assert resp.content_type == "application/problem+json"
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")

    resp = await call(api, method, path, body, "hp_000000000000_" + "A" * 43)
    assert resp.status == 401

    resp = await call(api, method, path, body, other)
    assert resp.status == 403
    assert 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]
    assert (await resp.json())["scope"] == ADMIN

    resp = await call(api, method, path, body, admin)
    assert resp.status == status, await resp.text()


async def test_keys_made_rotated_and_revoked_over_http(api: Any, auth_cfg: Config) -> None:
    admin_id, admin = await make_key(api, [ADMIN], "admin")

    resp = await call(
        api, "POST", "/admin/keys", {"name": " reader ", "scopes": [USERS_READ], "rate": "100/minute"}, admin
    )
    assert resp.status == 201
    made = await resp.json()
    key = made["key"]
    assert KEY_PATTERN.fullmatch(key)
    assert made["name"] == "reader" and made["scopes"] == [USERS_READ] and made["rate"] == "100/minute"
    assert key.startswith(made["prefix"] + "_")
    assert "digest" not in made and made["revoked_at"] is None and made["expires_at"] is None

    # the new key works at once, for its scope only
    assert (await call(api, "GET", "/users", key=key)).status == 200
    assert (await call(api, "POST", "/users", {"name": "a", "email": "a@example.com"}, key)).status == 403

    listing = await (await call(api, "GET", "/admin/keys", key=admin)).json()
    assert [k["name"] for k in listing["items"]] == ["admin", "reader"]
    assert all("digest" not in k and "key" not in k for k in listing["items"])

    # rotation: both keys work during the overlap
    resp = await call(api, "POST", f"/admin/keys/{made['id']}/rotate", {"overlap": "1h"}, admin)
    assert resp.status == 201
    rotated = await resp.json()
    new_key = rotated["key"]
    assert rotated["replaced"]["id"] == made["id"] and rotated["replaced"]["replaced_by"] == rotated["id"]
    assert rotated["owner"] == made["id"] and rotated["scopes"] == [USERS_READ]
    assert rotated["replaced"]["expires_at"] is not None
    assert (await call(api, "GET", "/users", key=key)).status == 200
    assert (await call(api, "GET", "/users", key=new_key)).status == 200
    resp = await call(api, "POST", f"/admin/keys/{made['id']}/rotate", None, admin)
    assert resp.status == 409  # rotated already: its replacement is the one to rotate

    # revocation: refused at once; a second revocation is a 404
    resp = await call(api, "DELETE", f"/admin/keys/{rotated['id']}", key=admin)
    assert resp.status == 200
    revoked = await resp.json()
    assert revoked["id"] == rotated["id"] and revoked["revoked_at"] is not None and "key" not in revoked
    resp = await call(api, "GET", "/users", key=new_key)
    assert resp.status == 401
    assert (await call(api, "DELETE", f"/admin/keys/{rotated['id']}", key=admin)).status == 404

    listing = await (await call(api, "GET", "/admin/keys", key=admin)).json()
    assert rotated["id"] not in [k["id"] for k in listing["items"]]
    listing = await (await call(api, "GET", "/admin/keys?all=1", key=admin)).json()
    assert rotated["id"] in [k["id"] for k in listing["items"]]

    actor = f"key:{admin_id}"
    rows = [(r["actor"], r["action"], r["target"]) for r in await audit_rows(auth_cfg)]
    assert rows == [
        ("test", "key.create", str(admin_id)),
        (actor, "key.create", str(made["id"])),
        (actor, "key.list", None),
        (actor, "key.rotate", str(made["id"])),
        (actor, "key.revoke", str(rotated["id"])),
        (actor, "key.list", None),
        (actor, "key.list", None),
    ]


async def test_bodies_are_validated_field_by_field(api: Any) -> None:
    _, admin = await make_key(api, [ADMIN], "admin")
    resp = await call(
        api,
        "POST",
        "/admin/keys",
        {"scopes": ["users:read", "root"], "expires_at": "2001-01-01T00:00:00Z", "rate": "lots", "owner": 1},
        admin,
    )
    assert resp.status == 422
    assert resp.content_type == "application/problem+json"
    errors = {e["field"]: e["message"] for e in (await resp.json())["errors"]}
    assert set(errors) == {"name", "scopes", "expires_at", "rate", "owner"}
    assert "root" in errors["scopes"] and errors["name"] == "is required"

    for bad in (
        {"name": "x", "scopes": []},
        {"name": "", "scopes": ["read"]},
        {"name": "admin\x07", "scopes": ["read"]},  # a control character
        {"name": "ops\u202ekey", "scopes": ["read"]},  # right-to-left override: spoofs `keys list`
        {"name": "ops\u200b", "scopes": ["read"]},  # zero-width space
        {"name": "x", "scopes": "read"},
        # beyond a window's bounds: a limit past 64 bits made each request of the key a 500, a
        # window of 10^12 days failed the Redis script (the process's limits went local)
        {"name": "x", "scopes": ["read"], "rate": "999999999999999999999/second"},
        {"name": "x", "scopes": ["read"], "rate": "1000000001/minute"},
        {"name": "x", "scopes": ["read"], "rate": "1/999999999999d"},
        {"name": "x", "scopes": ["read"], "rate": "10/minute, 1/367d"},
    ):
        assert (await call(api, "POST", "/admin/keys", bad, admin)).status == 422, bad
    assert (await call(api, "POST", "/admin/keys", [1, 2], admin)).status == 422
    resp = await api.post(
        "/admin/keys", data=b"{", headers={**bearer(admin), "Content-Type": "application/json"}
    )
    assert resp.status == 400

    resp = await call(
        api, "POST", "/admin/keys", {"name": "x", "scopes": ["read"], "expires_at": "30d"}, admin
    )
    assert resp.status == 201
    made = await resp.json()
    assert made["expires_at"] is not None
    for overlap in (-1, "soon", 10**9, True):
        resp = await call(api, "POST", f"/admin/keys/{made['id']}/rotate", {"overlap": overlap}, admin)
        assert resp.status == 422, overlap
    assert (await call(api, "GET", "/admin/keys?all=yes", key=admin)).status == 422
    assert (await call(api, "GET", "/admin/audit?limit=0", key=admin)).status == 422


async def test_audit_log_newest_first_in_pages(api: Any) -> None:
    admin_id, admin = await make_key(api, [ADMIN], "admin")
    for _ in range(4):
        assert (await call(api, "GET", "/admin/scopes", key=admin)).status == 200
    page = await (await call(api, "GET", "/admin/audit?limit=3", key=admin)).json()
    ids = [e["id"] for e in page["items"]]
    assert ids == sorted(ids, reverse=True) and len(ids) == 3
    assert [e["action"] for e in page["items"]] == ["scope.list"] * 3
    assert all(e["actor"] == f"key:{admin_id}" for e in page["items"])
    seen = list(ids)
    url = page["next"]
    while url:
        page = await (await call(api, "GET", url, key=admin)).json()
        seen += [e["id"] for e in page["items"]]
        url = page["next"]
    # the first key's creation, four scope lists; the reads of the log before the last page
    assert seen == sorted(seen, reverse=True) and seen[-1] == 1
    assert page["items"][-1]["action"] == "key.create"
    latest = await (await call(api, "GET", "/admin/audit?limit=1", key=admin)).json()
    assert latest["items"][0]["action"] == "audit.read"


async def test_the_database_never_holds_a_secret(api: Any, auth_cfg: Config) -> None:
    _, admin = await make_key(api, [ADMIN], "admin")
    shown = [admin]
    resp = await call(
        api, "POST", "/admin/keys", {"name": "k", "scopes": ["read"], "rate": "5/second"}, admin
    )
    made = await resp.json()
    shown.append(made["key"])
    resp = await call(api, "POST", f"/admin/keys/{made['id']}/rotate", {"overlap": 60}, admin)
    shown.append((await resp.json())["key"])
    await call(api, "DELETE", f"/admin/keys/{made['id']}", key=admin)

    conn = await asyncpg.connect(auth_cfg.database.url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM api_keys") == 3
        columns = await conn.fetch(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name IN ('api_keys', 'audit_log')"
        )
        searched = 0
        for key in shown:
            secret = key.split("_", 2)[2]
            raw = base64.urlsafe_b64decode(secret + "=")
            for col in columns:
                table, name, kind = col["table_name"], col["column_name"], col["data_type"]
                if kind == "bytea":  # the secret's bytes, as text or decoded
                    sql = (
                        f'SELECT count(*) FROM {table} WHERE position($1::bytea IN "{name}") > 0 '
                        f'OR position($2::bytea IN "{name}") > 0'
                    )
                    found = await conn.fetchval(sql, raw, secret.encode())
                else:  # text, text[], jsonb, numbers and times: as text
                    sql = f'SELECT count(*) FROM {table} WHERE strpos("{name}"::text, $1) > 0'
                    found = await conn.fetchval(sql, secret)
                searched += 1
                assert found == 0, f"{table}.{name} holds a secret"
        assert searched >= 3 * 15
    finally:
        await conn.close()
