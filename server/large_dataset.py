"""The 1000-record document of GET /large-dataset, kept as encoded bytes per representation
and coding, so a request is a dictionary lookup. Generated again when its TTL ends, never
per request; rendering and compressing run in the default executor, off the event loop,
once per representation and coding however many requests ask at the same moment."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from aiohttp import web

from server.http.codings import compress
from server.http.compression import Compression
from server.http.conditional import etag_of
from server.http.operations import Schema

RECORDS = 1000
# (media type, pretty, coding or None for identity)
Key = tuple[str, bool, str | None]


@dataclass(frozen=True, slots=True)
class Encoded:
    body: bytes
    etag: str
    coding: str | None


# What generate() makes.
DATASET_SCHEMA = Schema(
    "LargeDataset",
    {
        "type": "object",
        "required": ["records", "metadata"],
        "properties": {
            "records": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "name", "description"],
                    "properties": {
                        "id": {"type": "integer"},
                        "name": {"type": "string"},
                        "description": {"type": "string"},
                    },
                },
            },
            "metadata": {
                "type": "object",
                "required": ["total", "generated_at"],
                "properties": {"total": {"type": "integer"}, "generated_at": {"type": "string"}},
            },
        },
    },
)


def generate(records: int = RECORDS, now: dt.datetime | None = None) -> dict[str, Any]:
    """The document: `records` and `metadata` (API.md)."""
    stamp = (now or dt.datetime.now(dt.UTC)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {
        "records": [
            {"id": i, "name": f"Record {i}", "description": f"Description of record {i}"}
            for i in range(1, records + 1)
        ],
        "metadata": {"total": records, "generated_at": stamp},
    }


class LargeDataset:
    """The current document and its encodings; one per app (AppKey LARGE_DATASET)."""

    def __init__(
        self,
        compression: Compression,
        ttl: float,
        *,
        records: int = RECORDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._compression = compression
        self._ttl = ttl
        self._records = records
        self._clock = clock
        self._doc: dict[str, Any] | None = None
        self._expires = 0.0
        self.generation = 0
        self._encoded: dict[Key, Encoded] = {}
        # executor calls under way, per key (one per key and generation)
        self._building: dict[Key, asyncio.Future[tuple[Encoded, Encoded | None]]] = {}

    def document(self) -> dict[str, Any]:
        """The current document, generated again once its TTL has passed."""
        now = self._clock()
        if self._doc is None or now >= self._expires:
            self._doc = generate(self._records)
            self._expires = now + self._ttl
            self.generation += 1
            self._encoded.clear()
            self._building.clear()
        return self._doc

    def cached(self, key: Key) -> Encoded | None:
        if self._doc is None or self._clock() >= self._expires:
            return None
        return self._encoded.get(key)

    async def get(self, key: Key, render: Callable[[dict[str, Any]], bytes]) -> Encoded:
        """The encoded representation for `key`; `render` turns the document into identity
        bytes of key's media type. Rendering and compressing run in one executor call per
        key and generation: requests arriving meanwhile wait for that same call, so a burst
        of first requests (at start, after each TTL) costs one render, not one per request.
        The call belongs to no request: a client that leaves does not cancel it."""
        hit = self.cached(key)
        if hit is not None:
            return hit
        doc = self.document()
        fut = self._building.get(key)
        if fut is None:
            known = self._encoded.get((key[0], key[1], None))
            loop = asyncio.get_running_loop()
            fut = loop.run_in_executor(None, self._build, doc, render, known, key[2])
            self._building[key] = fut
            fut.add_done_callback(partial(self._built, self.generation, key))
        identity, encoded = await asyncio.shield(fut)
        return identity if encoded is None else encoded

    def _build(
        self,
        doc: dict[str, Any],
        render: Callable[[dict[str, Any]], bytes],
        identity: Encoded | None,
        coding: str | None,
    ) -> tuple[Encoded, Encoded | None]:
        if identity is None:
            body = render(doc)
            identity = Encoded(body, etag_of(body), None)
        if coding is None:
            return identity, None
        compressed = compress(coding, identity.body, self._compression.levels)
        # a strong validator of its own: these bytes differ from identity's
        return identity, Encoded(compressed, f'{identity.etag[:-1]}-{coding}"', coding)

    def _built(self, generation: int, key: Key, fut: asyncio.Future[tuple[Encoded, Encoded | None]]) -> None:
        if self._building.get(key) is fut:
            del self._building[key]
        if fut.cancelled() or fut.exception() is not None:
            return  # the requests waiting on it see the error; the next one tries again
        if generation != self.generation:
            return  # built from a document that has since been replaced
        identity, encoded = fut.result()
        self._encoded.setdefault((key[0], key[1], None), identity)
        if encoded is not None:
            self._encoded[key] = encoded


# the cached /large-dataset document
LARGE_DATASET = web.AppKey("hotpath.large_dataset", LargeDataset)
