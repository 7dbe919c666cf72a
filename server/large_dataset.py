"""The 1000-record document of GET /large-dataset, kept as encoded bytes per representation
and coding, so a request is a dictionary lookup. Generated again when its TTL ends, never
per request; rendering and compressing run in the default executor, off the event loop."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.compression import Compression
from server.conditional import etag_of

RECORDS = 1000
# (media type, pretty, coding or None for identity)
Key = tuple[str, bool, str | None]


@dataclass(frozen=True, slots=True)
class Encoded:
    body: bytes
    etag: str
    coding: str | None


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

    def document(self) -> dict[str, Any]:
        """The current document, generated again once its TTL has passed."""
        now = self._clock()
        if self._doc is None or now >= self._expires:
            self._doc = generate(self._records)
            self._expires = now + self._ttl
            self.generation += 1
            self._encoded.clear()
        return self._doc

    def cached(self, key: Key) -> Encoded | None:
        if self._doc is None or self._clock() >= self._expires:
            return None
        return self._encoded.get(key)

    async def get(self, key: Key, render: Callable[[dict[str, Any]], bytes]) -> Encoded:
        """The encoded representation for `key`; `render` turns the document into identity
        bytes of key's media type (called at most once per generation and representation,
        bar a race of first requests, which only repeats work)."""
        hit = self.cached(key)
        if hit is not None:
            return hit
        doc = self.document()
        generation = self.generation
        media, pretty, coding = key
        loop = asyncio.get_running_loop()
        identity = self._encoded.get((media, pretty, None))
        if identity is None:
            body = await loop.run_in_executor(None, render, doc)
            identity = Encoded(body, etag_of(body), None)
            self._store(generation, (media, pretty, None), identity)
        if coding is None:
            return identity
        compressed = await self._compression.encode(coding, identity.body)
        # a strong validator of its own: these bytes differ from identity's
        encoded = Encoded(compressed, f'{identity.etag[:-1]}-{coding}"', coding)
        self._store(generation, key, encoded)
        return encoded

    def _store(self, generation: int, key: Key, value: Encoded) -> None:
        if generation == self.generation:  # not from a generation that has been replaced
            self._encoded[key] = value
