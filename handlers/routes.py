"""The one route table: every route named, ids constrained to digits."""

from __future__ import annotations

from aiohttp import web

from handlers import health, meta, products, users

ROUTES: tuple[web.RouteDef, ...] = (
    web.get("/health", health.health, name="health", allow_head=True),
    web.get("/ready", health.ready, name="ready", allow_head=True),
    web.get("/openapi.json", meta.openapi, name="openapi"),
    web.post("/users", users.create_user, name="users_create"),
    web.get("/users", users.list_users, name="users"),
    web.get(r"/users/{user_id:\d+}", users.get_user, name="user"),
    web.patch(r"/users/{user_id:\d+}", users.update_user, name="user_update"),
    web.delete(r"/users/{user_id:\d+}", users.delete_user, name="user_delete"),
    web.get(r"/users/{user_id:\d+}/profile", users.get_profile, name="user_profile"),
    web.get("/products", products.list_products, name="products"),
)


def setup_routes(app: web.Application) -> None:
    app.router.add_routes(ROUTES)
