"""The live feed page in a real browser: Debian's headless Chromium driven by Playwright loads
/feed from a live server on 127.0.0.1, the test publishes, the page shows it. The `browser`
fixture is tests/conftest.py's."""

from __future__ import annotations

import secrets
from typing import Any

import aiohttp
from playwright.async_api import Browser

from server.access import ACCESS
from server.app import create_app
from server.config import Config
from server.feed import FEED
from tests.helpers import replace


async def test_live_page_shows_published_events(aiohttp_server: Any, cfg: Config, browser: Browser) -> None:
    config = replace(cfg, feed={"ticker": True, "ticker_interval": 0.2, "retry": 200})
    server = await aiohttp_server(create_app(config), host="127.0.0.1")
    feed = server.app[FEED]
    page = await browser.new_page()
    await page.goto(f"http://127.0.0.1:{server.port}/feed")
    await page.wait_for_selector('#state[data-state="open"]', timeout=10_000)
    # the ticker arrives by itself
    await page.wait_for_function("document.getElementById('tick-value').textContent !== '–'", timeout=10_000)
    event_id = await feed.publish("users", "user.created", {"id": 42, "name": "Grace Hopper"})
    item = page.locator("#users li", has_text="Grace Hopper")
    await item.wait_for(timeout=10_000)
    assert await item.get_attribute("data-event") == "user.created"
    assert event_id in (await item.text_content() or "")
    await page.wait_for_function(
        f"document.getElementById('last-id').textContent >= {event_id!r}", timeout=10_000
    )

    # the server restarts: the page shows the farewell, reconnects by itself (EventSource sends
    # Last-Event-ID) to the new process on the same port and shows what was published since
    port = server.port
    await server.close()
    await page.locator("#events li", has_text="shutting down").wait_for(timeout=10_000)
    restarted = await aiohttp_server(create_app(config), host="127.0.0.1", port=port)
    missed = await restarted.app[FEED].publish("users", "user.deleted", {"id": 42})
    await page.locator("#users li[data-event='user.deleted']", has_text=missed).wait_for(timeout=10_000)
    await page.wait_for_selector('#state[data-state="open"]', timeout=10_000)
    await page.close()


async def test_live_page_opens_private_channels_with_a_stream_token(
    aiohttp_server: Any, cfg: Config, browser: Browser
) -> None:
    """As shipped (keys required, users private): the page without a token shows the public
    ticker and no user changes; with a stream token in its URL (/feed?token=) it shows them,
    and takes the token out of its address."""
    config = replace(
        cfg,
        auth={"open_routes": ()},
        feed={"ticker": True, "ticker_interval": 0.2, "key_prefix": f"hotpath:test:{secrets.token_hex(6)}:"},
    )
    server = await aiohttp_server(create_app(config), host="127.0.0.1")
    feed, access = server.app[FEED], server.app[ACCESS]
    assert access.store is not None
    record, key = await access.store.create("test", "browser", ["users:read"])
    await access.changed(record.id)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.make_url("/feed/tokens"),
            json={"channels": ["ticker", "users"]},
            headers={"Authorization": f"Bearer {key}"},
        ) as resp,
    ):
        assert resp.status == 201
        token = (await resp.json())["token"]

    anonymous, private = await browser.new_page(), await browser.new_page()
    await anonymous.goto(f"http://127.0.0.1:{server.port}/feed")
    await private.goto(f"http://127.0.0.1:{server.port}/feed?token={token}")
    for page in (anonymous, private):
        await page.wait_for_selector('#state[data-state="open"]', timeout=10_000)
        await page.wait_for_function(
            "document.getElementById('tick-value').textContent !== '–'", timeout=10_000
        )
    assert private.url == f"http://127.0.0.1:{server.port}/feed"

    event_id = await feed.publish("users", "user.created", {"id": 7, "name": "Sam Secret"})
    await private.locator("#users li", has_text="Sam Secret").wait_for(timeout=10_000)
    # the anonymous page has seen ticks published after the user event, and not the event
    await anonymous.wait_for_function(
        f"document.getElementById('last-id').textContent > {event_id!r}", timeout=10_000
    )
    assert await anonymous.locator("#users li").count() == 0
    await anonymous.close()
    await private.close()
