"""The one route table: every route named, with its operation (what the API document says of
it). Ids are canonical numbers (ASCII digits, no leading zero, at most as many digits as a
bigint has), matched by server/http/routing.py's DigitsResource, without a regular expression."""

from __future__ import annotations

import functools
from dataclasses import replace

from aiohttp import web

from handlers import admin, calculation, datasets, feed, fetch, health, legacy, meta, products, tasks, users
from middlewares import bound_handler
from middlewares.ratelimit import WRITES
from server import calculation as calculation_service
from server import products as catalogue
from server import records
from server import users as users_service
from server.access import declare
from server.access.scopes import ADMIN, FEED_PUBLISH, FETCH, JOBS, METRICS, READ, USERS_READ, USERS_WRITE
from server.config import CONFIG, ConfigError
from server.http import routing
from server.http.layers import CATCH_ALL
from server.http.openapi import DOCUMENT, Document, body, document_of
from server.http.operations import (
    STRING,
    Body,
    Operation,
    Param,
    Problem,
    Response,
    Route,
    delete,
    get,
    patch,
    post,
)
from server.http.routing import PathNumber
from server.jobs.kinds import REPORT
from server.large_dataset import DATASET_SCHEMA
from server.ratelimit.policy import RATE_HEADERS, REFUSED_HEADERS

USER_ID = PathNumber("user_id", 19, "numeric user id")  # a PostgreSQL bigint has at most 19 digits
TASK_ID = PathNumber("task_id", 19, "numeric task id")
REPORT_ID = PathNumber(
    "report_id", 19, "numeric report id (a completed generate_report task's result names it)"
)
RECORD_COUNT = PathNumber("record_count", 12, "how many records (at most streaming.max_records)")
VALUE = PathNumber("value", 9, "at most cache.expensive_max")
KEY_ID = PathNumber("key_id", 19, "numeric key id")

# Each tag groups the operations of one area in the API document.
TAGS = {
    "health": "Liveness and readiness",
    "meta": "The API contract and the operator's metrics",
    "users": "Users in PostgreSQL: create, read, update, delete, pages, profiles, the export",
    "products": "The product catalogue, served from memory",
    "rate limiting": "A rate-limited resource of the earlier service",
    "fetch": "Fetching many URLs at once",
    "datasets": "Streamed and cached datasets",
    "feed": "The real-time feed (server-sent events)",
    "tasks": "Background tasks and the reports they make",
    "cache": "The two-layer cache",
    "admin": "API keys and the audit log (the admin scope); every call is written to the audit log",
}

# The problems many operations share.
UNAVAILABLE = "database or Redis unavailable; see Retry-After"
NO_USER = "no such user"
# A task belongs to the key family that made it: another key's task is "not found" too, so its
# existence is not revealed (an admin's key reads and cancels every task).
NO_TASK = "no such task (or not yours)"
# Reading and cancelling tasks: a key with `jobs` its own tasks, a key with `admin` every task.
_TASK_READ = (JOBS, ADMIN)
NO_KEY = "no such key, or it is revoked or expired already"
# represent(etag=True), the kept answers and the cache middleware honour If-None-Match.
NOT_MODIFIED = Response("the client's copy (If-None-Match) is current")
_CREATED_HEADERS = {"Location": {"schema": {"type": "string"}, "description": "URL of the new user"}}
_HTML = {"text/html": STRING}
# POST /send-notification, /generate-report, /bulk-process: accepted, or the task a key made.
_ACCEPTED: dict[int, Response | Problem | str] = {
    202: Response("accepted: poll status_url", tasks.TASK_ACCEPTED, headers=tasks.ACCEPTED_HEADERS),
    200: Response("this Idempotency-Key already made a task: that task", tasks.TASK_ACCEPTED),
    409: "the Idempotency-Key was used for a different request",
    503: UNAVAILABLE,
}
# GET /events and /stream-real-time
_STREAM: dict[int, Response | Problem | str] = {
    200: feed.EVENT_STREAM,
    400: "unknown channel or malformed last event id",
    503: "feed.max_subscribers streams are open on this process, or it is shutting down; Retry-After",
}
# Who may open a stream: anyone while auth.public_reads is on (public channels), any key that
# can read one channel; which channels it then gets is the feed's decision (server/feed/audience.py).
_FEED_READERS = (READ, USERS_READ, JOBS, ADMIN)
_CHANNEL_ACCESS = (
    "Private channels (feed.private_channels: users, tasks) need a key or a stream token "
    "(POST /feed/tokens) allowed to read them: users needs users:read, tasks gives a key the "
    "events of its own tasks (admin: every one). Without a key, public channels only: the "
    "default channels narrow to what the caller may read, and a private channel named in "
    "?channels= without the right to read it is a 403 whose `channel` names it (so is one a "
    "stream token does not name). A stream ends with an `expired` event (and a retry: hint) "
    "when its stream token or key expires, and with `revoked` when its key is revoked."
)


_OWNED = (
    "A task belongs to the API key that made it (with its rotations): only that key, or one with "
    "`admin`, sees it; any other caller gets 404. Tasks made without a key (on an open route) are "
    "seen by callers without a key."
)


# Every write carries the rate limiter (middlewares/ratelimit.py): its route's policy, or the
# key's own rate where the route has none. Said once here for all of them, not in each row.
RATE_LIMITED = Problem(
    "rate limited (the route's policy in ratelimit.policies, or the key's own rate): "
    "Retry-After, RateLimit and X-Rate-* headers, `rate_info`",
    REFUSED_HEADERS,
)


def _writes_limited(*routes: Route) -> tuple[Route, ...]:
    """`routes`, each write among them answering 429 as well (unless it says so itself)."""
    return tuple(
        replace(
            route,
            operation=replace(route.operation, responses={429: RATE_LIMITED, **route.operation.responses}),
        )
        if route.method in WRITES and 429 not in route.operation.responses
        else route
        for route in routes
    )


def _task_create(
    summary: str, fields: Body, query: tuple[Param, ...] = (), also: tuple[str, ...] = ()
) -> Operation:
    """POST of a task: its fields as a body (or, from the old clients, as query parameters).
    `also`: what the task touches besides (a report reads users, an import writes them)."""
    return Operation(
        summary,
        ("tasks",),
        _ACCEPTED,
        negotiated=True,
        body=fields,
        query=(tasks.IDEMPOTENCY_KEY, *query),
        scopes=(JOBS,),
        also=also,
    )


API: tuple[Route, ...] = _writes_limited(
    get(
        "/health",
        health.health,
        "health",
        Operation("Liveness (no I/O)", ("health",), {200: Response("alive", health.HEALTH)}),
    ),
    get(
        "/ready",
        health.ready,
        "ready",
        Operation(
            "Readiness: PostgreSQL and Redis checks",
            ("health",),
            {
                200: Response("every check passed", health.READY),
                503: "a check failed; `checks` has each result",
            },
        ),
    ),
    get(
        "/openapi.json",
        meta.openapi,
        "openapi",
        Operation("This document", ("meta",), {200: Response("OpenAPI 3.1 document", {"type": "object"})}),
    ),
    get(
        "/docs",
        meta.docs,
        "docs",
        Operation(
            "This document as a self-contained HTML page",
            ("meta",),
            {200: Response("HTML", content=_HTML)},
        ),
    ),
    get(
        "/metrics",
        meta.metrics,
        "metrics",
        Operation(
            "Prometheus metrics of every worker (text exposition format 0.0.4)",
            ("meta",),
            {
                200: Response("metrics", content={"text/plain": STRING}),
                404: "metrics.enabled is false",
            },
            description="Needs a key with the `metrics` scope, or metrics.token as the bearer token.",
            scopes=(METRICS,),
        ),
    ),
    # aiohttp tries the resources under one prefix ("/users") in this order, each a coroutine
    # call: the cached reads come first, so a GET /users/{id} matches at the first try.
    get(
        ("/users/", USER_ID),
        users.get_user,
        "user",
        Operation(
            "Read a user",
            ("users",),
            {
                200: Response("the user", users_service.USER),
                304: NOT_MODIFIED,
                404: NO_USER,
                503: UNAVAILABLE,
            },
            negotiated=True,
            scopes=(USERS_READ,),
        ),
    ),
    get(
        ("/users/", USER_ID, "/profile"),
        users.get_profile,
        "user_profile",
        Operation(
            "A user with derived profile fields",
            ("users",),
            {
                200: Response("the profile", users_service.PROFILE),
                304: NOT_MODIFIED,
                404: NO_USER,
                503: UNAVAILABLE,
            },
            negotiated=True,
            scopes=(USERS_READ,),
        ),
    ),
    patch(
        ("/users/", USER_ID),
        users.update_user,
        "user_update",
        Operation(
            "Change a user's name and/or email",
            ("users",),
            {
                200: Response("the updated user", users_service.USER),
                404: NO_USER,
                409: "email already used",
                503: UNAVAILABLE,
            },
            negotiated=True,
            body=body(users_service.USER_PATCH),
            scopes=(USERS_WRITE,),
        ),
    ),
    delete(
        ("/users/", USER_ID),
        users.delete_user,
        "user_delete",
        Operation(
            "Delete a user",
            ("users",),
            {204: Response("deleted"), 404: NO_USER, 503: UNAVAILABLE},
            scopes=(USERS_WRITE,),
        ),
    ),
    post(
        "/users",
        users.create_user,
        "users_create",
        Operation(
            "Create a user",
            ("users",),
            {
                201: Response("created", users_service.USER, headers=_CREATED_HEADERS),
                409: "email already used (case-insensitive)",
                503: UNAVAILABLE,
            },
            negotiated=True,
            body=body(users_service.USER_CREATE),
            scopes=(USERS_WRITE,),
        ),
    ),
    get(
        "/users",
        users.list_users,
        "users",
        Operation(
            "List users in id order (keyset pagination)",
            ("users",),
            {
                200: Response("a page", users.USER_PAGE),
                422: "after or limit is not an integer, or is below its minimum",
                503: UNAVAILABLE,
            },
            negotiated=True,
            query=users.PAGE_QUERY,
            scopes=(USERS_READ,),
        ),
    ),
    get(
        "/users/export",
        datasets.export_users,
        "users_export",
        Operation(
            "Every user, streamed from one database snapshot (JSON array, NDJSON or CSV)",
            ("users", "datasets"),
            {
                200: Response(
                    "users, streamed",
                    content={
                        "application/json": {"type": "array", "items": users_service.USER},
                        datasets.NDJSON: STRING,
                        "text/csv": STRING,
                    },
                ),
                400: "unknown format",
                406: "Accept names none of the export's types",
                422: datasets.EXPORT_SINCE_PROBLEM,
                503: UNAVAILABLE,
            },
            query=datasets.EXPORT_QUERY,
            scopes=(USERS_READ,),
        ),
    ),
    get(
        "/products",
        products.list_products,
        "products",
        Operation(
            "The product catalogue (served from memory, refreshed on every change)",
            ("products",),
            {
                200: Response("a page of products", catalogue.PRODUCT_PAGE),
                304: NOT_MODIFIED,
                422: "page or limit is not an integer, or is below its minimum",
            },
            negotiated=True,
            query=products.PAGE_QUERY,
            scopes=(READ,),
            public=True,
        ),
        quick=products.quick_for,  # the kept answer, tried before the handler is awaited
    ),
    get(
        "/protected-endpoint",
        legacy.protected,
        "protected",
        Operation(
            "A rate-limited resource (policy `ratelimit.policies.protected`)",
            ("rate limiting",),
            {
                200: Response(
                    "allowed, with the caller's rate info", legacy.PROTECTED_SCHEMA, headers=RATE_HEADERS
                ),
                429: Problem(
                    "limited: `rate_info`, Retry-After, RateLimit and X-Rate-* headers", REFUSED_HEADERS
                ),
                503: UNAVAILABLE,
            },
            negotiated=True,
            scopes=(READ,),
        ),
    ),
    post(
        "/process-urls",
        fetch.process_urls,
        "process_urls",
        Operation(
            "Fetch many URLs at once (SSRF-guarded), results in request order",
            ("fetch",),
            {
                200: Response("one result per URL", fetch.FETCH_RESPONSE),
                422: "not an array of URLs, too many URLs, or a bad timeout",
            },
            body=body(fetch.FETCH_REQUEST),
            scopes=(FETCH,),
        ),
    ),
    get(
        ("/stream-json/", RECORD_COUNT),
        datasets.stream_json,
        "stream_json",
        Operation(
            "Synthetic records streamed as a JSON array (or NDJSON with ?format=ndjson)",
            ("datasets",),
            {
                200: Response(
                    "records 1..record_count, streamed",
                    content={
                        "application/json": {"type": "array", "items": records.RECORD},
                        datasets.NDJSON: STRING,
                    },
                ),
                400: "record_count above streaming.max_records, or an unknown format",
            },
            query=datasets.STREAM_QUERY,
            scopes=(READ,),
            public=True,
        ),
    ),
    get(
        ("/stream-csv/", RECORD_COUNT),
        datasets.stream_csv,
        "stream_csv",
        Operation(
            "Synthetic records streamed as CSV (header id,name,email,created_at)",
            ("datasets",),
            {
                200: Response("CSV, streamed", content={"text/csv": STRING}),
                400: "record_count above streaming.max_records",
            },
            query=(datasets.DOWNLOAD,),
            scopes=(READ,),
            public=True,
        ),
    ),
    get(
        "/large-dataset",
        datasets.large_dataset,
        "large_dataset",
        Operation(
            "1000 records from cached encoded bytes (strong ETag, Cache-Control; "
            "compressed per Accept-Encoding; If-None-Match gives 304)",
            ("datasets",),
            {
                200: Response("the dataset", DATASET_SCHEMA),
                304: NOT_MODIFIED,
            },
            negotiated=True,
            scopes=(READ,),
            public=True,
        ),
    ),
    get(
        "/stream-real-time",
        feed.stream,
        "stream_real_time",
        Operation(
            "The live event stream (default channel: ticker, as the old clients expect)",
            ("feed",),
            _STREAM,
            description=_CHANNEL_ACCESS,
            query=feed.STREAM_QUERY,
            scopes=_FEED_READERS,
            public=True,
            stream_token=True,
        ),
        allow_head=False,
    ),
    get(
        "/events",
        feed.stream,
        "events",
        Operation(
            "The live event stream (default: every channel the caller may read)",
            ("feed",),
            _STREAM,
            description=_CHANNEL_ACCESS,
            query=feed.STREAM_QUERY,
            scopes=_FEED_READERS,
            public=True,
            stream_token=True,
        ),
        allow_head=False,
    ),
    post(
        "/events",
        feed.publish,
        "events_publish",
        Operation(
            "Publish an event to a channel's subscribers (the `feed:publish` scope, or feed.admin_token)",
            ("feed",),
            {
                201: Response("published", feed.FEED_PUBLISHED),
                422: "unknown channel, bad event name, missing data",
                503: UNAVAILABLE,
            },
            body=body(feed.FEED_EVENT),
            scopes=(FEED_PUBLISH,),
        ),
    ),
    post(
        "/feed/tokens",
        feed.issue_token,
        "feed_tokens",
        Operation(
            "A short-lived stream token for some feed channels, for clients that cannot send "
            "Authorization (a browser's EventSource: /events?token=...)",
            ("feed",),
            {
                201: Response(
                    "the token (shown once; signed, not stored), with Cache-Control: no-store",
                    feed.FEED_TOKEN,
                ),
                422: "unknown channel, no channels, or ttl outside 1..auth.stream_token_max_ttl",
            },
            description="Each channel asked for must be readable by the key: public ones by any key, "
            "users with users:read, tasks with jobs (the token then carries the key's own tasks); "
            "otherwise 403, with `channel` naming the first that is not. "
            "The token lives auth.stream_token_ttl seconds unless `ttl` asks for another lifetime, "
            "never beyond its key; a stream opened with it ends when it expires or its key is revoked.",
            body=body(feed.FEED_TOKEN_REQUEST),
            query=feed.TOKEN_QUERY,
            scopes=_FEED_READERS,
        ),
    ),
    get(
        "/feed",
        feed.page,
        "feed",
        Operation(
            "The live feed page (HTML; opens an EventSource on /events)",
            ("feed",),
            {200: Response("the page", content=_HTML)},
        ),
    ),
    post(
        "/send-notification",
        tasks.send_notification,
        "send_notification",
        _task_create(
            "Email someone (SMTP relay, or the Maildir outbox when none is configured), in the background",
            tasks.NOTIFICATION_BODY,
            tasks.NOTIFICATION_QUERY,
        ),
    ),
    post(
        "/generate-report",
        tasks.generate_report,
        "generate_report",
        _task_create(
            "Build a report from the database in the background; the finished task links to /reports/{id}",
            tasks.REPORT_BODY,
            tasks.REPORT_QUERY,
            also=(USERS_READ,),  # a report shows users' data (user-activity: name and email)
        ),
    ),
    post(
        "/bulk-process",
        tasks.bulk_process,
        "bulk_process",
        _task_create(
            "Import user records (validated per row, upserted by email) in the background",
            tasks.BULK_BODY,
            also=(USERS_WRITE,),  # it creates and changes users
        ),
    ),
    get(
        ("/task-status/", TASK_ID),
        tasks.task_status,
        "task_status",
        Operation(
            "A task's status, progress, attempts and (when completed) result",
            ("tasks",),
            {200: Response("the task", tasks.TASK_SCHEMA), 404: NO_TASK, 503: UNAVAILABLE},
            negotiated=True,
            description=_OWNED,
            scopes=_TASK_READ,
        ),
    ),
    delete(
        ("/task-status/", TASK_ID),
        tasks.cancel_task,
        "task_cancel",
        Operation(
            "Cancel a task: queued ones at once, processing ones at their next progress point",
            ("tasks",),
            {
                200: Response("cancelled", tasks.TASK_SCHEMA),
                202: Response("cancellation requested; the task is still processing", tasks.TASK_SCHEMA),
                404: NO_TASK,
                409: "the task is already completed, failed or cancelled",
                503: UNAVAILABLE,
            },
            negotiated=True,
            description=_OWNED,
            scopes=_TASK_READ,
        ),
    ),
    get(
        "/tasks",
        tasks.list_tasks,
        "tasks",
        Operation(
            "List tasks in id order (keyset pagination), optionally in one state",
            ("tasks",),
            {200: Response("a page", tasks.TASK_PAGE), 422: "bad state, after or limit", 503: UNAVAILABLE},
            negotiated=True,
            query=tasks.PAGE_QUERY,
            description="Only the tasks of the calling key's family (every task for a key with `admin`; "
            "without a key, on an open route, the tasks made without a key).",
            scopes=_TASK_READ,
        ),
    ),
    get(
        ("/tasks/", TASK_ID, "/events"),
        feed.task_stream,
        "task_events",
        Operation(
            "The task's state now, then each change as it happens (server-sent events), "
            "until it is completed, failed or cancelled",
            ("tasks", "feed"),
            {
                200: replace(feed.EVENT_STREAM, description="text/event-stream of the task's changes"),
                404: NO_TASK,
                503: UNAVAILABLE,
            },
            description="Events: task.created, task.retrying, task.progress, task.completed, task.failed, "
            "task.cancelled; each `data` is the task as GET /task-status/{task_id} shows it (JSON). "
            "Heartbeat comments keep the connection open; `shutdown` ends it when the server stops. "
            "A stream token (?token=) must name the tasks channel (403 otherwise); `expired` and "
            "`revoked` end the stream with its credential. " + _OWNED,
            scopes=_TASK_READ,
            stream_token=True,
        ),
        allow_head=False,
    ),
    get(
        ("/reports/", REPORT_ID),
        tasks.get_report,
        "report",
        Operation(
            "A generated report (CSV gives its rows)",
            ("tasks",),
            {200: Response("the report", REPORT), 404: "no such report (or not yours)", 503: UNAVAILABLE},
            negotiated=True,
            description="A report belongs to the owner of the task that made it, as the task does.",
            scopes=_TASK_READ,
        ),
    ),
    get(
        ("/expensive-calculation/", VALUE),
        calculation.expensive,
        "expensive_calculation",
        Operation(
            "Sum of i*i for i in range(value * 1000), computed off the loop, cached per value",
            ("cache",),
            {
                200: Response("the result", calculation_service.CALCULATION, headers=calculation.X_CACHE),
                422: "value above cache.expensive_max",
            },
            scopes=(READ,),
            public=True,
        ),
    ),
    get(
        "/cache/stats",
        calculation.stats,
        "cache_stats",
        Operation(
            "This process's cache counters: hits and misses per layer, evictions, loads, L1 size",
            ("cache",),
            {200: Response("counters", calculation.CACHE_STATS)},
            scopes=(METRICS,),
        ),
    ),
    get(
        "/admin/scopes",
        admin.scopes,
        "admin_scopes",
        Operation(
            "Every scope a key can hold, with what it allows",
            ("admin",),
            {200: Response("the scopes", admin.SCOPE_LIST), 503: UNAVAILABLE},
            scopes=(ADMIN,),
        ),
    ),
    get(
        "/admin/keys",
        admin.list_keys,
        "admin_keys",
        Operation(
            "The keys (active ones; ?all=1: revoked and expired too), without their secrets",
            ("admin",),
            {200: Response("the keys", admin.API_KEY_LIST), 422: "all is not 0 or 1", 503: UNAVAILABLE},
            query=admin.KEYS_QUERY,
            scopes=(ADMIN,),
        ),
    ),
    post(
        "/admin/keys",
        admin.create_key,
        "admin_keys_create",
        Operation(
            "Make a key: the answer shows it this once (`key`)",
            ("admin",),
            {201: Response("made", admin.API_KEY_CREATED), 503: UNAVAILABLE},
            description="Every process applies the new key within a message's time (Redis pub/sub).",
            body=body(admin.API_KEY_CREATE),
            scopes=(ADMIN,),
        ),
    ),
    post(
        ("/admin/keys/", KEY_ID, "/rotate"),
        admin.rotate_key,
        "admin_key_rotate",
        Operation(
            "Issue a replacement of a key (same name, scopes, rate, expiry and tasks); the old key "
            "keeps working for the overlap",
            ("admin",),
            {
                201: Response(
                    "the replacement, shown this once (`key`), and the rotated key", admin.API_KEY_ROTATED
                ),
                404: NO_KEY,
                409: "the key was rotated already: rotate its replacement",
                503: UNAVAILABLE,
            },
            body=body(admin.API_KEY_ROTATE, required=False),
            scopes=(ADMIN,),
        ),
    ),
    delete(
        ("/admin/keys/", KEY_ID),
        admin.revoke_key,
        "admin_key_revoke",
        Operation(
            "Revoke a key: every process refuses it within a second",
            ("admin",),
            {200: Response("revoked", admin.API_KEY), 404: NO_KEY, 503: UNAVAILABLE},
            scopes=(ADMIN,),
        ),
    ),
    get(
        "/admin/audit",
        admin.audit,
        "admin_audit",
        Operation(
            "The audit log, newest first (keyset pagination: ?before=<id>)",
            ("admin",),
            {
                200: Response("a page", admin.AUDIT_PAGE),
                422: "before or limit is not an integer, or is below its minimum",
                503: UNAVAILABLE,
            },
            query=admin.AUDIT_QUERY,
            scopes=(ADMIN,),
        ),
    ),
)
# What aiohttp registers, one definition per declared route.
ROUTES: tuple[web.RouteDef, ...] = tuple(route.definition for route in API)
UNMATCHED = CATCH_ALL


async def unmatched(request: web.Request) -> web.StreamResponse:
    """Catch-all route, registered last: 405 with Allow when another route has this path,
    404 otherwise. It runs through the same middleware chain as every other route. No route
    declares OPTIONS, so every OPTIONS request comes here; CORS preflights among them are
    answered by this route's outermost layer before they reach it (server/http/cors.py)."""
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


@functools.cache
def api_document() -> Document:
    """The route table's API document: the same for every app, so derived once per process."""
    return document_of(API, TAGS)


def setup_routes(app: web.Application) -> None:
    """Register every route with its own middleware chain (see middlewares/__init__.py), and
    the API document derived from their declarations (served by handlers/meta.py)."""
    config = app[CONFIG]
    unknown = sorted(set(config.auth.open_routes) - {"*"} - {route.name for route in API})
    if unknown:
        raise ConfigError(
            "auth.open_routes", f"no route is named {', '.join(unknown)} (see /openapi.json's operationId)"
        )
    admin_only = {r.name for r in API if r.operation.scopes == (ADMIN,)}
    admin_routes = sorted(set(config.auth.open_routes) & admin_only)
    if admin_routes:
        raise ConfigError("auth.open_routes", f"{', '.join(admin_routes)}: the admin routes are never open")
    for route in API:
        op = route.operation
        declare(app, route.name, op.scopes, op.public, op.stream_token, op.also)
        handler = bound_handler(route.handler, route.name, app, config, route.quick, route.method)
        definition = route.definition
        routing.register(app.router, web.RouteDef(route.method, definition.path, handler, definition.kwargs))
    # [\s\S]*, not .*: a path may hold an encoded newline (%0A), and "." stops at it
    app.router.add_route(
        "*",
        r"/{tail:[\s\S]*}",
        bound_handler(unmatched, UNMATCHED, app, config, method="*"),
        name=UNMATCHED,
    )
    app[DOCUMENT] = api_document()
