"""The API contract served at /openapi.json (OpenAPI 3.1), derived from the route table.

build_spec() walks the declared routes (server/routes.py) as Starlette's schemas.py walks its
own: each route gives its path template, its path parameters (the number() declarations),
its method and name, and its Operation (server/http/operations.py). What every negotiated
answer or every request body brings (parameters, representations, problems) is added here,
once, from the code that does it: server/http/render.py's formats, server/http/bodies.py's
limits. Component schemas are gathered from the Schema objects the operations name; each is
declared beside the code that validates or produces it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from server.http import bodies, render
from server.http.operations import (
    STRING,
    Body,
    Operation,
    Param,
    Problem,
    Response,
    Route,
    Schema,
    SecurityScheme,
    query,
)
from server.http.problems import PROBLEM, PROBLEM_TYPE
from server.http.routing import PathNumber, number_pattern

__all__ = ["BODY_ERRORS", "DOCUMENT", "Document", "body", "build_spec", "document_of"]

INFO = {
    "title": "hotpath",
    "version": "0.1.0",
    "description": "A production-grade Python web API server written directly on aiohttp.",
}

# ---------------------------------------------------------------- what negotiation brings

# Every representation a negotiated answer has, in server/http/render.py's order. Those that
# carry the data as data (the ones a request body may be sent in) share the answer's schema;
# the others (XML, text, CSV, HTML) are documents of their own.
_REPRESENTATIONS = tuple(f.media_type for f in render.FORMATS)
_STRUCTURED = frozenset(bodies.BODY_TYPES)
_NEGOTIATED = " (representation chosen by Accept or ?format=; Vary: Accept)"
NEGOTIATION_PARAMS = (
    query("format", "overrides Accept", {"type": "string", "enum": [f.name for f in render.FORMATS]}),
    query("pretty", "1 for indented JSON"),
)
NEGOTIATION_ERRORS = {
    400: "unknown ?format=",
    406: "nothing in Accept can be produced; `available` lists what can",
}

# ---------------------------------------------------------------- who may call

# The API keys (server/access/): `Authorization: Bearer hp_<prefix>_<secret>`. Each operation
# lists the scopes that admit it as alternative requirements.
API_KEY = SecurityScheme(
    "apiKey",
    {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key (hp_<prefix>_<secret>, from `python run.py keys create` or POST "
        "/admin/keys). Each operation names the scopes that admit it; a key needs one of them.",
    },
)
ACCESS_ERRORS = {
    401: Problem(
        "no key, or not a valid key (unknown, revoked, expired); WWW-Authenticate: Bearer",
        {"WWW-Authenticate": {"schema": {"type": "string"}}},
    ),
    403: Problem(
        'the key lacks the scope (error="insufficient_scope"; `scope` names it)',
        {"WWW-Authenticate": {"schema": {"type": "string"}}},
    ),
}
_PUBLIC = " Open to callers without a key while auth.public_reads is on (the default)."
_STREAM_TOKEN = query(
    "token", "a stream token from POST /feed/tokens, for clients that cannot send Authorization (EventSource)"
)

# ---------------------------------------------------------------- what a request body brings

# server/http/reading.py's read_body: bounded by bodies' limits and the server's settings.
# run.py's server (server/runtime/connections.py) gives a body server.client_body_timeout.
BODY_ERRORS = {
    400: f"missing or malformed body (nested over {bodies.MAX_BODY_DEPTH} deep, an integer over 64 bits)",
    408: "the body did not arrive within server.client_body_timeout",
    413: (
        "body beyond server.client_max_size (YAML: server.yaml_max_size) as sent or decompressed, or "
        "holding more than server.body_max_containers arrays/objects, server.body_max_items values or "
        "server.body_max_fields fields"
    ),
    415: "body is not JSON, msgpack or YAML, or a Content-Encoding that is not decoded",
    422: "invalid fields; `errors` lists each one",
}


def body(
    schema: Schema | Mapping[str, Any],
    media_types: tuple[str, ...] = bodies.BODY_TYPES,
    *,
    required: bool = True,
    errors: Mapping[int, str] | None = None,
) -> Body:
    """A body of one schema in each media type: by default those read_body reads."""
    return Body({media: schema for media in media_types}, required, errors or {})


# ---------------------------------------------------------------- the document


@dataclass(frozen=True)
class Document:
    """The API document, derived once per process: as data (/docs) and as bytes."""

    spec: Mapping[str, Any]
    body: bytes


DOCUMENT = web.AppKey("hotpath.openapi", Document)


def document_of(routes: Iterable[Route], tags: Mapping[str, str]) -> Document:
    """The document of `routes`, as data and as the bytes /openapi.json sends."""
    spec = build_spec(routes, tags)
    return Document(spec, orjson.dumps(spec))


def build_spec(routes: Iterable[Route], tags: Mapping[str, str]) -> dict[str, Any]:
    """The whole OpenAPI document of `routes`; `tags` names and describes every tag they use."""
    gather = _Components()
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        unknown = set(route.operation.tags) - set(tags)
        if unknown or not route.operation.tags:
            raise ValueError(f"route {route.name}: tags {sorted(unknown)} are not declared (or none)")
        item = paths.setdefault(route.path.template, {})
        if route.path.variables and "parameters" not in item:
            item["parameters"] = [_path_param(v) for v in route.path.variables]
        method = route.method.lower()
        if method in item:
            raise ValueError(f"two routes for {route.method} {route.path.template}")
        item[method] = _operation(route.name, route.operation, gather)
    components = gather.components()
    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": dict(INFO),
        "tags": [{"name": name, "description": text} for name, text in tags.items()],
        "paths": paths,
        "components": components,
    }
    _check_refs(spec, components["schemas"])
    return spec


def _path_param(variable: PathNumber) -> dict[str, Any]:
    """A number() path variable: canonical digits, as server/http/routing.py matches them."""
    return {
        "name": variable.name,
        "in": "path",
        "required": True,
        "schema": {
            "type": "string",
            "pattern": f"^({number_pattern(variable.digits)})$",
            "maxLength": variable.digits,
        },
        "description": variable.description,
    }


def _operation(name: str, op: Operation, gather: _Components) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": name, "summary": op.summary, "tags": list(op.tags)}
    description = (op.description or "") + (_PUBLIC if op.public else "")
    if description:
        out["description"] = description.strip()
    params = [
        *(NEGOTIATION_PARAMS if op.negotiated else ()),
        *op.query,
        *((_STREAM_TOKEN,) if op.stream_token else ()),
    ]
    if params:
        out["parameters"] = [_param(p, gather) for p in params]
    if op.scopes:
        scheme = gather.scheme(op.security or API_KEY)
        needed = [{scheme: [scope, *op.also]} for scope in op.scopes]
        out["security"] = [{}, *needed] if op.public else needed
    elif op.security is not None:
        out["security"] = [{gather.scheme(op.security): []}]
    if op.body is not None:
        out["requestBody"] = _request_body(op.body, gather)
    out["responses"] = _responses(op, gather)
    return out


def _param(param: Param, gather: _Components) -> dict[str, Any]:
    out = {"name": param.name, "in": param.where, "schema": gather.json(param.schema)}
    if param.description is not None:
        out["description"] = param.description
    return out


def _request_body(body: Body, gather: _Components) -> dict[str, Any]:
    content = {media: {"schema": gather.json(schema)} for media, schema in body.content.items()}
    return {"required": body.required, "content": content}


def _responses(op: Operation, gather: _Components) -> dict[str, Any]:
    """The declared answers, over the problems negotiation and the body reader bring."""
    answers: dict[int, Response | Problem | str] = {}
    if op.scopes:
        answers.update(ACCESS_ERRORS)
    if op.negotiated:
        answers.update(NEGOTIATION_ERRORS)
    if op.body is not None:
        errors = {**BODY_ERRORS, **op.body.errors}
        if op.negotiated:
            errors[400] += ", or " + NEGOTIATION_ERRORS[400]
        answers.update(errors)
    answers.update(op.responses)
    out: dict[str, Any] = {}
    for status in sorted(answers):
        answer = answers[status]
        if isinstance(answer, Response):
            out[str(status)] = _response(answer, op.negotiated, gather)
        else:
            out[str(status)] = _problem(Problem(answer) if isinstance(answer, str) else answer, gather)
    return out


def _response(resp: Response, negotiated: bool, gather: _Components) -> dict[str, Any]:
    out: dict[str, Any] = {"description": resp.description}
    content: dict[str, Any] = {}
    if resp.schema is not None:
        schema = gather.json(resp.schema)
        if negotiated:
            out["description"] += _NEGOTIATED
            for media in _REPRESENTATIONS:
                content[media] = {"schema": schema if media in _STRUCTURED else dict(STRING)}
        else:
            content["application/json"] = {"schema": schema}
    for media, other in resp.content.items():
        content[media] = {"schema": gather.json(other)}
    if content:
        out["content"] = content
    if resp.headers:
        out["headers"] = gather.json(resp.headers)
    return out


def _problem(problem: Problem, gather: _Components) -> dict[str, Any]:
    out = {"description": problem.description, "content": {PROBLEM_TYPE: {"schema": gather.json(PROBLEM)}}}
    if problem.headers:
        out["headers"] = gather.json(problem.headers)
    return out


class _Components:
    """Every Schema and security scheme the operations name, each under its own name."""

    def __init__(self) -> None:
        self._schemas: dict[str, Schema] = {}
        self._rendered: dict[str, Any] = {}
        self._schemes: dict[str, SecurityScheme] = {}

    def json(self, value: Any) -> Any:
        """`value` as JSON data, with each Schema in it a reference (gathered on the way)."""
        if isinstance(value, Schema):
            return {"$ref": f"#/components/schemas/{self.schema(value)}"}
        if isinstance(value, Mapping):
            return {str(k): self.json(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.json(v) for v in value]
        return value

    def schema(self, schema: Schema) -> str:
        known = self._schemas.get(schema.name)
        if known is None:
            self._schemas[schema.name] = schema
            self._rendered[schema.name] = self.json(schema.body)
        elif known is not schema:
            raise ValueError(f"two schemas are named {schema.name!r}")
        return schema.name

    def scheme(self, scheme: SecurityScheme) -> str:
        known = self._schemes.setdefault(scheme.name, scheme)
        if known is not scheme:
            raise ValueError(f"two security schemes are named {scheme.name!r}")
        return scheme.name

    def components(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schemas": dict(sorted(self._rendered.items()))}
        if self._schemes:
            out["securitySchemes"] = {name: dict(s.scheme) for name, s in sorted(self._schemes.items())}
        return out


def _check_refs(value: Any, schemas: Mapping[str, Any]) -> None:
    """Every $ref names a gathered schema (a Schema may name another one by its $ref text)."""
    if isinstance(value, Mapping):
        ref = value.get("$ref")
        if isinstance(ref, str) and ref.removeprefix("#/components/schemas/") not in schemas:
            raise ValueError(f"{ref} is not among the gathered schemas")
        for v in value.values():
            _check_refs(v, schemas)
    elif isinstance(value, list):
        for v in value:
            _check_refs(v, schemas)
