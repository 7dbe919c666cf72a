"""/openapi.json is a valid OpenAPI 3.1 document that matches the route table exactly."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

from openapi_spec_validator import validate

from server.http.openapi import build_spec
from server.routes import ROUTES

# The document as server/http/openapi.py wrote it out by hand, before it was derived from the
# route table (json.dumps(build_spec(), sort_keys=True, indent=1) at that commit).
BEFORE = Path(__file__).parent / "data" / "openapi_before.json"


def intended(before: dict[str, Any]) -> dict[str, Any]:
    """The snapshot with the intended changes applied, and nothing else: every difference
    between it and today's document is one of these, each named here."""
    return copy.deepcopy(before)


def routes_as_spec_keys() -> set[tuple[str, str, str]]:
    keys = set()
    for route in ROUTES:
        path = re.sub(r"\{(\w+):(?:[^{}]|\{[^}]*\})+\}", r"{\1}", route.path)  # {user_id:\d+} -> {user_id}
        keys.add((path, route.method.lower(), route.kwargs["name"]))
    return keys


def spec_keys(spec: dict[str, Any]) -> set[tuple[str, str, str]]:
    methods = {"get", "post", "put", "patch", "delete"}
    return {
        (path, method, op["operationId"])
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method in methods
    }


def test_spec_is_valid_openapi_31() -> None:
    validate(build_spec())


def test_every_route_is_documented_and_nothing_else() -> None:
    assert spec_keys(build_spec()) == routes_as_spec_keys()


async def test_served_document_is_the_spec(client: Any) -> None:
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    assert await resp.json() == build_spec()


async def test_served_document_is_the_snapshot_with_the_intended_changes(client: Any) -> None:
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    assert await resp.json() == intended(json.loads(BEFORE.read_text()))
