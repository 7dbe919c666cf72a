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


_USER_ID = {
    "name": "user_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": r"^\d+$"},
    "description": "numeric user id",
}
_USER = {"$ref": "#/components/schemas/User"}
_BODY_ERRORS = {
    "400": _problem("missing or malformed JSON body"),
    "413": _problem("body larger than server.client_max_size"),
    "415": _problem("body is not application/json"),
    "422": _problem("invalid fields; `errors` lists each one"),
}
_UNAVAILABLE = {"503": _problem("database or Redis unavailable; see Retry-After")}


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
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/UserCreate"}}
                        },
                    },
                    "responses": {
                        "201": _json(
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
                        {
                            "name": "after",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 0},
                            "description": "return users with an id greater than this",
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1},
                            "description": "page size (default users.default_limit, at most users.max_limit)",
                        },
                    ],
                    "responses": {
                        "200": _json("a page", {"$ref": "#/components/schemas/UserPage"}),
                        "422": _problem("after or limit is not a valid integer"),
                        **_UNAVAILABLE,
                    },
                },
            },
            "/users/{user_id}": {
                "parameters": [_USER_ID],
                "get": {
                    "operationId": "user",
                    "summary": "Read a user",
                    "responses": {
                        "200": _json("the user", _USER),
                        "404": _problem("no such user"),
                        **_UNAVAILABLE,
                    },
                },
                "patch": {
                    "operationId": "user_update",
                    "summary": "Change a user's name and/or email",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/UserPatch"}}
                        },
                    },
                    "responses": {
                        "200": _json("the updated user", _USER),
                        "404": _problem("no such user"),
                        "409": _problem("email already used"),
                        **_BODY_ERRORS,
                        **_UNAVAILABLE,
                    },
                },
                "delete": {
                    "operationId": "user_delete",
                    "summary": "Delete a user",
                    "responses": {
                        "204": {"description": "deleted"},
                        "404": _problem("no such user"),
                        **_UNAVAILABLE,
                    },
                },
            },
            "/users/{user_id}/profile": {
                "parameters": [_USER_ID],
                "get": {
                    "operationId": "user_profile",
                    "summary": "A user with derived profile fields",
                    "responses": {
                        "200": _json("the profile", {"$ref": "#/components/schemas/Profile"}),
                        "404": _problem("no such user"),
                        **_UNAVAILABLE,
                    },
                },
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {"200": _json("OpenAPI 3.1 document", {"type": "object"})},
                }
            },
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
