"""API keys with scopes: stored as digests in PostgreSQL (apikeys.py), verified per request from
memory (verifier.py), checked per route as the route table declares (guard.py), changes heard
from every process through Redis; stream tokens for browsers (tokens.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from server.access.apikeys import KeyStore
from server.access.changes import redis_db
from server.access.guard import Guard
from server.access.scopes import ADMIN, READ, SCOPES
from server.access.verifier import Access
from server.config import CONFIG, AuthConfig
from server.storage.pool import DB
from server.storage.redis_client import REDIS

__all__ = ["ACCESS", "Access", "Guard", "KeyStore", "access_ctx", "declare", "route_opened"]

ACCESS = web.AppKey("hotpath.access", Access)
# the guards of an app's routes, by route name (filled by declare() while routes are set up)
GUARDS = web.AppKey("hotpath.guards", dict[str, Guard])


def route_opened(cfg: AuthConfig, route: str) -> bool:
    """The route is opened by auth.open_routes (by name, or "*"): no check applies to it."""
    return "*" in cfg.open_routes or route in cfg.open_routes


def declare(
    app: web.Application,
    route: str,
    scopes: tuple[str, ...],
    public: bool,
    streams: bool,
    also: tuple[str, ...] = (),
) -> None:
    """Bind the access check of one route from its declaration (server/routes.py): `scopes`
    (any one of them admits; empty: no check at all), `also` (needed as well), `public` (a
    read of public data), `streams` (an event stream: stream tokens accepted)."""
    if not scopes:
        return
    unknown = [scope for scope in (*scopes, *also) if scope not in SCOPES]
    if unknown:
        raise ValueError(f"route {route} names unknown scopes {unknown}")
    access = app[ACCESS]
    cfg = access.config
    open_ = route_opened(cfg, route) or (public and cfg.public_reads)
    if scopes == (ADMIN,):  # the admin routes are never open, not even with open_routes = ["*"]
        open_ = False
    if public:
        scopes = tuple(dict.fromkeys((*scopes, READ)))
    alias = app[CONFIG].ratelimit.key_header
    app.setdefault(GUARDS, {})[route] = Guard(access, scopes, open_, alias, streams, also)


async def access_ctx(app: web.Application) -> AsyncIterator[None]:
    """Load the keys, subscribe to their changes, and record their use until shutdown."""
    access = app[ACCESS]
    redis = app[REDIS]
    await access.open(KeyStore(app[DB]), redis, redis_db(redis), app[CONFIG].redis.connect_timeout * 2)
    yield
    await access.close()
