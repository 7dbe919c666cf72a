"""CORS in a real browser (headless Chromium, tests/conftest.py's `browser`): a page served by a
second aiohttp server on another loopback port, another origin, reads hotpath's API with
fetch (a public read; a POST with a key, which needs a preflight; the same POST without one,
whose 401 the page can read) and opens an EventSource on the feed, on a public channel and on a
private one with a stream token; a page from an origin that
is not allowed is refused. hotpath runs with the shipped access rules (nothing open but the
public reads), not the suite's open routes."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from playwright.async_api import Browser

from server.access import ACCESS
from server.access.scopes import USERS_READ, USERS_WRITE
from server.app import create_app
from server.config import Config
from server.runtime.metrics import METRICS
from server.storage.pool import DB
from tests.helpers import replace, until

PAGE = "<!doctype html><html><head><title>a page elsewhere</title></head><body>elsewhere</body></html>"

# Run inside the page: what a page's script sees of the API (fetch rejects when CORS refuses).
READ = """async (api) => {
  const r = await fetch(api + "/products", {headers: {"Accept": "application/json"}});
  const body = await r.json();
  return {status: r.status, items: body.items.length, rid: r.headers.get("X-Request-ID")};
}"""
CREATE = """async ([api, key]) => {
  const headers = {"Content-Type": "application/json"};
  if (key) headers["Authorization"] = "Bearer " + key;
  const r = await fetch(api + "/users", {
    method: "POST",
    headers,
    body: JSON.stringify({name: "Grace Hopper", email: "grace@example.com"}),
  });
  return {status: r.status, location: r.headers.get("Location"), body: await r.json()};
}"""
SUBSCRIBE = """(api) => new Promise((resolve) => {
  const source = new EventSource(api + "/events?channels=ticker");
  source.onmessage = (event) => { source.close(); resolve({data: event.data, id: event.lastEventId}); };
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) resolve({closed: true});
  };
})"""
# A private channel: the page asks POST /feed/tokens (with its key) for a stream token, and opens
# an EventSource with it (an EventSource sends no Authorization header), until `want` arrives.
PRIVATE = """async ([api, key, want]) => {
  const r = await fetch(api + "/feed/tokens", {
    method: "POST",
    headers: {"Content-Type": "application/json", "Authorization": "Bearer " + key},
    body: JSON.stringify({channels: ["users"], ttl: 60}),
  });
  if (r.status !== 201) return {status: r.status};
  const {token} = await r.json();
  return await new Promise((resolve) => {
    const source = new EventSource(api + "/events?channels=users&token=" + encodeURIComponent(token));
    source.onopen = () => { window.privateOpen = true; };
    source.addEventListener("user.created", (event) => {
      const data = JSON.parse(event.data);
      if (data.email === want) { source.close(); resolve({status: 201, email: data.email}); }
    });
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) resolve({closed: true});
    };
  });
}"""
# The same requests from a page whose origin is not allowed: what each one gives the page.
REFUSED = """async ([api, key]) => {
  const outcome = async (request) => {
    try { await request(); return "read"; } catch (error) { return error.name; }
  };
  return {
    read: await outcome(() => fetch(api + "/products", {headers: {"Accept": "application/json"}})),
    create: await outcome(() => fetch(api + "/users", {
      method: "POST",
      headers: {"Content-Type": "application/json", "Authorization": "Bearer " + key},
      body: JSON.stringify({name: "Mallory", email: "mallory@example.com"}),
    })),
  };
}"""


async def page_server(aiohttp_server: Any) -> Any:
    async def index(request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", index)
    return await aiohttp_server(app, host="127.0.0.1")


async def test_a_page_on_another_origin_uses_the_api(
    aiohttp_server: Any, cfg: Config, browser: Browser
) -> None:
    allowed = await page_server(aiohttp_server)
    other = await page_server(aiohttp_server)
    allowed_origin = f"http://127.0.0.1:{allowed.port}"
    config = replace(
        cfg,
        cors={"allow_origins": (allowed_origin,)},
        feed={"ticker": True, "ticker_interval": 0.2, "retry": 200},
        auth={"open_routes": ()},  # the shipped rules: writes need a key, public reads are open
    )
    api_server = await aiohttp_server(create_app(config), host="127.0.0.1")
    api = f"http://127.0.0.1:{api_server.port}"
    access = api_server.app[ACCESS]
    record, key = await access.store.create("test", "page", [USERS_WRITE, USERS_READ])
    await access.changed(record.id)
    seen = api_server.app[METRICS].pending  # (route, method, status) of every answer so far
    page = await browser.new_page()
    try:
        await page.goto(f"{allowed_origin}/")
        read = await page.evaluate(READ, api)
        assert read["status"] == 200 and read["items"] > 0
        assert read["rid"]  # an exposed header the page may read
        # JSON and Authorization: preflighted (the preflight carries no key, and passes)
        created = await page.evaluate(CREATE, [api, key])
        assert created["status"] == 201 and created["body"]["email"] == "grace@example.com"
        assert created["location"].endswith(f"/users/{created['body']['id']}")
        assert ("unmatched", "OPTIONS", 204) in seen  # its preflight, answered by the catch-all
        anonymous = await page.evaluate(CREATE, [api, None])  # the page reads why it was refused
        assert anonymous["status"] == 401 and anonymous["body"]["status"] == 401
        event = await page.evaluate(SUBSCRIBE, api)
        assert "closed" not in event and event["id"] and event["data"]
        # the users channel is private: the page's key (users:read) gets it a stream token
        private = asyncio.ensure_future(page.evaluate(PRIVATE, [api, key, "ada@example.com"]))
        await until(lambda: private.done() or page.evaluate("window.privateOpen === true"), "the stream")
        assert not private.done(), private.result()
        made = await page.evaluate(
            CREATE.replace("Grace Hopper", "Ada").replace("grace@", "ada@"), [api, key]
        )
        assert made["status"] == 201
        assert await asyncio.wait_for(private, 10) == {"status": 201, "email": "ada@example.com"}

        await page.goto(f"http://127.0.0.1:{other.port}/")  # an origin that is not allowed
        assert await page.evaluate(REFUSED, [api, key]) == {"read": "TypeError", "create": "TypeError"}
        assert ("unmatched", "OPTIONS", 403) in seen  # the POST's preflight was refused
        assert await page.evaluate(SUBSCRIBE, api) == {"closed": True}
    finally:
        await page.close()
    emails = [row["email"] for row in await api_server.app[DB].fetch("SELECT email FROM users")]
    assert emails == [
        "grace@example.com",
        "ada@example.com",
    ]  # neither the anonymous POST nor the refused page's ran
