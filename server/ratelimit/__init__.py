"""Redis-backed rate limiting, under RATE_LIMITER (the request's decision under RATE_LIMIT).

policy.py (windows, policies, decisions) · identity.py (who a request counts against) ·
windows.py + sliding_window.lua (the exact windows in Redis, one EVALSHA per loop pass) ·
local.py (the in-process fallback) · limiter.py (the decision and the fail modes) ·
resp.py (the lean pipelined Redis connection windows.py talks through).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

from aiohttp import web

from server.config import CONFIG, ConfigError
from server.ratelimit.identity import ClientIdentity
from server.ratelimit.limiter import RateLimiter
from server.ratelimit.policy import build_policies
from server.ratelimit.resp import RespConnection
from server.ratelimit.windows import RedisWindows
from server.runtime import metrics

RATE_LIMITER = web.AppKey("hotpath.rate_limiter", RateLimiter)


async def ratelimit_ctx(app: web.Application) -> AsyncIterator[None]:
    """The rate limiter under RATE_LIMITER: policies per route name, checks coalesced per loop pass."""
    cfg = app[CONFIG].ratelimit
    route_names = sorted({r.name for r in app.router.routes() if r.name})
    try:
        policies = build_policies(route_names, cfg.policies, cfg.default, cfg.exempt) if cfg.enabled else {}
    except ValueError as exc:
        raise ConfigError("ratelimit.policies", str(exc)) from None
    limiter = RateLimiter(
        RedisWindows(
            RespConnection(app[CONFIG].redis.url, timeout=app[CONFIG].redis.socket_timeout), cfg.max_batch
        ),
        policies,
        ClientIdentity(cfg.trusted_proxies, cfg.ipv6_prefix),
        fail_mode=cfg.fail_mode,
        processes=cfg.processes,
        retry_interval=cfg.retry_interval,
    )
    app[RATE_LIMITER] = limiter
    metrics.register(app, partial(_ratelimit_families, limiter))
    yield
    await limiter.close()


def _ratelimit_families(limiter: RateLimiter) -> list[metrics.Family]:
    return [
        metrics.Family(
            "hotpath_ratelimit_degraded",
            "counter",
            "Rate-limit checks answered without Redis, by what happened",
            ("mode",),
            {(name,): float(n) for name, n in limiter.stats.items()},
        )
    ]
