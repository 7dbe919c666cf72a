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

import time

from aiohttp import hdrs, web
from multidict import istr

from server.access.verifier import Access
from server.errors import Forbidden, Unauthorized
from server.http.auth import PRINCIPAL, Principal, bearer_token

__all__ = ["STREAM_COOKIE", "Guard"]

STREAM_COOKIE = "hotpath_stream"  # a stream token sent as a cookie
_AUTHORIZATION = istr(hdrs.AUTHORIZATION)
_ALIAS = "\0"  # marks a credential sent in the alias header (its memo entry is its own)


class Guard:
    """One route's check. Its hot path (a key verified before, sent the same way) is one dict
    lookup of the header's exact text in the memo of verified credentials, and one set test
    of the scopes (python -m bench.inprocess --calls: 4-5 calls a request)."""

    __slots__ = ("_memo", "_used", "access", "alias", "also", "need", "open", "scopes", "streams")

    def __init__(
        self,
        access: Access,
        scopes: tuple[str, ...],
        open_: bool,
        alias: str,
        streams: bool = False,
        also: tuple[str, ...] = (),
    ) -> None:
        self.access = access
        self.scopes = scopes
        self.open = open_  # callers without a credential may pass
        self.need = None if open_ else frozenset(scopes)  # a principal must hold one of these
        self.also = frozenset(also) if also and not open_ else None  # ... and all of these
        self.alias = istr(alias) if alias else None  # ratelimit.key_header: the key under another name
        self.streams = streams  # an event stream: a stream token is accepted too
        self._memo = access.memo
        self._used = access.used

    def check(self, request: web.Request) -> str | None:
        """Decide from memory: None when decided (PRINCIPAL set, or an anonymous caller on an
        open route), else the credential as sent, for `resolve`. Raises Unauthorized/Forbidden."""
        headers = request.headers
        sent = headers.get(_AUTHORIZATION)
        if sent is None:
            alias = self.alias
            if alias is not None and (value := headers.get(alias)):
                sent = _ALIAS + value
            else:
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
        principal = self._memo.get(sent)
        if principal is None or (principal.expires_at is not None and principal.expires_at <= time.time()):
            return sent
        if principal.key_id is not None:
            self._used[principal.key_id] = None
        need = self.need
        if need is not None and (need.isdisjoint(principal.scopes) or self.also is not None):
            self.refuse(principal)
        request[PRINCIPAL] = principal
        return None

    async def resolve(self, request: web.Request, sent: str) -> None:
        """Verify a credential the memo does not hold (or holds expired): the text of its header
        as sent; an alias header's value comes prefixed with _ALIAS."""
        token = sent[len(_ALIAS) :].strip() if sent.startswith(_ALIAS) else bearer_token(sent)
        if not token:
            raise Unauthorized("send the key as Authorization: Bearer <key>", invalid=True)
        self.admit(request, await self.access.verify(token, sent))

    def admit(self, request: web.Request, principal: Principal) -> None:
        if self.need is not None:
            self.refuse(principal)
        request[PRINCIPAL] = principal

    def refuse(self, principal: Principal) -> None:
        """Raise Forbidden unless `principal` holds one of the scopes and every one of `also`."""
        assert self.need is not None
        held = principal.scopes
        if self.need.isdisjoint(held):
            raise Forbidden(self.scopes)
        if self.also is not None and not self.also <= held:
            raise Forbidden(tuple(sorted(self.also - held)))
