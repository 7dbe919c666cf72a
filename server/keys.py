"""Every typed application and request key, each with a dotted unique name."""

from __future__ import annotations

import redis.asyncio as aioredis
from aiohttp import web

from server.config import Config
from server.db import Database

CONFIG = web.AppKey("hotpath.config", Config)
DB = web.AppKey("hotpath.db", Database)
REDIS = web.AppKey("hotpath.redis", aioredis.Redis)

REQUEST_ID = web.RequestKey("hotpath.request_id", str)
REQUEST_START = web.RequestKey("hotpath.request_start", float)
