"""Rate limiting per route policy (server/ratelimit/limiter.py); headers on every answer it shapes."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from server.config import Config
from server.errors import DomainError, RateLimited, Unavailable
from server.http.layers import Layer
from server.http.streams import RATE_LIMIT
from server.ratelimit import RATE_LIMITER
from server.runtime.metrics import METRICS


def applies(route_name: str, config: Config) -> bool:
    """Whether a route needs this middleware at all (routes without a policy skip it)."""
    rl = config.ratelimit
    if not rl.enabled or route_name in rl.exempt:
        return False
    return route_name in rl.policies or bool(rl.default.strip())


async def ratelimit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    limiter = request.app[RATE_LIMITER]
    policy = limiter.policy_for(request.match_info.route.name)
    if policy is None:
        return await handler(request)
    identity = limiter.identity.identify(request.headers, request.remote)
    decision = await limiter.check(identity, policy)
    if decision is None:
        raise Unavailable("rate limiting is unavailable (fail_mode = closed), retry shortly")
    headers = decision.headers()
    metrics = request.app.get(METRICS)
    if metrics is not None:
        metrics.inc(
            "hotpath_ratelimit_decisions",
            request.match_info.route.name or "",
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
