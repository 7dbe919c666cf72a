"""Every typed application and request key, each with a dotted unique name."""

from __future__ import annotations

from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from server.batching import KeyBatcher
from server.cache import Cache
from server.config import Config
from server.db import Database
from server.fanout import Guard
from server.negotiation import Negotiator
from server.products import Catalogue
from server.ratelimit import Decision, RateLimiter

CONFIG = web.AppKey("hotpath.config", Config)
DB = web.AppKey("hotpath.db", Database)
# None when database.batch_reads is off: reads by id then go straight to the pool.
UserBatcher = KeyBatcher[int, dict[str, Any]]
USER_BATCHER: web.AppKey[UserBatcher | None] = web.AppKey("hotpath.user_batcher")
REDIS = web.AppKey("hotpath.redis", aioredis.Redis)

CATALOGUE = web.AppKey("hotpath.catalogue", Catalogue)
NEGOTIATOR = web.AppKey("hotpath.negotiator", Negotiator)

HTTP_CLIENT = web.AppKey("hotpath.http_client", aiohttp.ClientSession)
FETCH_GUARD = web.AppKey("hotpath.fetch_guard", Guard)
RATE_LIMITER = web.AppKey("hotpath.rate_limiter", RateLimiter)
CACHE = web.AppKey("hotpath.cache", Cache)

REQUEST_ID = web.RequestKey("hotpath.request_id", str)
RATE_LIMIT = web.RequestKey("hotpath.rate_limit", Decision)
