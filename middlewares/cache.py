"""Whole-response caching of the GET/HEAD routes named in [cache] routes (server/cache stores).

The key covers the route, its path parameters, the sorted query, the representation Accept
negotiates and the content coding the compression layer chooses for Accept-Encoding:
compression sits inside this middleware, so a stored body may be encoded, and a gzip client and
an identity client must never swap bodies. Both are keyed by what was chosen, never by the
header text. Only plain 200s without cookies or private/no-store are stored; a 404 is remembered
for cache.negative_ttl; other errors pass through untouched. Every answer says X-Cache.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware
from multidict import CIMultiDict, CIMultiDictProxy

from server.cache import CACHE, Cache, Entry, Hit, make_key, response_group
from server.config import CONFIG, Config
from server.errors import DomainError, NotFound
from server.http.compression import COMPRESSION
from server.http.layers import Layer, Quick
from server.http.negotiation import NEGOTIATOR

# Response headers stored with the body; everything else (request id, rate limit) is per request.
# A handler's own ETag (a validator of its bytes) is kept; otherwise one is derived from the value.
_KEEP = (
    "Content-Type",
    "Content-Encoding",
    "Content-Language",
    "Content-Disposition",
    "Vary",
    "Link",
    "ETag",
)
_READS = frozenset({"GET", "HEAD"})
_MEMO_MAX = 4096


def applies(route_name: str, config: Config, method: str) -> bool:
    """Only the routes with a policy in cache.routes get this middleware in their chain."""
    return config.cache.enabled and route_name in config.cache.routes


def chosen_coding(app: web.Application, header: str | None) -> str:
    """The content coding the compression layer will pick for this Accept-Encoding, as a key
    part: "gzip", "identity", or "gzip!" when identity is refused (then even small bodies are
    compressed). Derived from the negotiator's own choice, never from the header's text, so
    a header that parses one way here and another way there cannot file a gzip body under
    the key of clients that asked for none (RFC 9110 allows repeated parameters, which
    different parsers read differently)."""
    state = app[COMPRESSION]
    if not state.enabled:
        return ""
    choice = state.negotiator.choose(header)
    return (choice.coding or "identity") + ("" if choice.identity_ok else "!")


def _matches(if_none_match: str, etag: str) -> bool:
    """Weak comparison, as GET and HEAD use (RFC 9110 section 13.1.2)."""
    etag = etag.removeprefix("W/")
    for tag in if_none_match.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


class _Uncacheable(Exception):
    """The loading request's answer may not be shared: it is returned (or raised) to that
    request alone, and requests that waited for it run the handler themselves."""

    def __init__(self, response: web.StreamResponse | None, error: BaseException | None) -> None:
        super().__init__("response not cacheable")
        self.response = response
        self.error = error


def _storable(resp: web.StreamResponse) -> bool:
    if not isinstance(resp, web.Response) or resp.prepared or resp.status != 200:
        return False
    if not isinstance(resp.body, bytes) or resp.cookies or "Set-Cookie" in resp.headers:
        return False
    control = resp.headers.get("Cache-Control", "").lower()
    return "private" not in control and "no-store" not in control


def _mark(exc: BaseException, value: str) -> None:
    if isinstance(exc, web.HTTPException | DomainError):
        exc.headers["X-Cache"] = value


async def cache_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    app = request.app
    route = request.match_info.route.name or ""
    policy = app[CONFIG].cache.routes.get(route)
    if policy is None:
        return await handler(request)
    return await _cached(request, handler, app, route, policy)


def for_route(route: str, app: web.Application) -> Middleware:
    """cache_middleware for one route of `app`, with its name and policy bound now."""
    return partial(_cached, app=app, route=route, policy=app[CONFIG].cache.routes[route])


def quick_for(route: str, app: web.Application) -> tuple[Quick, Middleware]:
    """The fresh-entry path of for_route(), for the outermost layer to call first (a quick
    answer, server/http/layers.py), and the middleware that goes on when it declined (it does
    not look for a fresh entry again)."""
    policy = app[CONFIG].cache.routes[route]
    return (
        partial(_fresh, app, route, policy),  # positional: a keyword partial costs ~0.3 µs a call
        partial(_cached, app=app, route=route, policy=policy, fresh_tried=True),
    )


LAYER = Layer(cache_middleware, applies=applies, bind=for_route, quick=quick_for)


def _lookup(request: web.Request, cache: Cache, route: str) -> tuple[str, str]:
    """The entry key and invalidation group of this request, memoised on the raw target and
    header values: the route's parameters and query are a function of the raw path."""
    headers = request.headers
    raw = (route, request.raw_path, headers.get(hdrs.ACCEPT), headers.get(hdrs.ACCEPT_ENCODING))
    known = cache.key_memo.get(raw)
    if known is None:
        if len(cache.key_memo) >= _MEMO_MAX:
            cache.key_memo.clear()
        known = cache.key_memo[raw] = _key(request, route)
    return known


def _refresh(headers: CIMultiDictProxy[str]) -> bool:
    """The client asked to revalidate (Cache-Control: no-cache or max-age=0)."""
    control = headers.get(hdrs.CACHE_CONTROL)
    if control is None:
        return False
    control = control.lower()
    return "no-cache" in control or "max-age=0" in control


def _fresh(
    app: web.Application, route: str, policy: dict[str, float], request: web.Request
) -> web.Response | None:
    """The answer from a fresh entry in this process, if there is one and the client did not ask
    to revalidate; its response headers (X-Cache: hit-l1 included) are built once per entry,
    and aiohttp copies them into the Response."""
    headers = request.headers
    if request.method not in _READS or (hdrs.CACHE_CONTROL in headers and _refresh(headers)):
        return None
    cache: Cache = app[CACHE]
    entry = cache.peek(_lookup(request, cache, route)[0])
    if entry is None or entry.missing is not None:
        return None
    status, _, body = entry.value
    if hdrs.IF_NONE_MATCH in headers:
        return _answer(request, status, body, _headers(entry, policy), "hit-l1")
    hit_headers = entry.derived
    if hit_headers is None:
        hit_headers = entry.derived = _headers(entry, policy)
        hit_headers["X-Cache"] = "hit-l1"
    return web.Response(body=body, status=status, headers=hit_headers)


async def _cached(
    request: web.Request,
    handler: Handler,
    app: web.Application,
    route: str,
    policy: dict[str, float],
    fresh_tried: bool = False,
) -> web.StreamResponse:
    if request.method not in _READS:
        return await handler(request)
    fresh = None if fresh_tried else _fresh(app, route, policy, request)
    if fresh is not None:
        return fresh
    cache: Cache = app[CACHE]
    key, group = _lookup(request, cache, route)
    refresh = _refresh(request.headers)
    mine: list[_Uncacheable] = []

    async def load() -> list[Any]:
        try:
            resp = await handler(request)
        except NotFound:
            raise  # remembered for negative_ttl by the cache
        except Exception as exc:
            mine.append(_Uncacheable(None, exc))
            raise mine[-1] from None
        if not _storable(resp):
            mine.append(_Uncacheable(resp, None))
            raise mine[-1]
        assert isinstance(resp, web.Response) and isinstance(resp.body, bytes)
        headers = [[k, resp.headers[k]] for k in _KEEP if k in resp.headers]
        return [resp.status, headers, resp.body]

    try:
        hit: Hit[Any] = await cache.get_or_load_key(
            key,
            load,
            ttl=policy["ttl"],
            grace=policy.get("grace", 0.0),
            group=group,
            refresh=refresh,
            raise_missing=False,
        )
    except _Uncacheable as exc:
        if mine and exc is mine[0]:
            if exc.error is not None:
                _mark(exc.error, "miss")
                raise exc.error from None
            assert exc.response is not None
            response = exc.response
        else:  # we waited for another request whose answer was its own: ask for ours
            response = await handler(request)
        response.headers["X-Cache"] = "bypass"
        return response
    source = "bypass" if refresh else hit.source
    if hit.missing is not None:
        raise NotFound(hit.missing, headers={"X-Cache": source})
    status, stored, body = hit.value
    return _answer(request, status, body, _build_headers(stored, hit.etag, policy), source)


def _key(request: web.Request, route: str) -> tuple[str, str]:
    params = request.match_info
    key = make_key(
        "resp:" + route,
        [
            sorted(params.items()),
            sorted(request.query.items()) if request.query_string else None,
            request.app[NEGOTIATOR].choose(request.headers.get("Accept")),
            chosen_coding(request.app, request.headers.get("Accept-Encoding")),
        ],
    )
    return key, response_group(route, **params)


def _build_headers(stored: list[list[str]], etag: str, policy: dict[str, float]) -> CIMultiDict[str]:
    out = CIMultiDict[str]((k, v) for k, v in stored)
    if "ETag" not in out:
        out["ETag"] = f'"{etag}"'
    max_age = int(policy.get("max_age", 0))
    # max_age 0: clients keep the body but ask again each time (a cheap 304), so a write is seen
    out["Cache-Control"] = f"public, max-age={max_age}" if max_age else "no-cache"
    return out


def _headers(entry: Entry, policy: dict[str, float]) -> CIMultiDict[str]:
    """The stored headers of `entry` as a response sends them (ETag, Cache-Control added)."""
    return _build_headers(entry.value[1], entry.etag, policy)


def _answer(
    request: web.Request, status: int, body: bytes, base: CIMultiDict[str], source: str
) -> web.Response:
    out = base.copy()  # the stored headers stay as they are; the copy gets this answer's X-Cache
    out["X-Cache"] = source
    inm = request.headers.get("If-None-Match")
    if inm is not None and _matches(inm, out["ETag"]):
        for name in ("Content-Type", "Content-Encoding", "Content-Disposition"):
            out.popall(name, None)
        return web.Response(status=304, headers=out)
    return web.Response(body=body, status=status, headers=out)
