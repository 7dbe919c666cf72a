"""CORS (server/http/cors.py): the policy alone, then through the real app: actual answers
(quick ones included), Vary, preflights on every path, refusals, event streams and exports."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict

from server.access import ACCESS, GUARDS
from server.access.scopes import USERS_WRITE
from server.app import create_app
from server.config import Config, CorsConfig
from server.http.cors import CORS, Cors, from_config, normalise_origin
from server.http.layers import CATCH_ALL
from server.products import CATALOGUE
from tests.helpers import replace

APP = "http://app.example"
OTHER = "https://other.example:8443"
EVIL = "http://evil.example"
PROBLEM = "application/problem+json"
ACAO = "Access-Control-Allow-Origin"


def cors_cfg(cfg: Config, **values: Any) -> Config:
    return replace(cfg, cors={"allow_origins": (APP, OTHER), **values})


def vary(headers: Any) -> list[str]:
    return [v.strip().lower() for v in headers.get("Vary", "").split(",") if v.strip()]


# ---------------------------------------------------------------- the policy alone


def test_no_origins_means_no_policy() -> None:
    assert from_config(CorsConfig()) is None
    assert from_config(CorsConfig(allow_origins=(APP,))) is not None


@pytest.mark.parametrize(
    ("configured", "browser_sends"),
    [
        ("https://App.Example.com", "https://app.example.com"),
        ("https://app.example.com:443", "https://app.example.com"),
        ("http://app.example.com:80", "http://app.example.com"),
        ("http://127.0.0.1:8081", "http://127.0.0.1:8081"),
        ("http://[::1]:8081", "http://[::1]:8081"),
    ],
)
def test_origins_are_compared_as_browsers_serialise_them(configured: str, browser_sends: str) -> None:
    assert normalise_origin(configured) == browser_sends
    assert Cors(CorsConfig(allow_origins=(configured,))).allowed(browser_sends) == browser_sends


def test_actual_answer_headers() -> None:
    cors = Cors(CorsConfig(allow_origins=(APP,), expose_headers=("X-Request-ID", "ETag")))
    headers = CIMultiDict[str]()
    cors.apply(APP, headers)
    assert headers[ACAO] == APP
    assert headers["Access-Control-Expose-Headers"] == "X-Request-ID, ETag"
    assert "Access-Control-Allow-Credentials" not in headers
    assert headers["Vary"] == "Origin"
    refused = CIMultiDict[str]()
    cors.apply(EVIL, refused)
    assert dict(refused) == {"Vary": "Origin"}  # the answer varies by origin even when refused
    anonymous = CIMultiDict[str]()
    cors.apply(None, anonymous)
    assert dict(anonymous) == {"Vary": "Origin"}


def test_any_origin_and_credentials() -> None:
    star = Cors(CorsConfig(allow_origins=("*",)))
    headers = CIMultiDict[str]()
    star.apply(EVIL, headers)
    assert headers[ACAO] == "*" and "Access-Control-Allow-Credentials" not in headers
    with_credentials = Cors(CorsConfig(allow_origins=(APP,), allow_credentials=True))
    headers = CIMultiDict[str]()
    with_credentials.apply(APP, headers)
    assert headers[ACAO] == APP and headers["Access-Control-Allow-Credentials"] == "true"


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("Accept, Accept-Encoding", "Accept, Accept-Encoding, Origin"),
        ("Accept", "Accept, Origin"),
        ("accept, origin", "accept, origin"),
        ("*", "*"),
    ],
)
def test_vary_is_merged_never_replaced(before: str, after: str) -> None:
    cors = Cors(CorsConfig(allow_origins=(APP,)))
    for _ in range(2):  # the second time from the memo
        headers = CIMultiDict[str]({"Vary": before})
        cors.apply(APP, headers)
        assert headers.getall("Vary") == [after]


def test_requested_headers_are_checked() -> None:
    cors = Cors(CorsConfig(allow_origins=(APP,), allow_headers=("Content-Type", "Authorization")))
    assert cors.headers_allowed(None) and cors.headers_allowed("")
    assert cors.headers_allowed("content-type,authorization")
    assert cors.headers_allowed(" Content-Type , ")
    assert not cors.headers_allowed("content-type, x-secret")
    assert Cors(CorsConfig(allow_origins=(APP,), allow_headers=("*",))).headers_allowed("x-anything")


# ---------------------------------------------------------------- through the app


async def test_actual_answers_for_allowed_and_other_origins(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(cors_cfg(cfg)))
    resp = await client.get("/health", headers={"Origin": APP})
    assert resp.status == 200 and resp.headers[ACAO] == APP
    expose = resp.headers["Access-Control-Expose-Headers"]
    assert "X-Request-ID" in expose and "ETag" in expose
    assert "origin" in vary(resp.headers)
    assert "Access-Control-Allow-Credentials" not in resp.headers
    resp = await client.get("/health", headers={"Origin": OTHER})
    assert resp.headers[ACAO] == OTHER
    resp = await client.get("/health", headers={"Origin": EVIL})
    assert resp.status == 200 and ACAO not in resp.headers
    assert "Access-Control-Expose-Headers" not in resp.headers and "origin" in vary(resp.headers)
    resp = await client.get("/health")
    assert ACAO not in resp.headers and "origin" in vary(resp.headers)
    # problems too: a page reads why its request failed
    resp = await client.get("/users/999999", headers={"Origin": APP})
    assert resp.status == 404 and resp.content_type == PROBLEM and resp.headers[ACAO] == APP
    resp = await client.get("/no/such/path", headers={"Origin": APP})
    assert resp.status == 404 and resp.headers[ACAO] == APP


async def test_credentials_when_configured(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(cors_cfg(cfg, allow_credentials=True)))
    resp = await client.get("/health", headers={"Origin": APP})
    assert resp.headers[ACAO] == APP and resp.headers["Access-Control-Allow-Credentials"] == "true"


async def test_cache_hits_get_the_headers_and_the_cache_keeps_none(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(cors_cfg(cfg)))
    created = await client.post("/users", json={"name": "Ada", "email": "ada@example.com"})
    assert created.status == 201
    path = f"/users/{(await created.json())['id']}"
    first = await client.get(path, headers={"Origin": APP})
    assert first.status == 200 and first.headers["X-Cache"] != "hit-l1" and first.headers[ACAO] == APP
    # from L1 (the outermost layer's quick answer), for the origin that asks now
    hit = await client.get(path, headers={"Origin": OTHER})
    assert hit.headers["X-Cache"] == "hit-l1" and hit.headers[ACAO] == OTHER
    assert vary(hit.headers) == vary(first.headers) and "origin" in vary(hit.headers)
    assert hit.headers.getall("Vary") == first.headers.getall("Vary")  # one Vary, merged
    assert await hit.json() == await first.json()
    plain = await client.get(path)
    assert plain.headers["X-Cache"] == "hit-l1" and ACAO not in plain.headers
    refused = await client.get(path, headers={"Origin": EVIL})
    assert refused.headers["X-Cache"] == "hit-l1" and ACAO not in refused.headers
    # a revalidation answered from L1 (304) carries them too
    etag = first.headers["ETag"]
    not_modified = await client.get(path, headers={"Origin": APP, "If-None-Match": etag})
    assert not_modified.status == 304 and not_modified.headers[ACAO] == APP


async def test_products_quick_answers_get_the_headers(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(cors_cfg(cfg)))
    catalogue = client.server.app[CATALOGUE]
    headers = {"Accept": "application/json", "Accept-Encoding": "gzip"}
    first = await client.get("/products", headers={**headers, "Origin": APP})
    assert first.status == 200 and first.headers[ACAO] == APP
    # the kept answer (what the quick path serves) holds no CORS header of that request
    _body, kept_headers = catalogue.answers[(headers["Accept"], headers["Accept-Encoding"])]
    assert ACAO not in kept_headers and "origin" not in vary(kept_headers)
    for origin in (OTHER, APP):
        resp = await client.get("/products", headers={**headers, "Origin": origin})
        assert resp.headers[ACAO] == origin
        assert resp.headers.getall("Vary") == ["Accept, Accept-Encoding, Origin"]
        assert await resp.read() == await first.read()
    plain = await client.get("/products", headers=headers)
    assert ACAO not in plain.headers and plain.headers["Vary"] == "Accept, Accept-Encoding, Origin"


async def test_preflights_on_routes_and_unknown_paths(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(cors_cfg(cfg, max_age=123)))
    ask = {
        "Origin": APP,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization, idempotency-key",
    }
    for path in ("/users", "/users/1", "/no/such/path", "/"):
        resp = await client.options(path, headers=ask)
        assert resp.status == 204, path
        h = resp.headers
        assert h[ACAO] == APP
        assert h["Access-Control-Allow-Methods"] == "GET, HEAD, POST, PATCH, DELETE"
        allowed = [v.strip().lower() for v in h["Access-Control-Allow-Headers"].split(",")]
        assert {"content-type", "authorization", "idempotency-key", "last-event-id"} <= set(allowed)
        assert h["Access-Control-Max-Age"] == "123"
        assert {"origin", "access-control-request-method", "access-control-request-headers"} <= set(vary(h))
        assert h.getall("Vary") == [h["Vary"]]
        assert "X-Request-ID" in h and await resp.read() == b""
    # a header the policy does not allow: answered without Allow-Headers, the browser refuses
    resp = await client.options("/users", headers={**ask, "Access-Control-Request-Headers": "x-secret"})
    assert resp.status == 204 and resp.headers[ACAO] == APP
    assert "Access-Control-Allow-Headers" not in resp.headers


async def test_preflights_from_other_origins_are_refused(aiohttp_client: Any, cfg: Config) -> None:
    for config in (cors_cfg(cfg), cfg):  # a foreign origin, and CORS off
        client = await aiohttp_client(create_app(config))
        for path in ("/users", "/no/such/path"):
            resp = await client.options(
                path, headers={"Origin": EVIL, "Access-Control-Request-Method": "GET"}
            )
            assert resp.status == 403 and resp.content_type == PROBLEM
            problem = await resp.json()
            assert problem["status"] == 403 and "not in cors.allow_origins" in problem["detail"]
            assert EVIL in problem["detail"]
            assert not [name for name in resp.headers if name.lower().startswith("access-control-")]
        await client.close()


async def test_plain_options_keeps_todays_answers(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(cors_cfg(cfg)))
    resp = await client.options("/users", headers={"Origin": APP})  # no Access-Control-Request-Method
    assert resp.status == 405 and {"GET", "POST"} <= set(resp.headers["Allow"].split(","))
    assert resp.headers[ACAO] == APP  # an actual cross-origin answer, with its headers
    resp = await client.options("/no/such/path")
    assert resp.status == 404 and ACAO not in resp.headers


async def test_no_rate_limit_refuses_a_preflight(aiohttp_client: Any, cfg: Config) -> None:
    """The catch-all route answers preflights before its other layers: with a default policy
    that limits it (and so 404s), preflights beyond the limit are still answered."""
    config = replace(cors_cfg(cfg), ratelimit={"default": "2/minute"})
    client = await aiohttp_client(create_app(config))
    ask = {"Origin": APP, "Access-Control-Request-Method": "DELETE"}
    for _ in range(5):
        resp = await client.options("/users/1", headers=ask)
        assert resp.status == 204 and "RateLimit" not in resp.headers
    statuses = [(await client.get("/no/such/path")).status for _ in range(3)]
    assert statuses == [404, 404, 429]  # the route itself is limited
    limited = await client.get("/no/such/path", headers={"Origin": APP})
    assert limited.status == 429 and limited.headers[ACAO] == APP  # the page can read Retry-After


async def test_event_streams_and_exports_get_the_headers(aiohttp_client: Any, cfg: Config) -> None:
    client = await aiohttp_client(create_app(cors_cfg(cfg)))
    for path in ("/events?channels=ticker", "/stream-real-time"):
        resp = await client.get(path, headers={"Origin": APP, "Accept": "text/event-stream"})
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        assert resp.headers[ACAO] == APP and "origin" in vary(resp.headers)
        assert "X-Request-ID" in resp.headers["Access-Control-Expose-Headers"]
        assert (await resp.content.readuntil(b"\n\n")).startswith(b"retry: ")
        resp.close()
    resp = await client.get("/events?channels=ticker", headers={"Origin": EVIL})
    assert resp.status == 200 and ACAO not in resp.headers and "origin" in vary(resp.headers)
    resp.close()
    for path in ("/stream-json/3", "/users/export?format=csv"):
        resp = await client.get(path, headers={"Origin": OTHER, "Accept-Encoding": "gzip"})
        assert resp.status == 200 and resp.headers[ACAO] == OTHER, path
        assert {"origin", "accept-encoding"} <= set(vary(resp.headers))
        await resp.read()


async def test_cors_off_costs_nothing(aiohttp_client: Any, cfg: Config) -> None:
    """Default config: no policy, so no route's outermost closure holds one, and answers carry
    no CORS header, not even Vary: Origin."""
    app = create_app(cfg)
    assert app[CORS] is None
    client = await aiohttp_client(app)
    for route in app.router.routes():
        handler: Any = route.handler
        cells = dict(zip(handler.__code__.co_freevars, handler.__closure__ or (), strict=True))
        assert cells["cors_apply"].cell_contents is None, route.name
    for path in ("/health", "/products", "/events?channels=ticker"):
        resp = await client.get(path, headers={"Origin": APP})
        assert ACAO not in resp.headers and "origin" not in vary(resp.headers)
        resp.close()
    on = create_app(cors_cfg(cfg))
    assert isinstance(on[CORS], Cors)
    handler = next(r.handler for r in on.router.routes() if r.name == "products")
    cells = dict(zip(handler.__code__.co_freevars, handler.__closure__ or (), strict=True))
    assert cells["cors_apply"].cell_contents == on[CORS].apply


async def test_redirects_get_the_headers(aiohttp_client: Any) -> None:
    """A redirect leaves the outermost layer as an exception; it gets them as well."""
    from middlewares import bind, compose
    from middlewares.request_context import request_context_middleware

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    app = web.Application()
    app[CORS] = Cors(CorsConfig(allow_origins=(APP,)))
    app.router.add_get("/moved", compose(moved, bind((request_context_middleware,), "moved", app)))
    client = await aiohttp_client(app)
    resp = await client.get("/moved", headers={"Origin": APP}, allow_redirects=False)
    assert resp.status == 302 and resp.headers[ACAO] == APP and resp.headers["Vary"] == "Origin"


async def test_no_key_check_refuses_a_preflight(aiohttp_client: Any, cfg: Config) -> None:
    """With the shipped access rules (writes need a key, nothing else open), a preflight, which
    carries no credentials, is answered for a protected route; the refusals a page then gets
    for a request without a key carry the CORS headers, so the page can read them."""
    config = replace(cors_cfg(cfg), auth={"open_routes": (), "public_reads": False})
    app = create_app(config)
    client = await aiohttp_client(app)
    assert CATCH_ALL not in app[GUARDS]  # the catch-all declares no scopes: no key check
    ask = {
        "Origin": APP,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    for path in ("/users", "/admin/keys", "/metrics"):
        resp = await client.options(path, headers=ask)
        assert resp.status == 204 and resp.headers[ACAO] == APP, path
    refused = await client.post(
        "/users", json={"name": "Ada", "email": "ada@example.com"}, headers={"Origin": APP}
    )
    assert refused.status == 401 and refused.headers[ACAO] == APP and "WWW-Authenticate" in refused.headers
    record, key = await app[ACCESS].store.create("test", "page", [USERS_WRITE])
    await app[ACCESS].changed(record.id)
    created = await client.post(
        "/users",
        json={"name": "Ada", "email": "ada@example.com"},
        headers={"Origin": APP, "Authorization": f"Bearer {key}"},
    )
    assert created.status == 201 and created.headers[ACAO] == APP
