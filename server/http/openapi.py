"""The API contract served at /openapi.json (OpenAPI 3.1), kept in step with server/routes.py
by tests/test_openapi.py."""

from __future__ import annotations

from typing import Any

PROBLEM = "application/problem+json"


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


def _json(description: str, schema: dict[str, Any], headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


def _negotiated(
    description: str, schema: dict[str, Any], headers: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A response in every representation (Accept or ?format=); JSON and the structured formats
    share the schema, the text formats are documents of their own."""
    structured = {"schema": schema}
    text = {"schema": {"type": "string"}}
    out: dict[str, Any] = {
        "description": description + " (representation chosen by Accept or ?format=; Vary: Accept)",
        "content": {
            "application/json": structured,
            "application/vnd.msgpack": structured,
            "application/yaml": structured,
            "application/xml": text,
            "text/plain": text,
            "text/csv": text,
            "text/html": text,
        },
    }
    if headers:
        out["headers"] = headers
    return out


_NEGOTIATION_PARAMS: list[dict[str, Any]] = [
    {
        "name": "format",
        "in": "query",
        "schema": {"type": "string", "enum": ["json", "msgpack", "yaml", "xml", "csv", "txt", "html"]},
        "description": "overrides Accept",
    },
    {"name": "pretty", "in": "query", "schema": {"type": "string"}, "description": "1 for indented JSON"},
]
_NEGOTIATION_ERRORS = {
    "400": _problem("unknown ?format="),
    "406": _problem("nothing in Accept can be produced; `available` lists what can"),
}
_BODY_CONTENT_TYPES = ("application/json", "application/vnd.msgpack", "application/yaml")


def _body(name: str) -> dict[str, Any]:
    schema = {"$ref": f"#/components/schemas/{name}"}
    return {"required": True, "content": {t: {"schema": schema} for t in _BODY_CONTENT_TYPES}}


def _page_param(name: str, description: str, minimum: int) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "schema": {"type": "integer", "minimum": minimum},
        "description": description,
    }


_RATE_HEADERS = {
    "RateLimit-Policy": {"schema": {"type": "string"}, "description": "draft-ietf-httpapi-ratelimit-headers"},
    "RateLimit": {"schema": {"type": "string"}, "description": "the tightest window: r=remaining, t=seconds"},
}


def _number(digits: int) -> str:
    """The pattern of a path number as server/http/routing.py's number() matches it."""
    return f"^(0|[1-9][0-9]{{0,{digits - 1}}})$"


_COUNT = {
    "name": "record_count",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": _number(12)},
    "description": "how many records (at most streaming.max_records)",
}
_DOWNLOAD = {
    "name": "download",
    "in": "query",
    "schema": {"type": "string"},
    "description": "1 for Content-Disposition: attachment",
}

_USER_ID = {
    "name": "user_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": _number(19)},
    "description": "numeric user id",
}
_USER = {"$ref": "#/components/schemas/User"}
# run.py's server (server/runtime/connections.py) gives a request body server.client_body_timeout.
_SLOW_BODY = {"408": _problem("the body did not arrive within server.client_body_timeout")}
_TOO_LARGE = (
    "body beyond server.client_max_size (YAML: server.yaml_max_size) as sent or decompressed, or "
    "holding more than server.body_max_containers arrays/objects, server.body_max_items values or "
    "server.body_max_fields fields"
)
_BODY_ERRORS = {
    **_SLOW_BODY,
    "400": _problem(
        "missing or malformed body (nested over 64 deep, an integer over 64 bits), or unknown ?format="
    ),
    "406": _problem("nothing in Accept can be produced"),
    "413": _problem(_TOO_LARGE),
    "415": _problem("body is not JSON, msgpack or YAML, or a Content-Encoding that is not decoded"),
    "422": _problem("invalid fields; `errors` lists each one"),
}
_UNAVAILABLE = {"503": _problem("database or Redis unavailable; see Retry-After")}
_NOT_FOUND = {"404": _problem("no such user")}

# The real-time feed (handlers/feed.py): two GETs of the same event stream, publishing, the page.
_EVENT_STREAM = {
    "description": (
        "text/event-stream (WHATWG server-sent events): `retry:` first, then events with `id:` "
        "(a Redis stream id), `event:` (absent for ticker events, i.e. `message`) and `data:` "
        "lines (JSON, or text as published), heartbeat comments every feed.heartbeat seconds; "
        "`resync` when Last-Event-ID is older than the history, `overflow` before a too-slow "
        "client is dropped, `shutdown` when the server stops"
    ),
    "headers": {
        "Cache-Control": {"schema": {"const": "no-cache"}},
        "X-Accel-Buffering": {"schema": {"const": "no"}},
    },
    # each event, as a client's parser sees it
    "content": {
        "text/event-stream": {
            "schema": {
                "type": "object",
                "required": ["data"],
                "properties": {
                    "id": {"type": "string", "pattern": r"^[0-9]{1,19}-[0-9]{1,19}$"},
                    "event": {"type": "string"},
                    "data": {"type": "string", "description": "JSON (ticker: timestamp, value, status)"},
                    "retry": {"type": "integer", "minimum": 0},
                },
            }
        }
    },
}
_STREAM_PARAMS = [
    {
        "name": "channels",
        "in": "query",
        "schema": {"type": "string"},
        "description": "comma-separated: ticker, users, tasks",
    },
    {
        "name": "last_event_id",
        "in": "query",
        "schema": {"type": "string", "pattern": r"^[0-9]{1,19}(-[0-9]{1,19})?$"},
        "description": "resume after this id (the Last-Event-ID header wins when both are sent)",
    },
    {
        "name": "Last-Event-ID",
        "in": "header",
        "schema": {"type": "string", "pattern": r"^[0-9]{1,19}(-[0-9]{1,19})?$"},
        "description": "resume after this id (sent by EventSource when it reconnects)",
    },
]
_STREAM_ERRORS = {
    "400": _problem("unknown channel or malformed last event id"),
    "503": _problem(
        "feed.max_subscribers streams are open on this process, or it is shutting down; Retry-After"
    ),
}


def _stream_op(operation_id: str, summary: str) -> dict[str, Any]:
    return {
        "get": {
            "operationId": operation_id,
            "summary": summary,
            "parameters": _STREAM_PARAMS,
            "responses": {"200": _EVENT_STREAM, **_STREAM_ERRORS},
        }
    }


_FEED_PATHS: dict[str, Any] = {
    "/stream-real-time": _stream_op(
        "stream_real_time", "The live event stream (default channel: ticker, as the old clients expect)"
    ),
    "/events": {
        **_stream_op("events", "The live event stream (default: every channel)"),
        "post": {
            "operationId": "events_publish",
            "summary": "Publish an event to a channel's subscribers (Authorization: Bearer feed.admin_token)",
            "security": [{"feedToken": []}],
            "requestBody": _body("FeedEvent"),
            "responses": {
                "201": _json("published", {"$ref": "#/components/schemas/FeedPublished"}),
                "400": _problem("missing or malformed body"),
                "401": _problem("no bearer token"),
                "403": _problem("wrong token, or publishing over HTTP is disabled"),
                **_SLOW_BODY,
                "413": _problem(_TOO_LARGE),
                "415": _problem("body is not JSON, msgpack or YAML"),
                "422": _problem("unknown channel, bad event name, missing data"),
                **_UNAVAILABLE,
            },
        },
    },
    "/feed": {
        "get": {
            "operationId": "feed",
            "summary": "The live feed page (HTML; opens an EventSource on /events)",
            "responses": {
                "200": {"description": "the page", "content": {"text/html": {"schema": {"type": "string"}}}}
            },
        }
    },
}
_FEED_SCHEMAS: dict[str, Any] = {
    "FeedEvent": {
        "type": "object",
        "required": ["channel", "data"],
        "additionalProperties": False,
        "properties": {
            "channel": {"enum": ["ticker", "users", "tasks"]},
            "event": {
                "type": "string",
                "pattern": "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$",
                "default": "message",
            },
            "data": {"description": "a string is sent as is (newlines allowed), anything else as JSON"},
        },
    },
    "FeedPublished": {
        "type": "object",
        "required": ["id", "channel", "event"],
        "properties": {"id": {"type": "string"}, "channel": {"type": "string"}, "event": {"type": "string"}},
    },
}


_LARGE_DATASET: dict[str, Any] = {
    "type": "object",
    "required": ["records", "metadata"],
    "properties": {
        "records": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "name", "description"],
                "properties": {
                    "id": {"type": "integer"},
                    "name": {"type": "string"},
                    "description": {"type": "string"},
                },
            },
        },
        "metadata": {
            "type": "object",
            "required": ["total", "generated_at"],
            "properties": {"total": {"type": "integer"}, "generated_at": {"type": "string"}},
        },
    },
}


# ---------------------------------------------------------------- background tasks (issue 9)

_TASK_ID = {
    "name": "task_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": _number(19)},
    "description": "numeric task id",
}
_IDEMPOTENCY = {
    "name": "Idempotency-Key",
    "in": "header",
    "schema": {"type": "string", "pattern": r"^[\x21-\x7e]{1,255}$"},
    "description": "the same key returns the same task, never a second one",
}
_ACCEPTED_HEADERS = {
    "Location": {"schema": {"type": "string"}, "description": "the status URL"},
    "Retry-After": {"schema": {"type": "integer"}, "description": "seconds before polling"},
}
_ACCEPTED = {"$ref": "#/components/schemas/TaskAccepted"}
_TASK = {"$ref": "#/components/schemas/Task"}
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def _task_create(op: str, summary: str, body: str, query: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "post": {
            "operationId": op,
            "summary": summary,
            "parameters": [*_NEGOTIATION_PARAMS, _IDEMPOTENCY, *query],
            "requestBody": {
                "required": False,
                "content": {
                    t: {"schema": {"$ref": f"#/components/schemas/{body}"}}
                    for t in (*_BODY_CONTENT_TYPES, *_FORM_TYPES)
                },
            },
            "responses": {
                "202": _negotiated("accepted: poll status_url", _ACCEPTED, _ACCEPTED_HEADERS),
                "200": _negotiated("this Idempotency-Key already made a task: that task", _ACCEPTED),
                "409": _problem("the Idempotency-Key was used for a different request"),
                **_BODY_ERRORS,
                **_UNAVAILABLE,
            },
        }
    }


def _q(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "schema": {"type": "string"}, "description": description}


_TASK_PATHS: dict[str, Any] = {
    "/send-notification": _task_create(
        "send_notification",
        "Email someone (SMTP relay, or the Maildir outbox when none is configured), in the background",
        "Notification",
        [
            _q("recipient", "email address (old clients send the fields as query parameters)"),
            _q("subject", "subject line"),
            _q("content", "plain-text body"),
        ],
    ),
    "/generate-report": _task_create(
        "generate_report",
        "Build a report from the database in the background; the finished task links to /reports/{id}",
        "ReportRequest",
        [
            _q("report_type", "signups or user-activity"),
            _q("user_id", "the user (user-activity)"),
            _q("start", "first day (signups, YYYY-MM-DD, 1970-01-01 to 2999-12-31)"),
            _q("end", "last day (signups, YYYY-MM-DD, same range, at most 10 years after start)"),
        ],
    ),
    "/bulk-process": {
        "post": {
            "operationId": "bulk_process",
            "summary": "Import user records (validated per row, upserted by email) in the background",
            "parameters": [*_NEGOTIATION_PARAMS, _IDEMPOTENCY],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"type": "array", "items": {"$ref": "#/components/schemas/UserCreate"}}
                    },
                    "text/csv": {"schema": {"type": "string", "description": "header row name,email"}},
                },
            },
            "responses": {
                "202": _negotiated("accepted: poll status_url", _ACCEPTED, _ACCEPTED_HEADERS),
                "200": _negotiated("this Idempotency-Key already made a task: that task", _ACCEPTED),
                "409": _problem("the Idempotency-Key was used for a different request"),
                "400": _problem("missing or malformed body, or unknown ?format="),
                "406": _problem("nothing in Accept can be produced"),
                **_SLOW_BODY,
                "413": _problem("more records than jobs.bulk_max_rows, or a body beyond jobs.bulk_max_size"),
                "415": _problem("body is neither JSON nor CSV"),
                "422": _problem("no records, or a bad Idempotency-Key"),
                **_UNAVAILABLE,
            },
        }
    },
    "/task-status/{task_id}": {
        "parameters": [_TASK_ID],
        "get": {
            "operationId": "task_status",
            "summary": "A task's status, progress, attempts and (when completed) result",
            "parameters": _NEGOTIATION_PARAMS,
            "responses": {
                "200": _negotiated("the task", _TASK),
                "404": _problem("no such task"),
                **_NEGOTIATION_ERRORS,
                **_UNAVAILABLE,
            },
        },
        "delete": {
            "operationId": "task_cancel",
            "summary": "Cancel a task: queued ones at once, processing ones at their next progress point",
            "parameters": _NEGOTIATION_PARAMS,
            "responses": {
                "200": _negotiated("cancelled", _TASK),
                "202": _negotiated("cancellation requested; the task is still processing", _TASK),
                "404": _problem("no such task"),
                "409": _problem("the task is already completed, failed or cancelled"),
                **_NEGOTIATION_ERRORS,
                **_UNAVAILABLE,
            },
        },
    },
    "/tasks": {
        "get": {
            "operationId": "tasks",
            "summary": "List tasks in id order (keyset pagination), optionally in one state",
            "parameters": [
                *_NEGOTIATION_PARAMS,
                {
                    "name": "state",
                    "in": "query",
                    "schema": {"enum": ["queued", "processing", "completed", "failed", "cancelled"]},
                },
                _page_param("after", "return tasks with an id greater than this", 0),
                _page_param("limit", "page size (default 50, at most 200)", 1),
            ],
            "responses": {
                "200": _negotiated("a page", {"$ref": "#/components/schemas/TaskPage"}),
                "422": _problem("bad state, after or limit"),
                **_NEGOTIATION_ERRORS,
                **_UNAVAILABLE,
            },
        }
    },
    "/tasks/{task_id}/events": {
        "parameters": [_TASK_ID],
        "get": {
            "operationId": "task_events",
            "summary": "The task's state now, then each change as it happens (server-sent events), "
            "until it is completed, failed or cancelled",
            "description": "Events: task.created, task.retrying, task.progress, task.completed, task.failed, "
            "task.cancelled; each `data` is the task as GET /task-status/{task_id} shows it (JSON). "
            "Heartbeat comments keep the connection open; `shutdown` ends it when the server stops.",
            "responses": {
                "200": {**_EVENT_STREAM, "description": "text/event-stream of the task's changes"},
                "404": _problem("no such task"),
                **_UNAVAILABLE,
            },
        },
    },
    "/reports/{report_id}": {
        "parameters": [
            {
                "name": "report_id",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": _number(19)},
                "description": "numeric report id (a completed generate_report task's result names it)",
            }
        ],
        "get": {
            "operationId": "report",
            "summary": "A generated report (CSV gives its rows)",
            "parameters": _NEGOTIATION_PARAMS,
            "responses": {
                "200": _negotiated("the report", {"$ref": "#/components/schemas/Report"}),
                "404": _problem("no such report"),
                **_NEGOTIATION_ERRORS,
                **_UNAVAILABLE,
            },
        },
    },
}
_TIME = {"type": "string", "format": "date-time"}
_TIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}
_TASK_SCHEMAS: dict[str, Any] = {
    "Notification": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "recipient": {"type": "string", "format": "email", "maxLength": 254},
            "subject": {"type": "string", "maxLength": 998},
            "content": {"type": "string", "maxLength": 100000},
        },
    },
    "ReportRequest": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "report_type": {"enum": ["signups", "user-activity"]},
            "user_id": {"type": ["integer", "string"]},
            "start": {"type": "string", "format": "date"},
            "end": {"type": "string", "format": "date"},
        },
    },
    "TaskAccepted": {
        "type": "object",
        "required": ["message", "task_id", "status", "status_url", "estimated_time"],
        "properties": {
            "message": {"type": "string"},
            "task_id": {"type": "integer"},
            "status": {"enum": ["queued", "processing", "completed", "failed", "cancelled"]},
            "status_url": {"type": "string"},
            "estimated_time": {"type": "number", "description": "seconds (a hint)"},
            "created_at": _TIME,
        },
    },
    "Task": {
        "type": "object",
        "required": ["task_id", "kind", "status", "progress", "attempts", "created_at", "status_url"],
        "properties": {
            "task_id": {"type": "integer"},
            "kind": {"type": "string"},
            "status": {"enum": ["queued", "processing", "completed", "failed", "cancelled"]},
            "progress": {
                "type": "object",
                "properties": {
                    "done": {"type": "integer"},
                    "total": {"type": ["integer", "null"]},
                    "message": {"type": ["string", "null"]},
                },
            },
            "result": {"description": "present when completed"},
            "error": {"type": ["string", "null"]},
            "attempts": {"type": "integer"},
            "max_attempts": {"type": "integer"},
            "cancel_requested": {"type": "boolean"},
            "status_url": {"type": "string"},
            "created_at": _TIME,
            "updated_at": _TIME,
            "started_at": _TIME_OR_NULL,
            "finished_at": _TIME_OR_NULL,
            "run_after": _TIME,
        },
    },
    "TaskPage": {
        "type": "object",
        "required": ["items", "limit", "next"],
        "properties": {
            "items": {"type": "array", "items": _TASK},
            "limit": {"type": "integer"},
            "next": {"type": ["string", "null"]},
        },
    },
    "Report": {
        "type": "object",
        "required": ["id", "task_id", "report_type", "params", "summary", "rows", "created_at"],
        "properties": {
            "id": {"type": "integer"},
            "task_id": {"type": "integer"},
            "report_type": {"type": "string"},
            "params": {"type": "object"},
            "summary": {"type": "object"},
            "rows": {"type": "array", "items": {"type": "object"}},
            "created_at": _TIME,
        },
    },
}


_X_CACHE = {
    "X-Cache": {
        "schema": {"type": "string", "enum": ["hit-l1", "hit-l2", "miss", "bypass"]},
        "description": "where the answer came from: this process's memory, Redis, or computed now",
    }
}
_CACHE_PATHS: dict[str, Any] = {
    "/expensive-calculation/{value}": {
        "get": {
            "operationId": "expensive_calculation",
            "summary": "Sum of i*i for i in range(value * 1000), computed off the loop, cached per value",
            "parameters": [
                {
                    "name": "value",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": _number(9)},
                    "description": "at most cache.expensive_max",
                }
            ],
            "responses": {
                "200": _json(
                    "the result",
                    {
                        "type": "object",
                        "required": ["input", "result", "timestamp"],
                        "properties": {
                            "input": {"type": "integer"},
                            "result": {"type": "integer"},
                            "timestamp": {"type": "string", "format": "date-time"},
                        },
                    },
                    _X_CACHE,
                ),
                "422": _problem("value above cache.expensive_max"),
            },
        }
    },
    "/cache/stats": {
        "get": {
            "operationId": "cache_stats",
            "summary": "This process's cache counters: hits and misses per layer, evictions, loads, L1 size",
            "responses": {
                "200": _json(
                    "counters",
                    {"type": "object", "additionalProperties": {"type": ["integer", "boolean"]}},
                )
            },
        }
    },
}


def build_spec() -> dict[str, Any]:
    """The whole OpenAPI document."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "hotpath",
            "version": "0.1.0",
            "description": "A production-grade Python web API server written directly on aiohttp.",
        },
        "paths": {
            "/health": {
                "get": {
                    "operationId": "health",
                    "summary": "Liveness (no I/O)",
                    "responses": {"200": _json("alive", {"$ref": "#/components/schemas/Health"})},
                }
            },
            "/ready": {
                "get": {
                    "operationId": "ready",
                    "summary": "Readiness: PostgreSQL and Redis checks",
                    "responses": {
                        "200": _json("every check passed", {"$ref": "#/components/schemas/Ready"}),
                        "503": _problem("a check failed; `checks` has each result"),
                    },
                }
            },
            "/users": {
                "post": {
                    "operationId": "users_create",
                    "summary": "Create a user",
                    "parameters": _NEGOTIATION_PARAMS,
                    "requestBody": _body("UserCreate"),
                    "responses": {
                        "201": _negotiated(
                            "created",
                            _USER,
                            {
                                "Location": {
                                    "schema": {"type": "string"},
                                    "description": "URL of the new user",
                                }
                            },
                        ),
                        "409": _problem("email already used (case-insensitive)"),
                        **_BODY_ERRORS,
                        **_UNAVAILABLE,
                    },
                },
                "get": {
                    "operationId": "users",
                    "summary": "List users in id order (keyset pagination)",
                    "parameters": [
                        *_NEGOTIATION_PARAMS,
                        _page_param("after", "return users with an id greater than this", 0),
                        _page_param(
                            "limit", "page size (default users.default_limit, at most users.max_limit)", 1
                        ),
                    ],
                    "responses": {
                        "200": _negotiated("a page", {"$ref": "#/components/schemas/UserPage"}),
                        "422": _problem("after or limit is not a valid integer"),
                        **_NEGOTIATION_ERRORS,
                        **_UNAVAILABLE,
                    },
                },
            },
            "/users/{user_id}": {
                "parameters": [_USER_ID],
                "get": {
                    "operationId": "user",
                    "summary": "Read a user",
                    "parameters": _NEGOTIATION_PARAMS,
                    "responses": {
                        "200": _negotiated("the user", _USER),
                        **_NOT_FOUND,
                        **_NEGOTIATION_ERRORS,
                        **_UNAVAILABLE,
                    },
                },
                "patch": {
                    "operationId": "user_update",
                    "summary": "Change a user's name and/or email",
                    "parameters": _NEGOTIATION_PARAMS,
                    "requestBody": _body("UserPatch"),
                    "responses": {
                        "200": _negotiated("the updated user", _USER),
                        **_NOT_FOUND,
                        "409": _problem("email already used"),
                        **_BODY_ERRORS,
                        **_UNAVAILABLE,
                    },
                },
                "delete": {
                    "operationId": "user_delete",
                    "summary": "Delete a user",
                    "responses": {"204": {"description": "deleted"}, **_NOT_FOUND, **_UNAVAILABLE},
                },
            },
            "/users/{user_id}/profile": {
                "parameters": [_USER_ID],
                "get": {
                    "operationId": "user_profile",
                    "summary": "A user with derived profile fields",
                    "parameters": _NEGOTIATION_PARAMS,
                    "responses": {
                        "200": _negotiated("the profile", {"$ref": "#/components/schemas/Profile"}),
                        **_NOT_FOUND,
                        **_NEGOTIATION_ERRORS,
                        **_UNAVAILABLE,
                    },
                },
            },
            "/products": {
                "get": {
                    "operationId": "products",
                    "summary": "The product catalogue (served from memory, refreshed on every change)",
                    "parameters": [
                        *_NEGOTIATION_PARAMS,
                        _page_param("page", "1-based page number", 1),
                        _page_param(
                            "limit",
                            "page size (default products.default_limit, at most products.max_limit)",
                            1,
                        ),
                    ],
                    "responses": {
                        "200": _negotiated(
                            "a page of products", {"$ref": "#/components/schemas/ProductPage"}
                        ),
                        "422": _problem("page or limit is not a valid integer"),
                        **_NEGOTIATION_ERRORS,
                    },
                }
            },
            "/protected-endpoint": {
                "get": {
                    "operationId": "protected",
                    "summary": "A rate-limited resource (policy `ratelimit.policies.protected`)",
                    "parameters": _NEGOTIATION_PARAMS,
                    "responses": {
                        "200": _negotiated(
                            "allowed, with the caller's rate info",
                            {"$ref": "#/components/schemas/Protected"},
                            _RATE_HEADERS,
                        ),
                        "429": {
                            **_problem("limited: `rate_info`, Retry-After, RateLimit and X-Rate-* headers"),
                            "headers": {
                                **_RATE_HEADERS,
                                "Retry-After": {"schema": {"type": "integer"}},
                                "X-Rate-Limit": {"schema": {"type": "integer"}},
                                "X-Rate-Remaining": {"schema": {"type": "integer"}},
                                "X-Rate-Reset": {"schema": {"type": "integer"}, "description": "Unix time"},
                            },
                        },
                        **_NEGOTIATION_ERRORS,
                        **_UNAVAILABLE,
                    },
                }
            },
            "/process-urls": {
                "post": {
                    "operationId": "process_urls",
                    "summary": "Fetch many URLs at once (SSRF-guarded), results in request order",
                    "requestBody": {
                        "required": True,
                        "content": {
                            t: {"schema": {"$ref": "#/components/schemas/FetchRequest"}}
                            for t in _BODY_CONTENT_TYPES
                        },
                    },
                    "responses": {
                        "200": _json("one result per URL", {"$ref": "#/components/schemas/FetchResponse"}),
                        "400": _problem("missing or malformed body"),
                        **_SLOW_BODY,
                        "413": _problem(_TOO_LARGE),
                        "415": _problem("body is not JSON, msgpack or YAML"),
                        "422": _problem("not an array of URLs, too many URLs, or a bad timeout"),
                    },
                }
            },
            "/stream-json/{record_count}": {
                "parameters": [_COUNT],
                "get": {
                    "operationId": "stream_json",
                    "summary": "Synthetic records streamed as a JSON array (or NDJSON with ?format=ndjson)",
                    "parameters": [
                        {"name": "format", "in": "query", "schema": {"enum": ["json", "ndjson"]}},
                        _DOWNLOAD,
                    ],
                    "responses": {
                        "200": {
                            "description": "records 1..record_count, streamed",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/Record"},
                                    }
                                },
                                "application/x-ndjson": {"schema": {"type": "string"}},
                            },
                        },
                        "400": _problem("record_count above streaming.max_records, or an unknown format"),
                    },
                },
            },
            "/stream-csv/{record_count}": {
                "parameters": [_COUNT],
                "get": {
                    "operationId": "stream_csv",
                    "summary": "Synthetic records streamed as CSV (header id,name,email,created_at)",
                    "parameters": [_DOWNLOAD],
                    "responses": {
                        "200": {
                            "description": "CSV, streamed",
                            "content": {"text/csv": {"schema": {"type": "string"}}},
                        },
                        "400": _problem("record_count above streaming.max_records"),
                    },
                },
            },
            "/users/export": {
                "get": {
                    "operationId": "users_export",
                    "summary": "Every user, streamed from one database snapshot (JSON array, NDJSON or CSV)",
                    "parameters": [
                        {"name": "format", "in": "query", "schema": {"enum": ["json", "ndjson", "csv"]}},
                        {
                            "name": "since",
                            "in": "query",
                            "schema": {"type": "string"},
                            "description": "only users created at or after this ISO 8601 date/time "
                            "(1970-01-01 to 2999-12-31 in UTC; naive values are UTC)",
                        },
                        _DOWNLOAD,
                    ],
                    "responses": {
                        "200": {
                            "description": "users, streamed",
                            "content": {
                                "application/json": {"schema": {"type": "array", "items": _USER}},
                                "application/x-ndjson": {"schema": {"type": "string"}},
                                "text/csv": {"schema": {"type": "string"}},
                            },
                        },
                        "400": _problem("unknown format"),
                        "406": _problem("Accept names none of the export's types"),
                        "422": _problem("since is not a date, or outside 1970-01-01 .. 2999-12-31"),
                        **_UNAVAILABLE,
                    },
                }
            },
            **_TASK_PATHS,
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {"200": _json("OpenAPI 3.1 document", {"type": "object"})},
                }
            },
            "/docs": {
                "get": {
                    "operationId": "docs",
                    "summary": "This document as a self-contained HTML page",
                    "responses": {
                        "200": {
                            "description": "HTML",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics of every worker (text exposition format 0.0.4)",
                    "description": "With metrics.token set, needs `Authorization: Bearer <token>`; without, "
                    "only direct loopback clients (no proxy headers) may read it.",
                    "responses": {
                        "200": {
                            "description": "metrics",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        "401": _problem("metrics.token is set and the request does not carry it"),
                        "403": _problem("no token configured and the client is not a direct loopback peer"),
                        "404": _problem("metrics.enabled is false"),
                    },
                }
            },
            "/large-dataset": {
                "get": {
                    "operationId": "large_dataset",
                    "summary": "1000 records from cached encoded bytes (strong ETag, Cache-Control; "
                    "compressed per Accept-Encoding; If-None-Match gives 304)",
                    "parameters": _NEGOTIATION_PARAMS,
                    "responses": {
                        "200": _negotiated("the dataset", _LARGE_DATASET),
                        "304": {"description": "the client's copy (If-None-Match) is current"},
                        **_NEGOTIATION_ERRORS,
                    },
                }
            },
            **_FEED_PATHS,
            **_CACHE_PATHS,
        },
        "components": {
            "schemas": {
                "Problem": {
                    "type": "object",
                    "required": ["type", "title", "status"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "request_id": {"type": "string"},
                        "errors": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["field", "message"],
                                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                            },
                        },
                        "checks": {"type": "object"},
                        "available": {"type": "array", "items": {"type": "string"}},
                        "rate_info": {"$ref": "#/components/schemas/RateInfo"},
                    },
                },
                "Health": {
                    "type": "object",
                    "required": ["status"],
                    "properties": {"status": {"const": "ok"}},
                },
                "Ready": {
                    "type": "object",
                    "required": ["status", "checks"],
                    "properties": {
                        "status": {"const": "ready"},
                        "pid": {"type": "integer", "description": "the answering worker process"},
                        "checks": {"type": "object"},
                    },
                },
                "UserCreate": {
                    "type": "object",
                    "required": ["name", "email"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "minLength": 1, "maxLength": 200},
                        "email": {"type": "string", "format": "email", "maxLength": 254},
                    },
                },
                "UserPatch": {
                    "type": "object",
                    "minProperties": 1,
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "minLength": 1, "maxLength": 200},
                        "email": {"type": "string", "format": "email", "maxLength": 254},
                    },
                },
                "User": {
                    "type": "object",
                    "required": ["id", "name", "email", "created_at", "updated_at"],
                    "properties": {
                        "id": {"type": "integer"},
                        "name": {"type": "string"},
                        "email": {"type": "string"},
                        "created_at": {"type": "string", "format": "date-time"},
                        "updated_at": {"type": "string", "format": "date-time"},
                    },
                },
                "UserPage": {
                    "type": "object",
                    "required": ["items", "limit", "next"],
                    "properties": {
                        "items": {"type": "array", "items": _USER},
                        "limit": {"type": "integer"},
                        "next": {"type": ["string", "null"]},
                    },
                },
                "Record": {
                    "type": "object",
                    "required": ["id", "name", "email", "created_at"],
                    "properties": {
                        "id": {"type": "integer"},
                        "name": {"type": "string"},
                        "email": {"type": "string"},
                        "created_at": {"type": "string", "format": "date"},
                    },
                },
                "Product": {
                    "type": "object",
                    "required": ["id", "name", "price", "category"],
                    "properties": {
                        "id": {"type": "integer"},
                        "name": {"type": "string"},
                        "price": {"type": "number", "minimum": 0},
                        "category": {"type": "string"},
                        "created_at": {"type": "string", "format": "date-time"},
                        "updated_at": {"type": "string", "format": "date-time"},
                    },
                },
                "ProductPage": {
                    "type": "object",
                    "required": ["items", "total", "page", "limit", "next"],
                    "properties": {
                        "items": {"type": "array", "items": {"$ref": "#/components/schemas/Product"}},
                        "total": {"type": "integer"},
                        "page": {"type": "integer"},
                        "limit": {"type": "integer"},
                        "next": {"type": ["string", "null"]},
                    },
                },
                "RateInfo": {
                    "type": "object",
                    "required": ["allowed", "limit", "remaining", "reset_time"],
                    "properties": {
                        "allowed": {"type": "boolean"},
                        "limit": {"type": "integer"},
                        "remaining": {"type": "integer"},
                        "reset_time": {"type": "integer", "description": "Unix time the window frees a slot"},
                    },
                },
                "Protected": {
                    "type": "object",
                    "required": ["message", "rate_info"],
                    "properties": {
                        "message": {"type": "string"},
                        "rate_info": {"anyOf": [{"$ref": "#/components/schemas/RateInfo"}, {"type": "null"}]},
                    },
                },
                "FetchRequest": {
                    "oneOf": [
                        {"type": "array", "items": {"type": "string"}},
                        {
                            "type": "object",
                            "required": ["urls"],
                            "additionalProperties": False,
                            "properties": {
                                "urls": {"type": "array", "items": {"type": "string"}},
                                "timeout": {"type": "number", "exclusiveMinimum": 0},
                            },
                        },
                    ]
                },
                "FetchResponse": {
                    "type": "object",
                    "required": ["results", "processing_time", "total_urls"],
                    "properties": {
                        "results": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["url", "status", "elapsed_ms"],
                                "properties": {
                                    "url": {},
                                    "status": {"type": ["integer", "null"]},
                                    "elapsed_ms": {"type": "number"},
                                    "content_type": {"type": "string"},
                                    "bytes": {"type": "integer"},
                                    "data": {},
                                    "error": {
                                        "enum": [
                                            "timeout",
                                            "dns",
                                            "refused",
                                            "too_large",
                                            "blocked",
                                            "tls",
                                            "http_error",
                                            "invalid",
                                            "connection",
                                        ]
                                    },
                                    "detail": {"type": "string"},
                                },
                            },
                        },
                        "processing_time": {"type": "number"},
                        "total_urls": {"type": "integer"},
                    },
                },
                **_TASK_SCHEMAS,
                "Profile": {
                    "allOf": [
                        _USER,
                        {
                            "type": "object",
                            "required": [
                                "email_domain",
                                "member_since",
                                "account_age_days",
                                "has_been_updated",
                            ],
                            "properties": {
                                "email_domain": {"type": "string"},
                                "member_since": {"type": "string", "format": "date"},
                                "account_age_days": {"type": "integer"},
                                "has_been_updated": {"type": "boolean"},
                            },
                        },
                    ]
                },
                **_FEED_SCHEMAS,
            },
            "securitySchemes": {"feedToken": {"type": "http", "scheme": "bearer"}},
        },
    }
