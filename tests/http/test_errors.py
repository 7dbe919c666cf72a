"""The error and request-context middlewares, each on a small app of its own, then the whole."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from middlewares import compose
from middlewares.request_context import _BATCH, RequestIds, request_context_middleware
from server.errors import Conflict, Unavailable, ValidationFailed, as_unavailable
from server.http.streams import stream_headers
from server.routes import unmatched

PROBLEM = "application/problem+json"


def small_app() -> web.Application:
    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("secret internals: password=hunter2")

    async def conflict(request: web.Request) -> web.Response:
        raise Conflict("already there")

    async def invalid(request: web.Request) -> web.Response:
        raise ValidationFailed([{"field": "x", "message": "bad"}])

    async def down(request: web.Request) -> web.Response:
        raise ConnectionRefusedError(111, "Connection refused")

    async def unavailable(request: web.Request) -> web.Response:
        raise Unavailable("later", retry_after=7)

    async def desync(request: web.Request) -> web.Response:
        # what asyncpg raised to a request during the soak's PostgreSQL restart
        raise asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress")

    async def teapot(request: web.Request) -> web.Response:
        raise web.HTTPBadRequest(text="custom detail")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    async def cancelled(request: web.Request) -> web.Response:
        raise asyncio.CancelledError

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        stream_headers(request, resp)
        await resp.prepare(request)
        await resp.write(b"chunk")
        return resp

    async def stream_fails(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"first part")
        raise Unavailable("the database went away mid-stream")

    # The middleware on each route and on a catch-all (404, 405), as server/routes.py binds it:
    # aiohttp 3's app-level middlewares=[...] would want the deprecated @web.middleware.
    app = web.Application()
    chain = (request_context_middleware,)
    app.router.add_get("/stream-fails", compose(stream_fails, chain))
    app.router.add_get("/boom", compose(boom, chain))
    app.router.add_get("/conflict", compose(conflict, chain))
    app.router.add_get("/invalid", compose(invalid, chain))
    app.router.add_get("/down", compose(down, chain))
    app.router.add_get("/unavailable", compose(unavailable, chain))
    app.router.add_get("/desync", compose(desync, chain))
    app.router.add_get("/bad", compose(teapot, chain))
    app.router.add_get("/redirect", compose(redirect, chain))
    app.router.add_get("/cancelled", compose(cancelled, chain))
    app.router.add_get("/stream", compose(stream, chain))
    app.router.add_route("*", r"/{tail:[\s\S]*}", compose(unmatched, chain))
    return app


@pytest.fixture
async def small(aiohttp_client: Any) -> Any:
    return await aiohttp_client(small_app())


async def doc_of(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status == status
    assert resp.content_type == PROBLEM
    body = await resp.json(content_type=PROBLEM)
    assert body["status"] == status
    assert {"type", "title", "status"} <= body.keys()
    return body  # type: ignore[no-any-return]


async def test_unexpected_exception_is_generic_500_and_logged(
    small: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="hotpath.errors"):
        resp = await small.get("/boom", headers={"X-Request-ID": "trace-123"})
        doc = await doc_of(resp, 500)
    text = str(doc)
    assert "hunter2" not in text and "RuntimeError" not in text and "Traceback" not in text
    assert doc["request_id"] == "trace-123" == resp.headers["X-Request-ID"]
    logged = [r for r in caplog.records if "trace-123" in r.getMessage()]
    assert logged and logged[0].exc_info is not None


async def test_domain_errors_map_to_their_status(small: Any) -> None:
    assert (await doc_of(await small.get("/conflict"), 409))["detail"] == "already there"
    doc = await doc_of(await small.get("/invalid"), 422)
    assert doc["errors"] == [{"field": "x", "message": "bad"}]
    resp = await small.get("/unavailable")
    await doc_of(resp, 503)
    assert resp.headers["Retry-After"] == "7"


async def test_connection_errors_are_503_not_500(small: Any) -> None:
    resp = await small.get("/down")
    await doc_of(resp, 503)
    assert resp.headers["Retry-After"] == "1"


async def test_asyncpg_internal_client_error_is_503_not_500(small: Any) -> None:
    resp = await small.get("/desync")
    doc = await doc_of(resp, 503)
    assert resp.headers["Retry-After"] == "1"
    assert doc["type"] == "/problems/unavailable" and "state 12" not in str(doc)


def test_as_unavailable_classifies_asyncpg_internal_client_errors() -> None:
    for exc in (
        asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress"),
        asyncpg.exceptions.ProtocolError("unexpected message"),  # a subclass
    ):
        found = as_unavailable(exc)
        assert found is not None and found.status == 503 and found.headers == {"Retry-After": "1"}
        assert "database" in found.detail
    assert as_unavailable(asyncpg.InterfaceError("cannot perform operation: misuse")) is None


def test_as_unavailable_sees_through_a_closed_connection_and_names_statement_timeouts() -> None:
    # what leaving `async with conn.transaction()` raises when its connection just died
    closed = asyncpg.InterfaceError("cannot call Transaction.__aexit__(): the connection is closed")
    closed.__context__ = asyncpg.ConnectionDoesNotExistError("connection was closed mid-operation")
    found = as_unavailable(closed)
    assert found is not None and found.status == 503
    cancelled = as_unavailable(asyncpg.QueryCanceledError("canceling statement due to statement timeout"))
    assert cancelled is not None and cancelled.status == 503 and "statement timeout" in cancelled.detail


async def test_failure_after_prepare_aborts_instead_of_a_second_response(
    small: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="hotpath.errors"):
        resp = await small.get("/stream-fails", headers={"X-Request-ID": "mid-stream-1"})
        assert resp.status == 200  # the headers had gone out
        with pytest.raises(aiohttp.ClientPayloadError):  # a truncated chunked body
            await resp.read()
    logged = [r.getMessage() for r in caplog.records if "mid-stream-1" in r.getMessage()]
    assert len(logged) == 1 and "connection aborted" in logged[0] and "went away" in logged[0]


async def test_http_exceptions_keep_detail_and_routing_errors_are_problems(small: Any) -> None:
    assert (await doc_of(await small.get("/bad"), 400))["detail"] == "custom detail"
    doc = await doc_of(await small.get("/nowhere"), 404)
    assert doc["title"] == "Not Found" and "detail" not in doc
    resp = await small.post("/boom")
    await doc_of(resp, 405)
    assert resp.headers["Allow"] == "GET,HEAD"


async def test_redirects_pass_through(small: Any) -> None:
    resp = await small.get("/redirect", allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"] == "/elsewhere"


async def test_cancelled_error_is_not_swallowed(small: Any) -> None:
    # aiohttp drops the connection of a cancelled handler; a swallowed CancelledError
    # would instead produce a 500 problem document.
    with pytest.raises(Exception) as info:
        await small.get("/cancelled")
    assert "ServerDisconnected" in type(info.value).__name__ or "Disconnect" in str(info.value)


@pytest.mark.parametrize("incoming", ["abc-123", "a" * 128, "req:1/2+3=4@x.y"])
async def test_sane_request_id_is_echoed(small: Any, incoming: str) -> None:
    resp = await small.get("/conflict", headers={"X-Request-ID": incoming})
    assert resp.headers["X-Request-ID"] == incoming


@pytest.mark.parametrize("incoming", ["", "a" * 129, "has space", "semi;colon", "new\\nline", "é"])
async def test_insane_request_id_is_replaced(small: Any, incoming: str) -> None:
    resp = await small.get("/conflict", headers={"X-Request-ID": incoming})
    rid = resp.headers["X-Request-ID"]
    assert rid != incoming and len(rid) == 24 and all(c in "0123456789abcdef" for c in rid)


async def test_redirects_carry_the_request_id(small: Any) -> None:
    resp = await small.get("/redirect", allow_redirects=False, headers={"X-Request-ID": "r-1"})
    assert resp.headers["X-Request-ID"] == "r-1"


async def test_request_ids_differ_and_reach_streaming_responses(small: Any) -> None:
    ids = {(await small.get("/conflict")).headers["X-Request-ID"] for _ in range(5)}
    assert len(ids) == 5
    resp = await small.get("/stream", headers={"X-Request-ID": "stream-1"})
    assert resp.headers["X-Request-ID"] == "stream-1"
    assert await resp.read() == b"chunk"


def test_request_id_pool_stays_unique_across_refills() -> None:
    ids = RequestIds()
    drawn = [ids.pool.pop() if ids.pool else ids.refill() for _ in range(3 * _BATCH + 5)]
    assert len(set(drawn)) == len(drawn) and drawn == sorted(drawn)  # popped lowest first
    assert all(len(rid) == 24 and rid.startswith(ids.prefix) for rid in drawn)
    prefix = ids.prefix
    ids.reseed()  # what a forked worker does: a prefix of its own, the old pool gone
    assert ids.prefix != prefix and ids.pool == []
    assert ids.refill().startswith(ids.prefix)


async def test_whole_app_404_405_are_problems(client: Any) -> None:
    await doc_of(await client.get("/definitely/not/here"), 404)
    # an encoded newline in the path, sent as is (the test client would re-encode it)
    for path in ("/users/%F0%AE%9E%8F%5E%C2%8E%0A", "/%0A", "/x%0Ay"):
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        head = (await reader.read()).split(b"\r\n\r\n", 1)[0].decode().lower()
        writer.close()
        assert head.startswith("http/1.1 404") and "content-type: application/problem+json" in head, head
    await doc_of(await client.delete("/health"), 405)
    assert (await client.get("/health")).headers["X-Request-ID"]
