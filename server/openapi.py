"""The API contract served at /openapi.json (OpenAPI 3.1), kept in step with handlers/routes.py
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

_COUNT = {
    "name": "record_count",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": r"^\d{1,12}$"},
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
    "schema": {"type": "string", "pattern": r"^\d+$"},
    "description": "numeric user id",
}
_USER = {"$ref": "#/components/schemas/User"}
_BODY_ERRORS = {
    "400": _problem("missing or malformed body, or unknown ?format="),
    "406": _problem("nothing in Accept can be produced"),
    "413": _problem("body larger than server.client_max_size"),
    "415": _problem("body is not JSON, msgpack or YAML"),
    "422": _problem("invalid fields; `errors` lists each one"),
}
_UNAVAILABLE = {"503": _problem("database or Redis unavailable; see Retry-After")}
_NOT_FOUND = {"404": _problem("no such user")}


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
                    "schema": {"type": "string", "pattern": r"^\d{1,9}$"},
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
                        "413": _problem("body larger than server.client_max_size"),
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
                            "description": "only users created at or after this ISO 8601 date/time",
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
                        "422": _problem("since is not a date"),
                        **_UNAVAILABLE,
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {"200": _json("OpenAPI 3.1 document", {"type": "object"})},
                }
            },
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
                    "properties": {"status": {"const": "ready"}, "checks": {"type": "object"}},
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
            }
        },
    }
