"""Negotiated resources through the real app: users, profiles, products and problems."""

from __future__ import annotations

import csv
import io
import xml.etree.ElementTree as ET
from typing import Any

import asyncpg
import msgpack
import orjson
import pytest
import yaml
from multidict import CIMultiDict

from server.products import CATALOGUE
from tests.helpers import until

DECODERS = {
    "application/json": orjson.loads,
    "application/vnd.msgpack": lambda b: msgpack.unpackb(b, timestamp=3),
    "application/yaml": yaml.safe_load,
}


async def make_user(client: Any, name: str = "Ann", email: str = "ann@example.com") -> dict[str, Any]:
    resp = await client.post("/users", json={"name": name, "email": email})
    assert resp.status == 201
    return await resp.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize("accept", list(DECODERS))
async def test_user_in_structured_formats_decodes_to_the_same_data(client: Any, accept: str) -> None:
    user = await make_user(client)
    resp = await client.get(f"/users/{user['id']}", headers={"Accept": accept})
    assert resp.status == 200
    assert resp.content_type == accept
    assert "Accept" in [v.strip() for v in resp.headers["Vary"].split(",")]
    got = DECODERS[accept](await resp.read())
    assert got["id"] == user["id"] and got["name"] == user["name"] and got["email"] == user["email"]
    created = got["created_at"]
    assert (created if isinstance(created, str) else created.isoformat()) == user["created_at"]


async def test_no_accept_and_wildcard_mean_json(client: Any) -> None:
    user = await make_user(client)
    for headers in ({}, {"Accept": "*/*"}):
        resp = await client.get(f"/users/{user['id']}", headers=headers, skip_auto_headers=["Accept"])
        assert resp.content_type == "application/json"
        assert await resp.json() == user


async def test_user_list_as_xml_csv_text(client: Any) -> None:
    for i in range(3):
        await make_user(client, f"U{i}", f"u{i}@example.com")
    xml = await client.get("/users", headers={"Accept": "application/xml"})
    assert xml.content_type == "application/xml"
    root = ET.fromstring(await xml.read())
    assert [e.findtext("email") for e in root.findall("items/item")] == [
        f"u{i}@example.com" for i in range(3)
    ]
    body = await (await client.get("/users?format=csv")).text()
    rows = list(csv.DictReader(io.StringIO(body, newline="")))
    assert [r["name"] for r in rows] == ["U0", "U1", "U2"]
    assert set(rows[0]) == {"id", "name", "email", "created_at", "updated_at"}
    text = await client.get("/users", headers={"Accept": "text/plain"})
    assert text.content_type == "text/plain"
    assert "email: u1@example.com" in await text.text()


async def test_pages_keep_the_format_in_next_links(client: Any) -> None:
    for i in range(3):
        await make_user(client, f"U{i}", f"u{i}@example.com")
    page = yaml.safe_load(await (await client.get("/users?limit=2&format=yaml")).read())
    assert "format=yaml" in page["next"]
    rest = yaml.safe_load(await (await client.get(page["next"])).read())
    assert [u["name"] for u in rest["items"]] == ["U2"]


async def test_profile_negotiated(client: Any) -> None:
    user = await make_user(client)
    resp = await client.get(f"/users/{user['id']}/profile", headers={"Accept": "application/yaml"})
    profile = yaml.safe_load(await resp.read())
    assert profile["email_domain"] == "example.com" and profile["account_age_days"] == 0


async def test_html_page_for_a_browser(client: Any) -> None:
    user = await make_user(client, "<script>alert(1)</script>", "x@example.com")
    browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    one = await client.get(f"/users/{user['id']}", headers={"Accept": browser})
    assert one.content_type == "text/html"
    page = await one.text()
    assert page.startswith("<!doctype html>") and "<dl>" in page
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    many = await (await client.get("/users", headers={"Accept": browser})).text()
    assert "<table>" in many and "x@example.com" in many


async def test_pretty_json(client: Any) -> None:
    user = await make_user(client)
    body = await (await client.get(f"/users/{user['id']}?pretty=1")).read()
    assert body.startswith(b"{\n  ") and orjson.loads(body) == user


async def test_nothing_acceptable_is_406_listing_types(client: Any) -> None:
    user = await make_user(client)
    resp = await client.get(f"/users/{user['id']}", headers={"Accept": "image/png"})
    assert resp.status == 406
    assert resp.content_type == "application/problem+json"
    doc = await resp.json(content_type=None)
    assert "application/json" in doc["available"] and "text/csv" in doc["available"]


async def test_unknown_format_is_400(client: Any) -> None:
    resp = await client.get("/users?format=pdf")
    assert resp.status == 400
    assert "pdf" in (await resp.json(content_type=None))["detail"]


async def test_406_happens_before_a_write(client: Any) -> None:
    resp = await client.post(
        "/users", json={"name": "A", "email": "never@example.com"}, headers={"Accept": "image/png"}
    )
    assert resp.status == 406
    listing = await (await client.get("/users")).json()
    assert listing["items"] == []


@pytest.mark.parametrize(
    ("content_type", "encode"),
    [
        ("application/vnd.msgpack", msgpack.packb),
        ("application/x-msgpack", msgpack.packb),
        ("application/yaml", lambda d: yaml.safe_dump(d).encode()),
        ("application/json", orjson.dumps),
    ],
)
async def test_request_bodies_in_each_format_same_validation(
    client: Any, content_type: str, encode: Any
) -> None:
    ok = await client.post(
        "/users",
        data=encode({"name": "Body", "email": "body@example.com"}),
        headers={"Content-Type": content_type},
    )
    assert ok.status == 201
    bad = await client.post(
        "/users", data=encode({"name": "", "email": "nope", "x": 1}), headers={"Content-Type": content_type}
    )
    assert bad.status == 422
    doc = await bad.json(content_type=None)
    assert {e["field"] for e in doc["errors"]} == {"name", "email", "x"}


async def test_malformed_bodies_are_400_naming_the_format(client: Any) -> None:
    for ctype, body, word in (
        ("application/vnd.msgpack", b"\xc1", "msgpack"),
        ("application/yaml", b"a: [", "YAML"),
        ("application/yaml", b"a: &x [1]\nb: *x", "aliases"),
    ):
        resp = await client.post("/users", data=body, headers={"Content-Type": ctype})
        assert resp.status == 400
        assert word in (await resp.json(content_type=None))["detail"]


async def test_unsupported_body_is_415_with_accept_post(client: Any) -> None:
    resp = await client.post("/users", data=b"<user/>", headers={"Content-Type": "application/xml"})
    assert resp.status == 415
    assert "application/vnd.msgpack" in resp.headers["Accept-Post"]
    user = await make_user(client)
    resp = await client.patch(f"/users/{user['id']}", data=b"a,b", headers={"Content-Type": "text/csv"})
    assert resp.status == 415
    assert "application/yaml" in resp.headers["Accept-Patch"]


async def test_problem_in_xml_or_yaml_for_clients_that_accept_only_that(client: Any) -> None:
    xml = await client.get("/users/999", headers={"Accept": "application/xml"})
    assert xml.status == 404
    assert xml.content_type == "application/problem+xml"
    root = ET.fromstring(await xml.read())
    assert root.tag == "{urn:ietf:rfc:7807}problem"
    assert root.findtext("{urn:ietf:rfc:7807}status") == "404"
    yml = await client.get("/users/999", headers={"Accept": "application/yaml"})
    assert yml.content_type == "application/yaml"
    assert yaml.safe_load(await yml.read())["status"] == 404
    both = await client.get("/users/999", headers={"Accept": "application/xml;q=0.5, application/json"})
    assert both.content_type == "application/problem+json"
    browser = await client.get("/users/999", headers={"Accept": "text/html"})
    assert browser.content_type == "application/problem+json"  # no HTML problem: JSON it is


async def test_products_catalogue_shape_and_pages(client: Any) -> None:
    resp = await client.get("/products")
    assert resp.status == 200
    assert "Accept" in [v.strip() for v in resp.headers["Vary"].split(",")]
    body = await resp.json()
    assert body["page"] == 1 and body["total"] == len(body["items"]) >= 8
    assert body["next"] is None
    first = body["items"][0]
    assert {"id", "name", "price", "category"} <= set(first)
    assert isinstance(first["price"], float)
    page2 = await (await client.get("/products?limit=3&page=2")).json()
    assert [p["id"] for p in page2["items"]] == [p["id"] for p in body["items"][3:6]]
    assert page2["next"] == "/products?page=3&limit=3"
    beyond = await (await client.get("/products?page=99")).json()
    assert beyond["items"] == [] and beyond["total"] == body["total"]
    assert (await client.get("/products?page=0")).status == 422


@pytest.mark.parametrize("accept", [*DECODERS, "application/xml", "text/csv", "text/plain", "text/html"])
async def test_products_in_every_format(client: Any, accept: str) -> None:
    resp = await client.get("/products?limit=3", headers={"Accept": accept})
    assert resp.status == 200 and resp.content_type == accept
    body = await resp.read()
    if accept in DECODERS:
        assert len(DECODERS[accept](body)["items"]) == 3
    elif accept == "application/xml":
        assert len(ET.fromstring(body).findall("items/item")) == 3
    elif accept == "text/csv":
        assert len(list(csv.DictReader(io.StringIO(body.decode(), newline="")))) == 3
    else:
        assert b"Mechanical keyboard" in body
    again = await client.get("/products?limit=3", headers={"Accept": accept})
    assert await again.read() == body  # served from the rendered-page cache, same bytes


async def wait_for_products(client: Any, check: Any, accept: str = "application/json") -> None:
    """Poll the catalogue (decoded from `accept`) until `check(items)` holds."""

    async def holds() -> bool:
        resp = await client.get("/products?limit=200", headers={"Accept": accept})
        return bool(check(DECODERS[accept](await resp.read())["items"]))

    await until(holds)


async def test_products_refresh_on_change_through_notify(client: Any, cfg: Any) -> None:
    conn = await asyncpg.connect(cfg.database.url)
    new_id = None
    try:
        new_id = await conn.fetchval(
            "INSERT INTO products (name, price, category) VALUES ('Test gadget', 9.99, 'test') RETURNING id"
        )
        await wait_for_products(
            client, lambda items: any(p["id"] == new_id and p["price"] == 9.99 for p in items)
        )
        await conn.execute("UPDATE products SET price = 19.99 WHERE id = $1", new_id)
        await wait_for_products(
            client,
            lambda items: any(p["id"] == new_id and p["price"] == 19.99 for p in items),
            "application/yaml",
        )
    finally:
        if new_id is not None:
            await conn.execute("DELETE FROM products WHERE id = $1", new_id)
        await conn.close()
    await wait_for_products(client, lambda items: all(p["id"] != new_id for p in items))


async def test_bare_products_answers_kept_per_headers_dropped_on_change(client: Any, cfg: Any) -> None:
    """A bare GET /products is answered from the answers kept for its Accept/Accept-Encoding
    pair; a change to the table drops them, and an answer built from the old version while a
    reload ran is not kept."""
    kinds = {"application/json": None, "application/vnd.msgpack": None}
    for accept in kinds:
        first = await client.get("/products", headers={"Accept": accept, "Accept-Encoding": "identity"})
        again = await client.get("/products", headers={"Accept": accept, "Accept-Encoding": "identity"})
        assert again.content_type == accept and await again.read() == await first.read()
        assert again.headers["ETag"] == first.headers["ETag"]
        assert again.headers["X-Request-ID"] != first.headers["X-Request-ID"]
        kinds[accept] = first.headers["ETag"]
    assert kinds["application/json"] != kinds["application/vnd.msgpack"]
    catalogue = client.server.app[CATALOGUE]

    async def kept_after_a_request() -> bool:
        # (the catalogue reloads once more when its LISTEN starts, which drops kept answers)
        await client.get("/products", headers={"Accept": "application/json", "Accept-Encoding": "identity"})
        return ("application/json", "identity") in catalogue.answers

    await until(kept_after_a_request, "an answer kept after a bare GET /products")

    async def bare_shows(check: Any) -> bool:
        resp = await client.get("/products", headers={"Accept": "application/json"})
        return bool(check(orjson.loads(await resp.read())["items"]))

    conn = await asyncpg.connect(cfg.database.url)
    new_id = None
    try:
        new_id = await conn.fetchval(
            "INSERT INTO products (name, price, category) VALUES ('Kept gadget', 5.5, 'test') RETURNING id"
        )
        await until(lambda: bare_shows(lambda items: any(p["id"] == new_id for p in items)))
    finally:
        if new_id is not None:
            await conn.execute("DELETE FROM products WHERE id = $1", new_id)
        await conn.close()
    await until(lambda: bare_shows(lambda items: all(p["id"] != new_id for p in items)))
    stale = catalogue.version - 1
    catalogue.keep_answer(stale, "text/stale", None, (b"old", CIMultiDict()))
    assert ("text/stale", None) not in catalogue.answers


async def test_catalogue_recovers_after_losing_its_listen_connection(client: Any, cfg: Any) -> None:
    conn = await asyncpg.connect(cfg.database.url)
    new_id = None
    try:
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() AND query LIKE 'LISTEN%'"
        )
        assert killed >= 1
        new_id = await conn.fetchval(
            "INSERT INTO products (name, price, category) VALUES ('Reconnected', 1.00, 'test') RETURNING id"
        )
        await wait_for_products(client, lambda items: any(p["id"] == new_id for p in items))
    finally:
        if new_id is not None:
            await conn.execute("DELETE FROM products WHERE id = $1", new_id)
        await conn.close()
