"""The access check of one route, bound at start-up from what the route table declares.

A route declares the scopes that may call it (alternatives), and whether it serves public data.
Public reads are open while auth.public_reads is on; auth.open_routes opens others (the
migration path for clients without keys). An open route still verifies a credential that is
sent (a bad one is a 401, never an anonymous pass), so the rate limiter only ever counts
verified keys.

`check(request)` decides from memory when it can (a key verified before, no credential on an
open route); it returns the credential when PostgreSQL or the shared tokens must be asked,
which `resolve(request, token)` then does. The outermost layer (middlewares/request_context.py)
calls both, before quick answers are tried, so a route's quick path keeps working behind it.
"""

from __future__ import annotations

from aiohttp import hdrs, web
from multidict import istr

from server.access.verifier import Access
from server.errors import Forbidden, Unauthorized
from server.http.auth import PRINCIPAL, Principal

__all__ = ["STREAM_COOKIE", "Guard"]

STREAM_COOKIE = "hotpath_stream"  # a stream token sent as a cookie
_AUTHORIZATION = istr(hdrs.AUTHORIZATION)


class Guard:
    __slots__ = ("access", "alias", "open", "scopes", "streams")

    def __init__(
        self, access: Access, scopes: tuple[str, ...], open_: bool, alias: str, streams: bool = False
    ) -> None:
        self.access = access
        self.scopes = scopes
        self.open = open_  # callers without a credential may pass
        self.alias = istr(alias) if alias else None  # ratelimit.key_header: the key under another name
        self.streams = streams  # an event stream: a stream token is accepted too

    def check(self, request: web.Request) -> str | None:
        """Decide from memory: None when decided (PRINCIPAL set, or an anonymous caller on an
        open route), else the credential to `resolve`. Raises Unauthorized / Forbidden."""
        headers = request.headers
        raw = headers.get(_AUTHORIZATION)
        if raw is not None:
            scheme, _, token = raw.partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise Unauthorized("send the key as Authorization: Bearer <key>", invalid=True)
        else:
            token = headers.get(self.alias, "") if self.alias is not None else ""
            if not token:
                if self.streams:
                    stream = request.query.get("token") or request.cookies.get(STREAM_COOKIE)
                    if stream:
                        self.admit(request, self.access.stream_principal(stream))
                        return None
                if self.open:
                    return None
                raise Unauthorized(
                    "this route needs an API key: send Authorization: Bearer <key>", invalid=False
                )
        principal = self.access.known(token)
        if principal is None:
            return token
        self.admit(request, principal)
        return None

    async def resolve(self, request: web.Request, token: str) -> None:
        self.admit(request, await self.access.verify(token))

    def admit(self, request: web.Request, principal: Principal) -> None:
        if not self.open and not principal.allows(self.scopes):
            raise Forbidden(self.scopes)
        request[PRINCIPAL] = principal
