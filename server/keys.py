"""Every typed application and request key, each with a dotted unique name."""

from __future__ import annotations

from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from server.cache.core import Cache
from server.config import Config
from server.feed.core import Feed
from server.fetch.client import Guard
from server.http.compression import Compression
from server.http.negotiation import Negotiator
from server.http.parser_process import ParserProcess
from server.jobs.runner import Engine, Runner
from server.large_dataset import LargeDataset
from server.products import Catalogue
from server.ratelimit.limiter import Decision, RateLimiter
from server.runtime.metrics import Metrics
from server.storage.batching import KeyBatcher
from server.storage.db import Database

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
FEED = web.AppKey("hotpath.feed", Feed)
# Parses YAML and bulk CSV bodies too costly for the event loop (a child process).
PARSER_PROCESS = web.AppKey("hotpath.parser_process", ParserProcess)

# None when metrics.enabled is off: the request middleware then counts nothing.
METRICS: web.AppKey[Metrics | None] = web.AppKey("hotpath.metrics")
JOBS = web.AppKey("hotpath.jobs", Engine)
# None when this process runs no jobs (jobs.concurrency = 0).
JOB_RUNNER: web.AppKey[Runner | None] = web.AppKey("hotpath.job_runner")
CACHE = web.AppKey("hotpath.cache", Cache)

REQUEST_ID = web.RequestKey("hotpath.request_id", str)
RATE_LIMIT = web.RequestKey("hotpath.rate_limit", Decision)

# Compression (issue 4): negotiator, filters, compressed-body cache and ETags of kept
# bodies; the cached /large-dataset document.
COMPRESSION = web.AppKey("hotpath.compression", Compression)
LARGE_DATASET = web.AppKey("hotpath.large_dataset", LargeDataset)
