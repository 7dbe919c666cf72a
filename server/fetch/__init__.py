"""Fan-out fetching of external URLs through one shared client, and its cache."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from server.config import CONFIG
from server.fetch.client import Guard, GuardedResolver

HTTP_CLIENT = web.AppKey("hotpath.http_client", aiohttp.ClientSession)
FETCH_GUARD = web.AppKey("hotpath.fetch_guard", Guard)


async def http_client_ctx(app: web.Application) -> AsyncIterator[None]:
    """The one shared ClientSession, its connector behind the SSRF-guarding resolver."""
    cfg = app[CONFIG].fetch
    guard = Guard(cfg.allow)
    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(guard),
        limit=cfg.connections,
        limit_per_host=cfg.per_host,
        ttl_dns_cache=cfg.dns_cache_ttl,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": cfg.user_agent, "Accept-Encoding": "gzip, deflate"},
        auto_decompress=False,  # fanout decompresses itself, bounded (zip-bomb safe)
        trust_env=False,  # never route through a proxy named by the environment
    )
    app[FETCH_GUARD] = guard
    app[HTTP_CLIENT] = session
    yield
    await session.close()
