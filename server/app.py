"""create_app(config): assembly only, no I/O."""

from __future__ import annotations

from aiohttp import web

from handlers.routes import setup_routes
from middlewares import MIDDLEWARES
from middlewares.request_context import add_request_id_header
from server.config import Config
from server.keys import CONFIG
from server.resources import pg_pool_ctx, redis_ctx, user_batcher_ctx


def create_app(config: Config) -> web.Application:
    """Build the application; resources open when it starts and close in reverse order."""
    app = web.Application(middlewares=MIDDLEWARES, client_max_size=config.server.client_max_size)
    app[CONFIG] = config
    app.cleanup_ctx.append(pg_pool_ctx)
    app.cleanup_ctx.append(user_batcher_ctx)
    app.cleanup_ctx.append(redis_ctx)
    app.on_response_prepare.append(add_request_id_header)
    setup_routes(app)
    return app
