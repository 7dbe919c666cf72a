"""create_app(config): assembly only, no I/O."""

from __future__ import annotations

from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from server.access import ACCESS, Access, access_ctx
from server.cache import cache_ctx
from server.config import CONFIG, Config, load_config
from server.feed import feed_ctx, feed_shutdown, task_publisher_ctx
from server.fetch import http_client_ctx
from server.http import compression, cors
from server.http.compression import COMPRESSION
from server.http.cors import CORS
from server.http.negotiation import NEGOTIATOR, Negotiator
from server.http.reading import parser_process_ctx
from server.http.render import OFFERS
from server.jobs import jobs_ctx
from server.large_dataset import LARGE_DATASET, LargeDataset
from server.products import catalogue_ctx, products_cache_ctx
from server.ratelimit import ratelimit_ctx
from server.routes import setup_routes
from server.runtime import logs
from server.runtime.metrics import METRICS, Metrics, metrics_ctx
from server.storage.pool import pg_pool_ctx
from server.storage.redis_client import redis_ctx
from server.users import user_batcher_ctx


def create_app(config: Config) -> web.Application:
    """Build the application; resources open when it starts and close in reverse order."""
    # No app-level middlewares: server/routes.py binds middlewares.MIDDLEWARES onto each
    # route (see middlewares/__init__.py for why).
    app = web.Application(
        client_max_size=config.server.client_max_size,
        client_max_fields=config.server.body_max_fields,
        # request bodies are decoded by their readers, bounded (server/http/reading.read_limited):
        # aiohttp would inflate the unread rest of a refused one in full
        handler_args={"auto_decompress": False},
    )
    app[CONFIG] = config
    logs.quiet_malformed_requests()  # a client's garbage is one INFO line, not a traceback
    app[NEGOTIATOR] = Negotiator(OFFERS)
    mcfg = config.metrics
    app[METRICS] = Metrics(Path(mcfg.shared_dir) if mcfg.shared_dir else None) if mcfg.enabled else None
    app[COMPRESSION] = compression.from_config(config.compression)
    app[CORS] = cors.from_config(config.cors)  # None when no origin is allowed: no CORS work at all
    app[LARGE_DATASET] = LargeDataset(app[COMPRESSION], config.compression.dataset_ttl)
    aiohttp_jinja2.setup(app, loader=jinja2.PackageLoader("server", "templates"), autoescape=True)
    app.cleanup_ctx.append(pg_pool_ctx)
    app.cleanup_ctx.append(user_batcher_ctx)
    app.cleanup_ctx.append(catalogue_ctx)
    app.cleanup_ctx.append(redis_ctx)
    app[ACCESS] = Access(config)  # the route table binds each route's check to it
    app.cleanup_ctx.append(access_ctx)
    app.cleanup_ctx.append(ratelimit_ctx)
    app.cleanup_ctx.append(http_client_ctx)
    app.cleanup_ctx.append(parser_process_ctx)
    app.cleanup_ctx.append(metrics_ctx)
    app.cleanup_ctx.append(feed_ctx)
    app.on_shutdown.append(feed_shutdown)  # streams end before the graceful wait, not after it
    app.cleanup_ctx.append(cache_ctx)
    app.cleanup_ctx.append(products_cache_ctx)  # cached product answers follow the catalogue
    app.cleanup_ctx.append(jobs_ctx)  # keep last: running jobs finish while the pools are open
    setup_routes(app)
    return app


def create_app_from_env() -> web.Application:
    """The app from config.toml and the environment, for process managers that import an app
    factory (gunicorn 'server.app:create_app_from_env()' with aiohttp's worker class)."""
    return create_app(load_config())


def create_worker_app(config: Config) -> web.Application:
    """`python run.py worker`: the database and the job runner only, no routes, never served."""
    app = web.Application()
    app[CONFIG] = config
    app.cleanup_ctx.append(pg_pool_ctx)
    if config.redis.url:  # job progress is published on the feed (Redis) for every stream to see
        app.cleanup_ctx.append(redis_ctx)
        app.cleanup_ctx.append(task_publisher_ctx)
    app.cleanup_ctx.append(jobs_ctx)
    return app
