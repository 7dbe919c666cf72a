"""/openapi.json is a valid OpenAPI 3.1 document that matches the route table exactly, and is
the hand-written document it replaced, apart from the changes named in intended()."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from openapi_spec_validator import validate

from server.app import create_app
from server.config import Config
from server.http.openapi import DOCUMENT, build_spec
from server.routes import API, TAGS, UNMATCHED

# The document as server/http/openapi.py wrote it out by hand, before it was derived from the
# route table (json.dumps(build_spec(), sort_keys=True, indent=1) at that commit).
BEFORE = Path(__file__).parent / "data" / "openapi_before.json"
METHODS = {"get", "put", "post", "delete", "patch", "options", "trace"}

# ---------------------------------------------------------------- the intended changes

# 1. Every operation is tagged, and the document lists each tag with a description.
OPERATION_TAGS = {
    "health": ["health"],
    "ready": ["health"],
    "openapi": ["meta"],
    "docs": ["meta"],
    "metrics": ["meta"],
    "user": ["users"],
    "user_profile": ["users"],
    "user_update": ["users"],
    "user_delete": ["users"],
    "users_create": ["users"],
    "users": ["users"],
    "users_export": ["users", "datasets"],
    "products": ["products"],
    "protected": ["rate limiting"],
    "process_urls": ["fetch"],
    "stream_json": ["datasets"],
    "stream_csv": ["datasets"],
    "large_dataset": ["datasets"],
    "stream_real_time": ["feed"],
    "events": ["feed"],
    "events_publish": ["feed"],
    "feed": ["feed"],
    "send_notification": ["tasks"],
    "generate_report": ["tasks"],
    "bulk_process": ["tasks"],
    "task_status": ["tasks"],
    "task_cancel": ["tasks"],
    "tasks": ["tasks"],
    "task_events": ["tasks", "feed"],
    "report": ["tasks"],
    "expensive_calculation": ["cache"],
    "cache_stats": ["cache"],
}
DOCUMENT_TAGS = [
    {"name": "health", "description": "Liveness and readiness"},
    {"name": "meta", "description": "The API contract and the operator's metrics"},
    {
        "name": "users",
        "description": "Users in PostgreSQL: create, read, update, delete, pages, profiles, the export",
    },
    {"name": "products", "description": "The product catalogue, served from memory"},
    {"name": "rate limiting", "description": "A rate-limited resource of the earlier service"},
    {"name": "fetch", "description": "Fetching many URLs at once"},
    {"name": "datasets", "description": "Streamed and cached datasets"},
    {"name": "feed", "description": "The real-time feed (server-sent events)"},
    {"name": "tasks", "description": "Background tasks and the reports they make"},
    {"name": "cache", "description": "The two-layer cache"},
    # the admin routes' (issue 20: keys and the audit log)
    {"name": "admin", "description": TAGS["admin"]},
]
# 2. A path parameter's schema says how many digits it may have (maxLength: the digits of its
#    number() declaration), and /expensive-calculation/{value} declares its `value` on the path
#    item, like every other path.
PATH_DIGITS = {"user_id": 19, "task_id": 19, "report_id": 19, "record_count": 12, "value": 9, "key_id": 19}
# 3. ?format= lists the representations in server/http/render.py's FORMATS order (txt, csv).
FORMATS = ["json", "msgpack", "yaml", "xml", "txt", "csv", "html"]
# 4. Response shapes by name: the three inline response schemas are components now.
NAMED = {
    ("/large-dataset", "get", "200"): "LargeDataset",
    ("/expensive-calculation/{value}", "get", "200"): "Calculation",
    ("/cache/stats", "get", "200"): "CacheStats",
}
# 5-9. Where the document disagreed with the code (status -> (old, new) description):
FIXES: dict[tuple[str, str, str], tuple[str, str]] = {
    # 5. negotiate() raises NotAcceptable with `available` for routes with a body too
    **{
        (path, method, "406"): (
            "nothing in Accept can be produced",
            "nothing in Accept can be produced; `available` lists what can",
        )
        for path, method in [
            ("/users", "post"),
            ("/users/{user_id}", "patch"),
            ("/send-notification", "post"),
            ("/generate-report", "post"),
            ("/bulk-process", "post"),
        ]
    },
    # 6. /process-urls and POST /events read their bodies with read_body, as every other route
    **{
        (path, "post", "400"): (
            "missing or malformed body",
            "missing or malformed body (nested over 64 deep, an integer over 64 bits)",
        )
        for path in ("/process-urls", "/events")
    },
    **{
        (path, "post", "415"): (
            "body is not JSON, msgpack or YAML",
            "body is not JSON, msgpack or YAML, or a Content-Encoding that is not decoded",
        )
        for path in ("/process-urls", "/events")
    },
    # 7. the task fields also come as a form (handlers/tasks.py's _fields)
    **{
        (path, "post", "415"): (
            "body is not JSON, msgpack or YAML, or a Content-Encoding that is not decoded",
            "body is not JSON, msgpack, YAML or a form, or a Content-Encoding that is not decoded",
        )
        for path in ("/send-notification", "/generate-report")
    },
    # 8. query_int() refuses values below the minimum too, not only non-integers
    ("/users", "get", "422"): (
        "after or limit is not a valid integer",
        "after or limit is not an integer, or is below its minimum",
    ),
    ("/products", "get", "422"): (
        "page or limit is not a valid integer",
        "page or limit is not an integer, or is below its minimum",
    ),
}
# 10. A task belongs to the key that made it (issue 20): another key's task or report is "not
#     found" too, the operations say so, and Idempotency-Key is per API key.
OWNED = (
    "A task belongs to the API key that made it (with its rotations): only that key, or one with "
    "`admin`, sees it; any other caller gets 404. Tasks made without a key (on an open route) are "
    "seen by callers without a key."
)
FIXES.update(
    {
        **{
            (path, method, "404"): ("no such task", "no such task (or not yours)")
            for path, method in [
                ("/task-status/{task_id}", "get"),
                ("/task-status/{task_id}", "delete"),
                ("/tasks/{task_id}/events", "get"),
            ]
        },
        ("/reports/{report_id}", "get", "404"): ("no such report", "no such report (or not yours)"),
    }
)
OWNED_DESCRIPTIONS = {
    ("/task-status/{task_id}", "get"): OWNED,
    ("/task-status/{task_id}", "delete"): OWNED,
    ("/tasks", "get"): "Only the tasks of the calling key's family (every task for a key with `admin`; "
    "without a key, on an open route, the tasks made without a key).",
    (
        "/reports/{report_id}",
        "get",
    ): "A report belongs to the owner of the task that made it, as the task does.",
}
OWNED_APPENDED = {("/tasks/{task_id}/events", "get"): " " + OWNED}
IDEMPOTENCY_KEY = (
    "the same key (from the same API key) returns the same task, never a second one; "
    "keys are per API key: another key's use of the same value makes a task of its own"
)
# 9. GET of a user, a profile (represent(etag=True), the cache middleware) and the products
#    (kept answers) answer If-None-Match with 304.
NOT_MODIFIED = [("/users/{user_id}", "get"), ("/users/{user_id}/profile", "get"), ("/products", "get")]
# 10. API keys (issue 20). Each operation the route table gives scopes names them: the apiKey
#     scheme, one alternative per scope (a key needs one), after an empty alternative for public
#     reads, whose description says they are open; it answers 401 and 403 (the same problems
#     everywhere). A task that reads or writes users needs that scope as well (all scopes of an
#     alternative are needed). /metrics and POST /events are guarded by keys (their shared tokens are aliases
#     of keys), not by their handlers' own 401/403; event streams take a stream token (?token=).
DECLARED = {route.name: route.operation for route in API}
PUBLIC_NOTE = "Open to callers without a key while auth.public_reads is on (the default)."
OLD_GUARDS = {"metrics": ("401", "403"), "events_publish": ("401", "403")}
METRICS_DESCRIPTION = "Needs a key with the `metrics` scope, or metrics.token as the bearer token."
EVENTS_SUMMARY = "Publish an event to a channel's subscribers (the `feed:publish` scope, or feed.admin_token)"
STREAM_TOKEN = {
    "name": "token",
    "in": "query",
    "schema": {"type": "string"},
    "description": "a stream token from POST /feed/tokens, for clients that cannot send Authorization "
    "(EventSource)",
}
# 11. Operations added since the snapshot (issue 20): compared with the route table's own
#     document (and validated with the whole).
ADDED = {"feed_tokens", "admin_scopes", "admin_keys", "admin_keys_create", "admin_key_rotate",
         "admin_key_revoke", "admin_audit"}  # fmt: skip

# 12. Private feed channels (issue 20): the streams say which channels a caller gets, and how a
#     stream ends with its credential; /events defaults to the channels the caller may read.
FEED_STREAMS = {"events", "stream_real_time"}
EVENTS_STREAM_SUMMARY = "The live event stream (default: every channel the caller may read)"
TASK_EVENTS_NOTE = (
    " A stream token (?token=) must name the tasks channel (403 otherwise); `expired` and `revoked` "
    "end the stream with its credential."
)


def _feed(op: dict[str, Any]) -> None:
    if op["operationId"] == "task_events":
        op["description"] += TASK_EVENTS_NOTE
    if op["operationId"] not in FEED_STREAMS:
        return
    if op["operationId"] == "events":
        op["summary"] = EVENTS_STREAM_SUMMARY
    assert "description" not in op
    op["description"] = DECLARED[op["operationId"]].description


# 13. Every write carries the rate limiter (its route's policy, or the key's own rate): 429,
#     as /protected-endpoint's, described for all of them.
WRITES = {"post", "put", "patch", "delete"}
LIMITED = (
    "rate limited (the route's policy in ratelimit.policies, or the key's own rate): "
    "Retry-After, RateLimit and X-Rate-* headers, `rate_info`"
)


def _operations(spec: Mapping[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, op)
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method in METHODS
    ]


def _access(op: dict[str, Any], access_errors: Mapping[str, Any]) -> None:
    declared = DECLARED[op["operationId"]]
    for status in OLD_GUARDS.get(op["operationId"], ()):
        del op["responses"][status]
    op.pop("security", None)
    if op["operationId"] == "metrics":
        op["description"] = METRICS_DESCRIPTION
    if op["operationId"] == "events_publish":
        op["summary"] = EVENTS_SUMMARY
    if not declared.scopes:
        return
    alternatives = [{"apiKey": [scope, *declared.also]} for scope in declared.scopes]
    op["security"] = [{}, *alternatives] if declared.public else alternatives
    if declared.public:
        op["description"] = f"{op['description']} {PUBLIC_NOTE}" if "description" in op else PUBLIC_NOTE
    if declared.stream_token:
        op.setdefault("parameters", []).append(STREAM_TOKEN)
    op["responses"].update(access_errors)
    op["responses"] = dict(sorted(op["responses"].items()))


def intended(before: dict[str, Any], now: Mapping[str, Any]) -> dict[str, Any]:
    """The snapshot with the intended changes applied, and nothing else: every difference
    between it and today's document is one of those listed above. `now` (today's document)
    gives what is new: the added operations, and the 401/403 problems of the keys, the same
    for every operation (checked here)."""
    spec = copy.deepcopy(before)
    scoped = [op for _, _, op in _operations(now) if DECLARED[op["operationId"]].scopes]
    access_errors = {status: scoped[0]["responses"][status] for status in ("401", "403")}
    for op in scoped:
        assert {s: op["responses"][s] for s in ("401", "403")} == access_errors, op["operationId"]
    assert access_errors["401"]["content"]["application/problem+json"]
    for path, method, op in _operations(now):
        if op["operationId"] in ADDED:
            spec["paths"].setdefault(path, {})[method] = op
            if "parameters" in now["paths"][path]:
                spec["paths"][path]["parameters"] = now["paths"][path]["parameters"]
    spec["tags"] = DOCUMENT_TAGS
    schemas = spec["components"]["schemas"]
    for path, method, op in _operations(spec):
        if op["operationId"] in ADDED:
            continue
        _feed(op)
        _access(op, access_errors)
        op["tags"] = OPERATION_TAGS[op["operationId"]]
        item = spec["paths"][path]
        if any(p["in"] == "path" for p in op.get("parameters", [])):  # only `value`'s operation
            item["parameters"] = op.pop("parameters")
        for param in op.get("parameters", []):
            if param["name"] == "format" and param["schema"].get("type") == "string":
                param["schema"]["enum"] = FORMATS
        for status, response in op["responses"].items():
            if (path, method, status) in NAMED:
                name = NAMED[path, method, status]
                for content in response["content"].values():
                    if content["schema"] != {"type": "string"}:
                        schemas[name] = content["schema"]
                        content["schema"] = {"$ref": f"#/components/schemas/{name}"}
            if (path, method, status) in FIXES:
                old, new = FIXES[path, method, status]
                assert response["description"] == old
                response["description"] = new
        if (path, method) in OWNED_DESCRIPTIONS:
            op["description"] = OWNED_DESCRIPTIONS[path, method]
        if (path, method) in OWNED_APPENDED:
            op["description"] += OWNED_APPENDED[path, method]
        for param in op.get("parameters", []):
            if param["name"] == "Idempotency-Key":
                param["description"] = IDEMPOTENCY_KEY
        if (path, method) in NOT_MODIFIED:
            op["responses"]["304"] = {"description": "the client's copy (If-None-Match) is current"}
        if method in WRITES and "429" not in op["responses"]:
            limited = copy.deepcopy(before["paths"]["/protected-endpoint"]["get"]["responses"]["429"])
            limited["description"] = LIMITED
            op["responses"]["429"] = limited
    for item in spec["paths"].values():
        for param in item.get("parameters", []):
            param["schema"].setdefault("maxLength", PATH_DIGITS[param["name"]])
    spec["components"]["securitySchemes"] = now["components"]["securitySchemes"]
    assert set(spec["components"]["securitySchemes"]) == {"apiKey"}
    for name in set(now["components"]["schemas"]) - set(spec["components"]["schemas"]):
        spec["components"]["schemas"][name] = now["components"]["schemas"][name]  # the added ones'
    return spec


# ---------------------------------------------------------------- the tests


def test_spec_is_valid_openapi_31() -> None:
    validate(build_spec(API, TAGS))


def test_every_route_is_documented_and_nothing_else(cfg: Config) -> None:
    """The document's paths and methods are exactly what the app registers (HEAD aside: it
    goes with GET, and only with GET)."""
    app = create_app(cfg)
    registered = set()
    for resource in app.router.resources():
        if resource.name == UNMATCHED:
            continue
        methods = {route.method for route in resource}
        assert "HEAD" not in methods or "GET" in methods, resource
        for method in methods - {"HEAD"}:
            registered.add((resource.canonical, method.lower(), resource.name))
    spec = app[DOCUMENT].spec  # what this app serves, derived from what it registered
    documented = {(path, method, op["operationId"]) for path, method, op in _operations(spec)}
    assert documented == registered


async def test_served_document_is_the_spec(client: Any) -> None:
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    assert await resp.json() == build_spec(API, TAGS)


async def test_served_document_is_the_snapshot_with_the_intended_changes(client: Any) -> None:
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    now = await resp.json()
    assert now == intended(json.loads(BEFORE.read_text()), now)
