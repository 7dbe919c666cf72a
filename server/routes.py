"""The one route table: every route named, ids canonical numbers (ASCII digits, no leading
zero, at most as many digits as a bigint has; matched by server/http/routing.py's DigitsResource,
without a regular expression)."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from handlers import cache, datasets, feed, fetch, health, legacy, meta, products, tasks, users
from middlewares import bind, chain_for, compose
from middlewares.request_context import Quick
from server.config import CONFIG
from server.http import routing
from server.http.routing import number

USER_ID = number("user_id", 19)  # a PostgreSQL bigint has at most 19 digits
TASK_ID = number("task_id", 19)

ROUTES: tuple[web.RouteDef, ...] = (
    web.get("/health", health.health, name="health", allow_head=True),
    web.get("/ready", health.ready, name="ready", allow_head=True),
    web.get("/openapi.json", meta.openapi, name="openapi"),
    web.get("/docs", meta.docs, name="docs"),
    web.get("/metrics", meta.metrics, name="metrics"),
    # aiohttp tries the resources under one prefix ("/users") in this order, each a coroutine
    # call: the cached reads come first, so a GET /users/{id} matches at the first try.
    web.get("/users/" + USER_ID, users.get_user, name="user"),
    web.get("/users/" + USER_ID + "/profile", users.get_profile, name="user_profile"),
    web.patch("/users/" + USER_ID, users.update_user, name="user_update"),
    web.delete("/users/" + USER_ID, users.delete_user, name="user_delete"),
    web.post("/users", users.create_user, name="users_create"),
    web.get("/users", users.list_users, name="users"),
    web.get("/users/export", datasets.export_users, name="users_export"),
    web.get("/products", products.list_products, name="products"),
    web.get("/protected-endpoint", legacy.protected, name="protected"),
    web.post("/process-urls", fetch.process_urls, name="process_urls"),
    web.get("/stream-json/" + number("record_count", 12), datasets.stream_json, name="stream_json"),
    web.get("/stream-csv/" + number("record_count", 12), datasets.stream_csv, name="stream_csv"),
    web.get("/large-dataset", datasets.large_dataset, name="large_dataset"),
    web.get("/stream-real-time", feed.stream, name="stream_real_time", allow_head=False),
    web.get("/events", feed.stream, name="events", allow_head=False),
    web.post("/events", feed.publish, name="events_publish"),
    web.get("/feed", feed.page, name="feed"),
    web.post("/send-notification", tasks.send_notification, name="send_notification"),
    web.post("/generate-report", tasks.generate_report, name="generate_report"),
    web.post("/bulk-process", tasks.bulk_process, name="bulk_process"),
    web.get("/task-status/" + TASK_ID, tasks.task_status, name="task_status"),
    web.delete("/task-status/" + TASK_ID, tasks.cancel_task, name="task_cancel"),
    web.get("/tasks", tasks.list_tasks, name="tasks"),
    web.get("/tasks/" + TASK_ID + "/events", feed.task_stream, name="task_events", allow_head=False),
    web.get("/reports/" + number("report_id", 19), tasks.get_report, name="report"),
    web.get("/expensive-calculation/" + number("value", 9), cache.expensive, name="expensive_calculation"),
    web.get("/cache/stats", cache.stats, name="cache_stats"),
)
# Handlers that can often answer at once, with nothing to await (middlewares/request_context.py):
# route name -> (route name, app) -> the handler's quick answer.
QUICK_HANDLERS: dict[str, Callable[[str, web.Application], Quick]] = {"products": products.quick_for}
UNMATCHED = "unmatched"


async def unmatched(request: web.Request) -> web.StreamResponse:
    """Catch-all route, registered last: 405 with Allow when another route has this path,
    404 otherwise. It runs through the same middleware chain as every other route."""
    own = request.match_info.route.resource
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is own:
            continue
        match, methods = await resource.resolve(request)
        if match is None and methods:
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def setup_routes(app: web.Application) -> None:
    """Register every route with its own middleware chain (see middlewares/__init__.py)."""
    config = app[CONFIG]
    for route in ROUTES:
        name = route.kwargs["name"]
        quick = QUICK_HANDLERS[name](name, app) if name in QUICK_HANDLERS else None
        handler = compose(route.handler, bind(chain_for(name, config), name, app, quick))
        routing.register(app.router, web.RouteDef(route.method, route.path, handler, route.kwargs))
    # [\s\S]*, not .*: a path may hold an encoded newline (%0A), and "." stops at it
    app.router.add_route(
        "*",
        r"/{tail:[\s\S]*}",
        compose(unmatched, bind(chain_for(UNMATCHED, config), UNMATCHED, app)),
        name=UNMATCHED,
    )
