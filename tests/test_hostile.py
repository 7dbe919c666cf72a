"""Hostile input that once reached a 500 or an alias: each answered as a 4xx problem now."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from server.app import create_app
from server.config import Config
from tests.helpers import replace

PROBLEM = "application/problem+json"


async def problem(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == PROBLEM
    doc: dict[str, Any] = await resp.json(content_type=PROBLEM)
    assert doc["status"] == status and "Traceback" not in str(doc)
    return doc


@pytest.mark.parametrize(
    "email",
    [
        "a\x00b@example.com",
        "a\x01@example.com",
        "ann@exa\x7fmple.com",
        "ann@exam\x85ple.com",
        "\ud800@example.com",
    ],
)
async def test_control_characters_and_surrogates_in_an_email_are_422(client: Any, email: str) -> None:
    refused = 0
    for body in (
        b'{"name": "Ann", "email": "' + email.encode("unicode_escape").replace(b"\\x", b"\\u00") + b'"}',
        # YAML's escapes reach a lone surrogate that JSON cannot
        ('{name: Ann, email: "' + email.encode("unicode_escape").decode() + '"}').encode(),
    ):
        for media in ("application/json", "application/yaml"):
            resp = await client.post("/users", data=body, headers={"Content-Type": media})
            if resp.status == 400:  # not valid in that format at all (JSON and YAML refuse
                await problem(resp, 400)  # lone surrogates as they parse): fine, still no 500
                continue
            doc = await problem(resp, 422)
            assert [e["field"] for e in doc["errors"]] == ["email"]
            refused += 1
    assert refused >= 1 or "\ud800" in email
    assert (await (await client.get("/users")).json())["items"] == []


@pytest.mark.parametrize("name", ["A\x00nn", "Ann\x9b", "\udfffAnn"])
async def test_control_characters_in_a_name_are_422(client: Any, name: str) -> None:
    escaped = name.encode("unicode_escape").decode()
    resp = await client.post(
        "/users",
        data=f'{{name: "{escaped}", email: a@example.com}}'.encode(),
        headers={"Content-Type": "application/yaml"},
    )
    if "\udfff" in name:  # the YAML parser refuses the escape itself now
        await problem(resp, 400)
        return
    doc = await problem(resp, 422)
    assert [e["field"] for e in doc["errors"]] == ["name"]


async def test_notification_fields_that_cannot_be_stored_are_422(client: Any) -> None:
    for query in (
        "recipient=a%00b@example.com&subject=x&content=y",
        "recipient=a@example.com&subject=x&content=%00",
        "recipient=a@example.com&subject=a%0Db&content=y",
    ):
        await problem(await client.post(f"/send-notification?{query}"), 422)
    # a surrogate's UTF-8 form in a query is decoded as U+FFFD (taken), in YAML refused (400)
    resp = await client.post("/send-notification?recipient=a@example.com&subject=x&content=%ED%A0%80")
    assert resp.status == 202
    task = await (await client.get((await resp.json())["status_url"])).json()
    assert task["status"] in ("queued", "processing", "completed")
    resp = await client.post(
        "/send-notification",
        data=b'{recipient: a@example.com, subject: s, content: "\\uD800"}',
        headers={"Content-Type": "application/yaml"},
    )
    await problem(resp, 400)


@pytest.mark.parametrize(
    "path",
    [
        "/users/0001",  # another spelling of user 1
        "/users/%D9%A1",  # ARABIC-INDIC DIGIT ONE
        "/users/%EF%BC%91",  # FULLWIDTH DIGIT ONE
        "/users/01/profile",
        pytest.param("/users/1" + "0" * 5000, id="5001-digits"),  # beyond int()'s 4,300-digit limit
        "/users/" + "9" * 20,
        "/task-status/007",
        "/expensive-calculation/010",
        "/stream-json/02",
        "/reports/%D9%A1",
    ],
)
async def test_ids_are_canonical_ascii_numbers(client: Any, path: str) -> None:
    created = await client.post("/users", json={"name": "Ann", "email": "ann@example.com"})
    assert created.status == 201 and (await created.json())["id"] == 1
    await problem(await client.get(path), 404)
    assert (await client.get("/users/1")).status == 200


async def _raw(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await reader.read()
    finally:
        writer.close()


async def test_a_bearer_token_that_is_not_utf8_is_refused_not_a_500(cfg: Config) -> None:
    cfg = replace(cfg, feed={"admin_token": "s3cret"}, metrics={"token": "m3trics"})
    server = TestServer(create_app(cfg))
    await server.start_server()
    try:
        body = b'{"channel": "users", "event": "x", "data": {}}'
        for path, body_part in (("/events", body), ("/metrics", b"")):
            method = b"POST" if body_part else b"GET"
            for token in (b"\xff\xfe\xfd", b"s3cret\xc3", b"m3trics\x80"):
                answer = await _raw(
                    server.port,
                    method + b" " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                    b"Content-Type: application/json\r\nAuthorization: Bearer " + token + b"\r\n"
                    b"Content-Length: " + str(len(body_part)).encode() + b"\r\n\r\n" + body_part,
                )
                status = int(answer.split(b" ", 2)[1])
                assert status in (401, 403), answer[:300]
                assert b"application/problem+json" in answer.split(b"\r\n\r\n", 1)[0]
    finally:
        await server.close()


@pytest.mark.parametrize(
    "subject",
    ["=?utf-8?q?a=0D=0ABcc:_evil@example.com?=", "a\x85Bcc: x@example.com", "a\u2028b", "a\x9bb"],
)
async def test_a_subject_cannot_smuggle_mail_headers(client: Any, subject: str) -> None:
    """Defect: the email package decodes an RFC 2047 encoded word when it reads a header, so
    that subject became 'a' CR LF 'Bcc: evil@...': a header, and a recipient, of the client's."""
    body = {"recipient": "victim@example.com", "subject": subject, "content": "x"}
    doc = await problem(await client.post("/send-notification", json=body), 422)
    assert [e["field"] for e in doc["errors"]] == ["subject"]
    body = {"recipient": "=?utf-8?q?a=0D=0A?=@example.com", "subject": "s", "content": "x"}
    await problem(await client.post("/send-notification", json=body), 422)


def test_a_queued_message_that_would_break_a_header_is_never_sent(cfg: Config) -> None:
    from server.jobs.kinds import build_message
    from server.jobs.runner import PermanentError

    payload = {
        "recipient": "v@example.com",
        "subject": "=?utf-8?q?a=0D=0ABcc:_e@example.com?=",
        "content": "x",
    }
    with pytest.raises(PermanentError):
        build_message(cfg.smtp, payload, "<1@hotpath>")
    ok = build_message(cfg.smtp, {**payload, "subject": "Grüße =? nothing"}, "<2@hotpath>")
    assert "Bcc" not in ok and str(ok["Subject"]) == "Grüße =? nothing"
