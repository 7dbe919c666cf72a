"""Domain exceptions raised by services; server/http/problems.py maps them to HTTP problems."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import asyncpg
import redis.exceptions as redis_exc


class DomainError(Exception):
    """Base of every error a service raises on purpose."""

    status = 500
    title = "Internal Server Error"
    type_slug = "about:blank"

    def __init__(
        self,
        detail: str,
        *,
        extra: Mapping[str, object] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        # Extension members of the problem document (RFC 9457 section 3.2).
        self.extra: dict[str, object] = dict(extra or {})
        # Response headers the problem must carry (Retry-After, RateLimit, ...).
        self.headers: dict[str, str] = dict(headers or {})


class NotFound(DomainError):
    status = 404
    title = "Not Found"
    type_slug = "not-found"


class Conflict(DomainError):
    status = 409
    title = "Conflict"
    type_slug = "conflict"


class ValidationFailed(DomainError):
    """Input that parsed but does not satisfy the rules; `errors` lists every field at fault."""

    status = 422
    title = "Unprocessable Content"
    type_slug = "validation"

    def __init__(
        self, errors: Sequence[Mapping[str, str]], detail: str = "the request has invalid fields"
    ) -> None:
        super().__init__(detail, extra={"errors": [dict(e) for e in errors]})


class NotAcceptable(DomainError):
    """The client accepts none of the representations we can produce."""

    status = 406
    title = "Not Acceptable"
    type_slug = "not-acceptable"

    def __init__(self, available: list[str]) -> None:
        super().__init__(
            "none of the representations this resource has is acceptable; send an Accept header "
            "naming one of `available`, or ?format=",
            extra={"available": available},
        )


class Unavailable(DomainError):
    """A backing service (PostgreSQL, Redis) cannot be reached right now."""

    status = 503
    title = "Service Unavailable"
    type_slug = "unavailable"

    def __init__(
        self, detail: str, *, retry_after: int = 1, extra: Mapping[str, object] | None = None
    ) -> None:
        super().__init__(detail, extra=extra, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class RateLimited(DomainError):
    status = 429
    title = "Too Many Requests"
    type_slug = "rate-limited"

    def __init__(
        self, window: str, retry_after: float, rate_info: Mapping[str, object], headers: Mapping[str, str]
    ) -> None:
        super().__init__(
            f"rate limit of {window} exceeded; retry in {headers.get('Retry-After', '1')} s",
            extra={"rate_info": dict(rate_info)},
            headers=headers,
        )


class Unauthorized(DomainError):
    """No credentials where a key is needed, or credentials that are not a valid key (RFC 6750)."""

    status = 401
    title = "Unauthorized"
    type_slug = "unauthorized"

    def __init__(self, detail: str, *, invalid: bool) -> None:
        challenge = 'Bearer realm="hotpath"'
        if invalid:  # RFC 6750 3.1: no error code when the request carried no credentials
            challenge += ', error="invalid_token"'
        super().__init__(detail, headers={"WWW-Authenticate": challenge})


class Forbidden(DomainError):
    """A valid key that lacks the scope a route needs (RFC 6750 insufficient_scope)."""

    status = 403
    title = "Forbidden"
    type_slug = "forbidden"

    def __init__(self, scopes: tuple[str, ...]) -> None:
        wanted = " ".join(scopes)
        which = scopes[0] if len(scopes) == 1 else "one of " + ", ".join(scopes)
        super().__init__(
            f"this key lacks the scope {which}",
            extra={"scope": wanted},
            headers={
                "WWW-Authenticate": f'Bearer realm="hotpath", error="insufficient_scope", scope="{wanted}"'
            },
        )


class StartupError(Exception):
    """A resource could not be opened at start; the message names it (password masked)."""


def as_unavailable(exc: BaseException) -> Unavailable | None:
    """Classify a driver exception that means "backing service unreachable" (→ 503), else None."""
    if isinstance(exc, redis_exc.ConnectionError | redis_exc.TimeoutError):
        return Unavailable("Redis is unavailable, retry shortly")
    if isinstance(exc, asyncpg.QueryCanceledError):  # database.statement_timeout, or an operator
        return Unavailable("the database cancelled the query (statement timeout), retry shortly")
    if isinstance(
        exc,
        asyncpg.PostgresConnectionError
        | asyncpg.CannotConnectNowError
        | asyncpg.TooManyConnectionsError
        | asyncpg.exceptions.OperatorInterventionError
        | asyncpg.ConnectionDoesNotExistError
        # asyncpg's protocol tripping over a server that went away mid-statement (its FATAL
        # between Parse and Bind: "cannot switch to state 12; another operation (2) is in
        # progress"). asyncpg aborts that connection itself, so the pool does not reuse it.
        | asyncpg.InternalClientError,
    ):
        return Unavailable("the database is unavailable, retry shortly")
    if isinstance(exc, TimeoutError | ConnectionError):
        return Unavailable("a backing service did not answer in time, retry shortly")
    if isinstance(exc, asyncpg.InterfaceError) and exc.__context__ is not None:
        # leaving `async with conn.transaction()` on a connection that just died raises "the
        # underlying connection is closed", which hides the reason it closed
        return as_unavailable(exc.__context__)
    return None


class EncodingNotAcceptable(DomainError):
    """The client refuses identity and every content coding we have (RFC 9110 12.5.3)."""

    status = 406
    title = "Not Acceptable"
    type_slug = "not-acceptable"

    def __init__(self, available: list[str]) -> None:
        super().__init__(
            f"identity is refused and none of {', '.join(available)} is acceptable (Accept-Encoding)",
            extra={"available": available},
        )
