"""The product catalogue, held in process memory and reloaded on PostgreSQL NOTIFY.

The catalogue is small and read-mostly, so every process keeps all of it in memory and
serves pages without a query. A statement-level trigger on `products` (migration 002)
sends NOTIFY on every change; each process LISTENs on a dedicated connection and reloads
within milliseconds. When that connection drops, the process reconnects with backoff and
reloads once more, since changes may have happened while it was not listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from server.cache import CACHE, response_group
from server.config import CONFIG
from server.http.operations import Schema
from server.storage.db import Database
from server.storage.listen import listen_forever
from server.storage.pool import DB

log = logging.getLogger("hotpath.products")

CHANNEL = "hotpath_products"
Answer = tuple[bytes, CIMultiDict[str]]  # a response's body and headers, kept to be sent again
SQL_ALL = "SELECT id, name, price, category, created_at, updated_at FROM products ORDER BY id"
_TIME = {"type": "string", "format": "date-time"}
# A row of SQL_ALL.
PRODUCT = Schema(
    "Product",
    {
        "type": "object",
        "required": ["id", "name", "price", "category"],
        "properties": {
            "id": {"type": "integer"},
            "name": {"type": "string"},
            "price": {"type": "number", "minimum": 0},
            "category": {"type": "string"},
            "created_at": _TIME,
            "updated_at": _TIME,
        },
    },
)
# Catalogue.page(), with the link to the next page (handlers/products.py).
PRODUCT_PAGE = Schema(
    "ProductPage",
    {
        "type": "object",
        "required": ["items", "total", "page", "limit", "next"],
        "properties": {
            "items": {"type": "array", "items": PRODUCT},
            "total": {"type": "integer"},
            "page": {"type": "integer"},
            "limit": {"type": "integer"},
            "next": {"type": ["string", "null"]},
        },
    },
)


class Catalogue:
    """All products in memory, plus a bounded cache of rendered pages for this version."""

    def __init__(self, db: Database, dsn: str, *, render_cache_size: int = 256) -> None:
        self._db = db
        self._dsn = dsn
        self._items: list[dict[str, Any]] = []
        self._rendered: dict[tuple[Any, ...], bytes] = {}
        # whole answers to a bare GET /products for this version, by (Accept, Accept-Encoding):
        # the handler's quick answer reads this dict itself (no method call on that path),
        # keep_answer() fills it and reload() replaces it
        self.answers: dict[tuple[str | None, str | None], Answer] = {}
        self._render_cache_size = render_cache_size
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.version = 0
        self.listening = asyncio.Event()
        # called after every reload (the cache drops product responses cached elsewhere)
        self.on_change: list[Callable[[], None]] = []

    @property
    def items(self) -> list[dict[str, Any]]:
        return self._items

    async def reload(self) -> None:
        """Read the whole table; the rendered-page cache starts empty for the new version."""
        rows = await self._db.fetch(SQL_ALL)
        self._items = [dict(r.items()) for r in rows]
        self._rendered = {}
        self.answers = {}
        self.version += 1
        for callback in self.on_change:
            callback()

    async def start(self) -> None:
        """First load (errors propagate: no catalogue, no start), then listen for changes."""
        await self.reload()
        loop = asyncio.get_running_loop()
        # after each (re)connect of the LISTEN connection, reload: changes made while nobody
        # listened sent no NOTIFY to us
        listen = listen_forever(
            self._dsn,
            CHANNEL,
            self._dirty.set,
            on_listen=self._dirty.set,
            listening=self.listening,
            what="catalogue",
            log=log,
        )
        self._tasks = [loop.create_task(self._reload_loop()), loop.create_task(listen)]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def page(self, page: int, limit: int) -> dict[str, Any]:
        """One page (1-based) of `limit` products: items, total, page, limit."""
        items = self._items
        start = (page - 1) * limit
        return {"items": items[start : start + limit], "total": len(items), "page": page, "limit": limit}

    def keep_answer(
        self, version: int, accept: str | None, accept_encoding: str | None, answer: Answer
    ) -> None:
        """Remember an answer built from catalogue `version` in `answers`, until the catalogue
        changes; one built from an older version (a reload ran while it was compressed) is
        dropped. Bounded like the pages: clients repeat a few header pairs."""
        if version != self.version:
            return
        if len(self.answers) >= self._render_cache_size:
            del self.answers[next(iter(self.answers))]
        self.answers[(accept, accept_encoding)] = answer

    def cached_page(self, key: tuple[Any, ...]) -> bytes | None:
        """Rendered bytes stored under `key` for this version, if any."""
        return self._rendered.get(key)

    def cache_page(self, key: tuple[Any, ...], body: bytes) -> bytes:
        """Keep rendered bytes for this version (bounded: the oldest entry goes first)."""
        if len(self._rendered) >= self._render_cache_size:
            del self._rendered[next(iter(self._rendered))]
        self._rendered[key] = body
        return body

    async def _reload_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.reload()
            except Exception as exc:  # keep serving the last good version; try again shortly
                log.warning("catalogue reload failed (%s: %s); retrying in 1 s", type(exc).__name__, exc)
                await asyncio.sleep(1.0)
                self._dirty.set()


CATALOGUE = web.AppKey("hotpath.catalogue", Catalogue)


async def catalogue_ctx(app: web.Application) -> AsyncIterator[None]:
    """The product catalogue in memory, kept fresh by LISTEN/NOTIFY."""
    cfg = app[CONFIG]
    catalogue = Catalogue(app[DB], cfg.database.url, render_cache_size=cfg.products.render_cache_size)
    await catalogue.start()
    app[CATALOGUE] = catalogue
    yield
    await catalogue.close()


async def products_cache_ctx(app: web.Application) -> AsyncIterator[None]:
    """Cached product responses are dropped whenever the catalogue reloads (after cache_ctx)."""
    cache = app[CACHE]
    on_change = app[CATALOGUE].on_change

    def drop_products() -> None:
        cache.invalidate_group_soon(response_group("products"))

    on_change.append(drop_products)
    yield
    # The catalogue closes after the cache and may still reload until then (once its LISTEN
    # connection is up, late in a short-lived app): the callback would start an invalidation
    # in a closed cache, whose Redis connection nobody closes.
    on_change.remove(drop_products)
