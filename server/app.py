"""create_app(config): assembly only, no I/O."""

from __future__ import annotations

import aiohttp_jinja2
import jinja2
from aiohttp import web

from handlers.routes import setup_routes
from server.config import Config
from server.keys import CONFIG, NEGOTIATOR
from server.negotiation import Negotiator
from server.render import OFFERS
from server.resources import (
    cache_ctx,
    catalogue_ctx,
    http_client_ctx,
    pg_pool_ctx,
    ratelimit_ctx,
    redis_ctx,
    user_batcher_ctx,
)


def create_app(config: Config) -> web.Application:
    """Build the application; resources open when it starts and close in reverse order."""
    # No app-level middlewares: handlers/routes.py binds middlewares.MIDDLEWARES onto each
    # route (see middlewares/__init__.py for why).
    app = web.Application(client_max_size=config.server.client_max_size)
    app[CONFIG] = config
    app[NEGOTIATOR] = Negotiator(OFFERS)
    aiohttp_jinja2.setup(app, loader=jinja2.PackageLoader("server", "templates"), autoescape=True)
    app.cleanup_ctx.append(pg_pool_ctx)
    app.cleanup_ctx.append(user_batcher_ctx)
    app.cleanup_ctx.append(catalogue_ctx)
    app.cleanup_ctx.append(redis_ctx)
    app.cleanup_ctx.append(ratelimit_ctx)
    app.cleanup_ctx.append(http_client_ctx)
    app.cleanup_ctx.append(cache_ctx)
    setup_routes(app)
    return app
