"""Rate limiting per route policy and per verified caller (server/ratelimit/limiter.py);
headers on every answer it shapes.

Who counts: the verified caller the access layer put on the request (`PRINCIPAL`: an API key,
presented as `Authorization: Bearer` or under `ratelimit.key_header`, checked before this layer
runs, so an unknown key is a 401 and never reaches a bucket), else the client address. A key
with a rate of its own (its tier) is limited by that rate instead of the route's policy, as
one budget across every route this layer is on: each route with a policy, and every write
(POST, PUT, PATCH, DELETE), with a policy or not, so a key's tier always bounds its writes.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from server.config import Config
from server.errors import DomainError, RateLimited, Unavailable
from server.http.auth import PRINCIPAL
from server.http.layers import Layer
from server.http.streams import RATE_LIMIT
from server.ratelimit import RATE_LIMITER
from server.runtime.metrics import METRICS

WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def applies(route_name: str, config: Config, method: str) -> bool:
    """Whether a route needs this middleware at all: a policy (its own or the default), or a
    write (where a key's tier applies even without a route policy). Others skip it."""
    rl = config.ratelimit
    if not rl.enabled or route_name in rl.exempt:
        return False
    return route_name in rl.policies or bool(rl.default.strip()) or method in WRITES


async def ratelimit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    limiter = request.app[RATE_LIMITER]
    route = request.match_info.route.name
    try:  # not request.get(): Mapping.get costs a frame more; a miss raises either way
        principal = request[PRINCIPAL]
    except KeyError:
        policy = limiter.policies.get(route) if route else None
        if policy is None:
            return await handler(request)
        identity = limiter.identity.identify(request.headers, request.remote)
    else:
        rate = principal.rate
        if rate is None:
            policy = limiter.policies.get(route) if route else None
        else:
            policy = limiter.tiers.get(rate) or limiter.tier(rate, route)
        if policy is None:
            return await handler(request)
        identity = principal.identity
    decision = await limiter.check(identity, policy)
    if decision is None:
        raise Unavailable("rate limiting is unavailable (fail_mode = closed), retry shortly")
    headers = decision.headers()
    metrics = request.app.get(METRICS)
    if metrics is not None:
        metrics.inc(
            "hotpath_ratelimit_decisions",
            route or "",
            "allowed" if decision.allowed else "limited",
        )
    if not decision.allowed:
        raise RateLimited(decision.window.label, decision.retry_after, decision.info(), headers)
    request[RATE_LIMIT] = decision
    try:
        response = await handler(request)
    except (web.HTTPException, DomainError) as exc:
        exc.headers.update(headers)
        raise
    if not response.prepared:
        response.headers.update(headers)
    return response


LAYER = Layer(ratelimit_middleware, applies=applies)
