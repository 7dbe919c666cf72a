"""Per-URL reuse of POST /process-urls results (fetch.cache_ttl seconds; 0 = off).

Only successes are kept: an error (timeout, refused, HTTP 4xx/5xx, blocked) is fetched again
next time. URLs already running in another request are not joined: the overall deadline and
concurrency bound of fetch_all stay exactly as they are for the URLs still to fetch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson

from server.cache.core import Cache
from server.fetch.client import FetchLimits, Guard, fetch_all

NAMESPACE = "fetch"


async def fetch_all_cached(
    cache: Cache,
    ttl: float,
    session: aiohttp.ClientSession,
    guard: Guard,
    urls: Sequence[Any],
    limits: FetchLimits,
) -> list[dict[str, Any]]:
    """fetch_all, answering URLs fetched successfully within `ttl` seconds from the cache."""
    if ttl <= 0:
        return await fetch_all(session, guard, urls, limits)
    out: list[dict[str, Any] | None] = []
    todo: list[int] = []
    for i, url in enumerate(urls):
        hit = await cache.get(NAMESPACE, [url]) if isinstance(url, str) else None
        out.append(None if hit is None else _thaw(hit.value))
        if hit is None:
            todo.append(i)
    fetched = await fetch_all(session, guard, [urls[i] for i in todo], limits)
    for i, result in zip(todo, fetched, strict=True):
        out[i] = result
        if "error" not in result and isinstance(urls[i], str):
            with contextlib.suppress(TypeError):  # a body msgpack cannot hold is simply not reused
                await cache.set(NAMESPACE, [urls[i]], _freeze(result), ttl)
    return [r for r in out if r is not None]


def _freeze(result: dict[str, Any]) -> list[Any]:
    """A JSON body is an orjson.Fragment (the upstream's bytes, embedded as they are): its
    bytes are stored beside the other fields and wrapped again on the way out."""
    data = result.get("data")
    if isinstance(data, orjson.Fragment):
        return [{k: v for k, v in result.items() if k != "data"}, orjson.dumps(data)]
    return [result, None]


def _thaw(stored: list[Any]) -> dict[str, Any]:
    result, fragment = stored
    if fragment is not None:
        result["data"] = orjson.Fragment(fragment)
    return dict(result)
