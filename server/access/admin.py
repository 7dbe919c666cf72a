"""Key management over HTTP (handlers/admin.py): each operation of the admin routes, written to
the audit log under the caller's name (reads included), and each change applied in this process
and announced to every other one (Access.changed)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from server.access.apikeys import KeyRecord, KeyStore
from server.access.inputs import describe
from server.access.scopes import SCOPES
from server.access.verifier import Access
from server.errors import Unavailable
from server.http.auth import Principal

__all__ = ["KeyAdmin", "actor_of"]


def actor_of(principal: Principal | None) -> str:
    """Who acts, as the audit log names it: "key:<id>" (a shared token: "alias:<setting>";
    nobody, on a route auth.open_routes opened: "anonymous")."""
    if principal is None:
        return "anonymous"
    if principal.key_id is not None:
        return f"key:{principal.key_id}"
    return f"alias:{principal.name}"


class KeyAdmin:
    """The admin routes' operations over one process's Access."""

    __slots__ = ("access",)

    def __init__(self, access: Access) -> None:
        self.access = access

    @property
    def store(self) -> KeyStore:
        store = self.access.store
        if store is None:  # only before the app has started
            raise Unavailable("the keys are not loaded yet, retry shortly")
        return store

    async def scopes(self, actor: str) -> list[dict[str, str]]:
        await self.store.audit(actor, "scope.list", None, {})
        return describe(SCOPES)

    async def keys(self, actor: str, include_inactive: bool) -> list[KeyRecord]:
        """The active keys, or every key (revoked and expired ones too)."""
        records = await self.store.all(include_revoked=include_inactive)
        await self.store.audit(actor, "key.list", None, {"all": include_inactive})
        if include_inactive:
            return records
        now = datetime.now(UTC)
        return [r for r in records if r.active(now)]

    async def create(
        self,
        actor: str,
        name: str,
        scopes: Iterable[str],
        expires_at: datetime | None,
        rate: str | None,
    ) -> tuple[KeyRecord, str]:
        record, key = await self.store.create(actor, name, scopes, expires_at=expires_at, rate=rate)
        await self.access.changed(record.id)
        return record, key

    async def rotate(self, actor: str, key_id: int, overlap: float) -> tuple[KeyRecord, KeyRecord, str]:
        old, new, key = await self.store.rotate(actor, key_id, overlap)
        await self.access.changed(new.id)
        await self.access.changed(old.id)
        return old, new, key

    async def revoke(self, actor: str, key_id: int) -> KeyRecord:
        record = await self.store.revoke(actor, key_id)
        await self.access.changed(record.id)
        return record

    async def audit(self, actor: str, before: int | None, limit: int) -> list[dict[str, Any]]:
        """A page of the audit log, newest first (entries older than `before`, when given); the
        read itself is logged after it, so it shows on the next page read from the top."""
        page = await self.store.audit_page(before, limit)
        await self.store.audit(actor, "audit.read", None, {"before": before, "limit": limit})
        return page
