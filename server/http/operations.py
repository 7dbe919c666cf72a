"""What a route declares about itself for the API contract, and the route record carrying it.

server/routes.py declares every route with its Operation (summary, tags, scopes, the request
and response shapes by name, whether it is negotiated); server/http/openapi.py walks those
declarations to build the OpenAPI document. A Schema is declared beside the code that
validates or produces what it describes, with that code's limits, and named here only by
the objects the route table hands over.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from server.http.layers import QuickFor
from server.http.routing import PathNumber, RoutePath

__all__ = [
    "STRING",
    "Body",
    "Operation",
    "Param",
    "Problem",
    "Response",
    "Route",
    "Schema",
    "SecurityScheme",
    "delete",
    "get",
    "header",
    "patch",
    "post",
    "query",
]

# The schema of a text document (CSV, HTML, NDJSON, ...): its grammar is not JSON Schema's.
STRING: Mapping[str, Any] = MappingProxyType({"type": "string"})


@dataclass(frozen=True)
class Schema:
    """A named JSON Schema, one component of the document. Inside `body` (at any depth), a
    Schema stands for a reference to it; the document gathers every Schema it meets."""

    name: str
    body: Mapping[str, Any]


@dataclass(frozen=True)
class SecurityScheme:
    """How a caller proves who it is (an OpenAPI security scheme), declared where it is checked."""

    name: str
    scheme: Mapping[str, Any]


@dataclass(frozen=True)
class Param:
    """A query or header parameter (path parameters come from the route's path)."""

    name: str
    where: str = "query"
    schema: Mapping[str, Any] = field(default_factory=lambda: STRING)
    description: str | None = None


def query(name: str, description: str | None = None, schema: Mapping[str, Any] = STRING) -> Param:
    return Param(name, "query", schema, description)


def header(name: str, description: str | None = None, schema: Mapping[str, Any] = STRING) -> Param:
    return Param(name, "header", schema, description)


@dataclass(frozen=True)
class Response:
    """A success (or any non-problem) answer. `schema` is the data: in every representation
    when the operation is negotiated, else as JSON. `content` adds (or, without a schema, is)
    the other media types, each with its schema. `headers` are OpenAPI header objects."""

    description: str
    schema: Schema | Mapping[str, Any] | None = None
    content: Mapping[str, Schema | Mapping[str, Any]] = field(default_factory=dict)
    headers: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Problem:
    """An error answer: an RFC 9457 problem document (server/http/problems.py)."""

    description: str
    headers: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Body:
    """A request body: each accepted media type with its schema. `errors` are the problems
    its reader answers (status -> description) where they differ from server/http/reading's
    read_body (server/http/openapi.py's BODY_ERRORS)."""

    content: Mapping[str, Schema | Mapping[str, Any]]
    required: bool = True
    errors: Mapping[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Operation:
    """What one route does, for the API document. `negotiated`: answered in every
    representation (?format=, Accept), with the parameters and problems that brings.
    `responses`: status -> Response, Problem, or a problem's description. `query`: the
    parameters beyond the path's and negotiation's, in order. `scopes`: who may call it (a
    key holding any one of them; none: anyone, unchecked), enforced by server/access/guard.py.
    `public`: a read of public data, open while auth.public_reads is on. `stream_token`: an
    event stream, which also takes a stream token (a browser's EventSource sends no header).
    `also`: scopes a key needs as well (a bulk import writes users: `jobs` and `users:write`).
    `security`: a scheme other than the API keys that this operation names."""

    summary: str
    tags: tuple[str, ...]
    responses: Mapping[int, Response | Problem | str]
    description: str | None = None
    negotiated: bool = False
    body: Body | None = None
    query: tuple[Param, ...] = ()
    security: SecurityScheme | None = None
    scopes: tuple[str, ...] = ()
    public: bool = False
    stream_token: bool = False
    also: tuple[str, ...] = ()  # scopes needed besides one of `scopes` (all of them)


@dataclass(frozen=True, eq=False)
class Route:
    """One row of the route table: what aiohttp registers (`definition`) and its operation.
    `quick`: the handler's quick answer, when it has one (server/http/layers.py), bound to
    the route at start-up."""

    method: str
    path: RoutePath
    handler: Handler
    name: str
    operation: Operation
    allow_head: bool = True  # GET only: aiohttp adds HEAD beside it
    quick: QuickFor | None = None

    @property
    def definition(self) -> web.RouteDef:
        """The aiohttp route definition, as web.get() & co. would make it."""
        kwargs: dict[str, Any] = {"name": self.name}
        if self.method == hdrs.METH_GET:
            kwargs["allow_head"] = self.allow_head
        return web.RouteDef(self.method, self.path.pattern, self.handler, kwargs)


PathParts = str | tuple[str | PathNumber, ...]


def _route(
    method: str,
    path: PathParts,
    handler: Handler,
    name: str,
    op: Operation,
    head: bool,
    quick: QuickFor | None = None,
) -> Route:
    parts = (path,) if isinstance(path, str) else path
    return Route(method, RoutePath(parts), handler, name, op, head, quick)


def get(
    path: PathParts,
    handler: Handler,
    name: str,
    operation: Operation,
    *,
    allow_head: bool = True,
    quick: QuickFor | None = None,
) -> Route:
    return _route(hdrs.METH_GET, path, handler, name, operation, allow_head, quick)


def post(path: PathParts, handler: Handler, name: str, operation: Operation) -> Route:
    return _route(hdrs.METH_POST, path, handler, name, operation, True)


def patch(path: PathParts, handler: Handler, name: str, operation: Operation) -> Route:
    return _route(hdrs.METH_PATCH, path, handler, name, operation, True)


def delete(path: PathParts, handler: Handler, name: str, operation: Operation) -> Route:
    return _route(hdrs.METH_DELETE, path, handler, name, operation, True)
