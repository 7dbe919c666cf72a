"""Every typed application and request key, each with a dotted unique name."""

from __future__ import annotations

import asyncpg
import redis.asyncio as aioredis
from aiohttp import web

from server.config import Config

CONFIG = web.AppKey("hotpath.config", Config)
PG_POOL = web.AppKey("hotpath.pg_pool", asyncpg.Pool)
REDIS = web.AppKey("hotpath.redis", aioredis.Redis)

REQUEST_ID = web.RequestKey("hotpath.request_id", str)
REQUEST_START = web.RequestKey("hotpath.request_start", float)
