"""Background jobs end to end: every kind, retries, leases after kill -9, cancellation,
idempotency, two workers, restart, graceful hand-back and cleanup; real PostgreSQL and SMTP."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import mailbox
import os
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import trustme
import yaml
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from server.app import create_app
from server.config import Config
from server.http.representation import OFF_LOOP_ROWS
from server.jobs import JOBS
from server.jobs.kinds import BULK_ERRORS_KEPT, KINDS
from server.jobs.queue import EVERY, FINAL, Engine, Job
from server.jobs.runner import JobContext, PermanentError, Runner
from server.storage.db import Database
from tests.helpers import PYTHON, ROOT, free_port, replace, until

FAST = {"lease": 2.0, "heartbeat_interval": 0.3, "poll_interval": 0.2, "shutdown_timeout": 2.0}


async def wait_task(client: Any, task_id: int, states: frozenset[str] = FINAL, timeout: float = 20.0) -> Any:
    async def check() -> Any:
        resp = await client.get(f"/task-status/{task_id}")
        assert resp.status == 200
        data = await resp.json()
        return data if data["status"] in states else None

    return await until(check, f"task {task_id} in {sorted(states)}", timeout)


async def truncate_jobs(cfg: Config) -> None:
    conn = await asyncpg.connect(cfg.database.url)
    try:
        if await conn.fetchval("SELECT to_regclass('jobs') IS NOT NULL"):
            await conn.execute("TRUNCATE jobs, reports RESTART IDENTITY")
    finally:
        await conn.close()


@pytest.fixture
async def jobs_clean(cfg: Config) -> AsyncIterator[None]:
    """No jobs before the test, and none left after it for the apps of later tests to run."""
    await truncate_jobs(cfg)
    yield
    await truncate_jobs(cfg)


@pytest.fixture
def jcfg(cfg: Config, jobs_clean: None, tmp_path: Path) -> Config:
    """Short leases and polls; the Maildir outbox under this test's tmp dir."""
    return replace(cfg, jobs=FAST, embedded={"data_dir": str(tmp_path)})


@pytest.fixture
async def pg(cfg: Config) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(cfg.database.url, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


# ---------------------------------------------------------------- a real SMTP server


class Recorder:
    """aiosmtpd handler that keeps every accepted message; optionally never answers the first DATA."""

    def __init__(self, stall_first: bool = False) -> None:
        self.messages: list[Any] = []
        self.stall_first = stall_first
        self.data_calls = 0
        self.first_data = threading.Event()
        self.logins: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.data_calls += 1
        if self.stall_first and self.data_calls == 1:
            self.first_data.set()
            await asyncio.get_running_loop().create_future()  # never acknowledged
        self.messages.append(envelope)
        return "250 Message accepted for delivery"


def parsed(envelope: Any) -> Any:
    import email

    return email.message_from_bytes(envelope.content)


@pytest.fixture
def smtp_plain() -> Iterator[tuple[Recorder, int]]:
    handler = Recorder()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


@pytest.fixture
def tls_ca(tmp_path: Path) -> tuple[trustme.CA, Path]:
    ca = trustme.CA()
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return ca, path


# ---------------------------------------------------------------- send_notification


async def test_notification_into_maildir_from_query_parameters(aiohttp_client: Any, jcfg: Config) -> None:
    client = await aiohttp_client(create_app(jcfg))
    resp = await client.post(
        "/send-notification", params={"recipient": "ada@example.com", "subject": "Hi", "content": "Hello Ada"}
    )
    assert resp.status == 202
    body = await resp.json()
    assert body["status_url"] == f"/task-status/{body['task_id']}"
    assert resp.headers["Location"] == body["status_url"]
    assert resp.headers["Retry-After"] == "1"
    assert {"message", "task_id", "estimated_time"} <= body.keys()
    # an old client's empty JSON body beside the query parameters
    resp = await client.post(
        "/send-notification",
        params={"recipient": "ada@example.com", "subject": "Hi", "content": "again"},
        data=b"",
        headers={"Content-Type": "application/json"},
    )
    assert resp.status == 202
    await wait_task(client, (await resp.json())["task_id"])
    done = await wait_task(client, body["task_id"])
    assert done["status"] == "completed", done
    assert done["result"]["transport"] == "maildir"
    box = mailbox.Maildir(Path(jcfg.embedded.data_dir) / "outbox", create=False)
    messages = [m for m in box if m["Message-ID"] == done["result"]["message_id"]]
    assert len(box) == 2 and len(messages) == 1
    msg = messages[0]
    assert msg["To"] == "ada@example.com"
    assert msg["Subject"] == "Hi"
    assert msg["Message-ID"] == done["result"]["message_id"]
    assert msg.get_payload().strip() == "Hello Ada"


async def test_maildir_delivery_is_idempotent(tmp_path: Path) -> None:
    from email.message import EmailMessage

    from server.jobs.kinds import deliver_maildir

    msg = EmailMessage()
    msg["Subject"] = "once"
    msg.set_content("x")
    assert deliver_maildir(tmp_path / "box", msg, "job1") is True
    assert deliver_maildir(tmp_path / "box", msg, "job1") is False  # the retry of the same job
    assert len(list(mailbox.Maildir(tmp_path / "box", create=False))) == 1
    # a data dir that does not exist yet (no embedded server ever made it): made, not a failure
    assert deliver_maildir(tmp_path / "var" / "outbox", msg, "job2") is True
    assert len(list(mailbox.Maildir(tmp_path / "var" / "outbox", create=False))) == 1


async def test_notification_through_smtp_without_tls(
    aiohttp_client: Any, jcfg: Config, smtp_plain: tuple[Recorder, int]
) -> None:
    handler, port = smtp_plain
    cfg = replace(
        jcfg, smtp={"host": "127.0.0.1", "port": port, "starttls": False, "sender": "app@example.org"}
    )
    client = await aiohttp_client(create_app(cfg))
    resp = await client.post(
        "/send-notification",
        json={"recipient": "bob@example.com", "subject": "Report", "content": "Body text"},
    )
    assert resp.status == 202
    done = await wait_task(client, (await resp.json())["task_id"])
    assert done["status"] == "completed", done
    assert len(handler.messages) == 1
    envelope = handler.messages[0]
    assert envelope.rcpt_tos == ["bob@example.com"]
    assert envelope.mail_from == "app@example.org"
    msg = parsed(envelope)
    assert msg["Subject"] == "Report"
    assert msg["Message-ID"] == done["result"]["message_id"]
    assert msg.get_payload().strip() == "Body text"


async def test_notification_through_smtp_with_starttls_and_auth(
    aiohttp_client: Any, jcfg: Config, tls_ca: tuple[trustme.CA, Path]
) -> None:
    ca, ca_path = tls_ca
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    handler = Recorder()

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        handler.logins.append(data.login)
        return AuthResult(success=data.login == b"mailer" and data.password == b"s3cret")

    port = free_port()
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=port,
        tls_context=server_ctx,
        require_starttls=True,
        authenticator=authenticator,
        auth_required=True,
        auth_require_tls=True,
    )
    controller.start()
    try:
        smtp = {
            "host": "127.0.0.1",
            "port": port,
            "starttls": True,
            "username": "mailer",
            "password": "s3cret",
            "ca_file": str(ca_path),
        }
        client = await aiohttp_client(create_app(replace(jcfg, smtp=smtp)))
        resp = await client.post(
            "/send-notification", data={"recipient": "eve@example.com", "subject": "TLS", "content": "secure"}
        )  # a form body
        assert resp.status == 202
        done = await wait_task(client, (await resp.json())["task_id"])
        assert done["status"] == "completed", done
        assert handler.logins == [b"mailer"]
        assert [m.rcpt_tos for m in handler.messages] == [["eve@example.com"]]
        assert parsed(handler.messages[0])["Subject"] == "TLS"
    finally:
        controller.stop()


async def test_smtp_certificate_not_trusted_fails_the_attempt(
    aiohttp_client: Any, jcfg: Config, tls_ca: tuple[trustme.CA, Path]
) -> None:
    ca, _ca_path = tls_ca
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    handler = Recorder()
    port = free_port()
    controller = Controller(
        handler, hostname="127.0.0.1", port=port, tls_context=server_ctx, require_starttls=True
    )
    controller.start()
    try:
        jobs = {**FAST, "max_attempts": {"default": "1"}}
        cfg = replace(jcfg, jobs=jobs, smtp={"host": "127.0.0.1", "port": port, "starttls": True})
        client = await aiohttp_client(create_app(cfg))
        resp = await client.post("/send-notification", json={"recipient": "x@example.com", "subject": "s"})
        done = await wait_task(client, (await resp.json())["task_id"])
        assert done["status"] == "failed"
        assert "CERTIFICATE" in done["error"].upper()
        assert handler.messages == []
    finally:
        controller.stop()


@pytest.mark.parametrize(
    "body",
    [
        b"--xx\r\nFalse--xx--\r\n",  # a part without headers
        b'--xx\r\nContent-Disposition: form-data; name="a"\r\n\r\nv',  # truncated
        b'--xx\r\nContent-Disposition: form-data; name="a"\r\n\r\n\xff\xfe\r\n--xx--\r\n',  # not UTF-8
        # a charset other than UTF-8, known or not: 415 (send the form in UTF-8)
        b'--xx\r\nContent-Disposition: form-data; name="a"\r\nContent-Type: text/plain; charset=bogus'
        b"\r\n\r\nv\r\n--xx--\r\n",
    ],
)
async def test_malformed_forms_are_400(aiohttp_client: Any, jcfg: Config, body: bytes) -> None:
    client = await aiohttp_client(create_app(replace(jcfg, jobs={"concurrency": 0})))
    for path in ("/send-notification", "/generate-report"):
        resp = await client.post(
            path, data=body, headers={"Content-Type": "multipart/form-data; boundary=xx"}
        )
        assert resp.status == (415 if b"charset=bogus" in body else 400), path
        assert resp.content_type == "application/problem+json"


@pytest.mark.parametrize(
    "params",
    [
        {"recipient": "not-an-address", "subject": "s", "content": "c"},
        {"subject": "s", "content": "c"},
        {"recipient": "a@example.com", "subject": "line\r\nBcc: victim@example.com", "content": "c"},
    ],
)
async def test_notification_validation(aiohttp_client: Any, jcfg: Config, params: dict[str, str]) -> None:
    client = await aiohttp_client(create_app(replace(jcfg, jobs={"concurrency": 0})))
    resp = await client.post("/send-notification", params=params)
    assert resp.status == 422
    assert resp.content_type == "application/problem+json"
    assert (await resp.json())["errors"]


# ---------------------------------------------------------------- generate_report


async def test_signups_report_matches_the_data(aiohttp_client: Any, jcfg: Config, pg: asyncpg.Pool) -> None:
    days = {dt.date(2026, 3, 1): 3, dt.date(2026, 3, 3): 1, dt.date(2026, 3, 4): 2}
    n = 0
    for day, count in days.items():
        for _ in range(count):
            n += 1
            at = dt.datetime.combine(day, dt.time(12, 0), tzinfo=dt.UTC)
            await pg.execute(
                "INSERT INTO users (name, email, created_at) VALUES ($1, $2, $3)",
                f"U{n}",
                f"u{n}@example.com",
                at,
            )
    await pg.execute(  # outside the range: not counted
        "INSERT INTO users (name, email, created_at) VALUES ('Late', 'late@example.com', '2026-03-06T01:00Z')"
    )
    client = await aiohttp_client(create_app(jcfg))
    resp = await client.post(
        "/generate-report", params={"report_type": "signups", "start": "2026-03-01", "end": "2026-03-05"}
    )
    assert resp.status == 202
    body = await resp.json()
    assert body["estimated_time"] > 0
    done = await wait_task(client, body["task_id"])
    assert done["status"] == "completed", done
    url = done["result"]["report_url"]
    report = await (await client.get(url)).json()
    assert report["report_type"] == "signups"
    assert report["rows"] == [
        {"day": "2026-03-01", "signups": 3},
        {"day": "2026-03-02", "signups": 0},
        {"day": "2026-03-03", "signups": 1},
        {"day": "2026-03-04", "signups": 2},
        {"day": "2026-03-05", "signups": 0},
    ]
    assert report["summary"]["total"] == 6
    resp = await client.get(url, headers={"Accept": "text/csv"})
    assert resp.status == 200 and resp.content_type == "text/csv"
    rows = list(csv.DictReader(io.StringIO(await resp.text())))
    assert [(r["day"], r["signups"]) for r in rows][:1] == [("2026-03-01", "3")]
    assert len(rows) == 5


async def test_a_long_report_renders_in_every_text_format(aiohttp_client: Any, jcfg: Config) -> None:
    """A ten-year report (3,654 rows) is rendered off the loop in the text formats
    (server/http/representation.py OFF_LOOP_ROWS): the same document, whole, in each."""
    client = await aiohttp_client(create_app(jcfg))
    resp = await client.post(
        "/generate-report", params={"report_type": "signups", "start": "2016-01-01", "end": "2025-12-31"}
    )
    assert resp.status == 202
    done = await wait_task(client, (await resp.json())["task_id"])
    assert done["status"] == "completed", done
    url = done["result"]["report_url"]
    as_json = await (await client.get(url)).json()
    assert len(as_json["rows"]) == 3653 > OFF_LOOP_ROWS
    as_yaml = yaml.safe_load(await (await client.get(url, params={"format": "yaml"})).read())
    assert [(str(r["day"]), r["signups"]) for r in as_yaml["rows"]] == [
        (r["day"], r["signups"]) for r in as_json["rows"]
    ]
    csv_rows = list(
        csv.DictReader(io.StringIO(await (await client.get(url, params={"format": "csv"})).text()))
    )
    assert len(csv_rows) == 3653 and csv_rows[-1]["day"] == "2025-12-31"
    xml = await (await client.get(url, params={"format": "xml"})).text()
    assert xml.count("<signups>") == 3653
    page = await client.get(url, params={"format": "html"})
    assert page.status == 200 and (await page.text()).count("<tr") >= 3653


async def test_user_activity_report_and_bad_requests(aiohttp_client: Any, jcfg: Config) -> None:
    client = await aiohttp_client(create_app(jcfg))
    user = await (await client.post("/users", json={"name": "Ada", "email": "ada@example.com"})).json()
    await client.patch(f"/users/{user['id']}", json={"name": "Ada L."})
    resp = await client.post("/generate-report", json={"report_type": "user-activity", "user_id": user["id"]})
    assert resp.status == 202
    done = await wait_task(client, (await resp.json())["task_id"])
    assert done["status"] == "completed", done
    report = await (await client.get(done["result"]["report_url"], params={"format": "json"})).json()
    assert report["summary"]["email"] == "ada@example.com"
    assert report["summary"]["name"] == "Ada L."
    events = [r["event"] for r in report["rows"]]
    assert events[:2] == ["signed up", "profile updated"]
    assert "task generate_report" in events
    for bad in (
        {"report_type": "weekly-sales"},
        {"report_type": "user-activity"},
        {"report_type": "user-activity", "user_id": 999999},
        {"report_type": "signups", "start": "yesterday"},
        {"report_type": "signups", "start": "2026-03-02", "end": "2026-03-01"},
    ):
        resp = await client.post("/generate-report", params=bad)
        assert resp.status == 422, bad
        assert resp.content_type == "application/problem+json"
    assert (await client.get("/reports/424242")).status == 404


# asyncpg sends 0001-01-01 and 9999-12-31 as -infinity and infinity: generate_series never ends
OUT_OF_RANGE = [
    ({"start": "0001-01-01", "end": "0001-01-05"}, {"start", "end"}),
    ({"start": "9999-12-31", "end": "9999-12-31"}, {"start", "end"}),
    ({"start": "0001-01-01"}, {"start"}),
    ({"end": "9999-12-31"}, {"end"}),
    ({"end": "0001-01-05"}, {"end"}),  # the default start would be before it
    ({"start": "1969-12-31", "end": "1970-01-02"}, {"start"}),
    ({"start": "2999-12-31", "end": "3000-01-01"}, {"end"}),
]


@pytest.mark.parametrize(("dates", "fields"), OUT_OF_RANGE)
async def test_report_dates_out_of_range_are_422_and_enqueue_nothing(
    client: Any, jobs_clean: None, pg: asyncpg.Pool, dates: dict[str, str], fields: set[str]
) -> None:
    resp = await client.post("/generate-report", params={"report_type": "signups", **dates})
    assert resp.status == 422 and resp.content_type == "application/problem+json"
    doc = await resp.json(content_type=None)
    assert {e["field"] for e in doc["errors"]} == fields
    assert all("1970-01-01 and 2999-12-31" in e["message"] for e in doc["errors"])
    assert await pg.fetchval("SELECT count(*) FROM jobs") == 0


async def test_report_at_the_edges_of_the_range_completes(client: Any, jobs_clean: None) -> None:
    for params, days in (
        ({"start": "1970-01-01", "end": "1970-01-05"}, 5),
        ({"end": "1970-01-03"}, 3),  # the default 30 days, cut at the start of the range
        ({"start": "2999-12-22", "end": "2999-12-31"}, 10),
    ):
        resp = await client.post("/generate-report", params={"report_type": "signups", **params})
        assert resp.status == 202, await resp.text()
        done = await wait_task(client, (await resp.json())["task_id"])
        assert done["status"] == "completed" and done["result"]["rows"] == days, done


async def test_a_report_queued_with_infinite_dates_fails_at_once(client: Any, jobs_clean: None) -> None:
    """A job accepted before the bounds existed (or written by hand) is refused by the worker
    too, on its first attempt: no query to infinity, no retries."""
    payload = {"report_type": "signups", "start": "9999-12-30", "end": "9999-12-31"}
    job, _ = await client.app[JOBS].enqueue("generate_report", payload)
    done = await wait_task(client, job.id)
    assert done["status"] == "failed" and done["attempts"] == 1, done
    assert "out of range" in done["error"]


# ---------------------------------------------------------------- bulk_process


async def test_bulk_json_good_and_bad_rows(aiohttp_client: Any, jcfg: Config, pg: asyncpg.Pool) -> None:
    await pg.execute("INSERT INTO users (name, email) VALUES ('Old Name', 'KEEP@example.com')")
    records = [
        {"name": "Ada", "email": "ada@example.com"},
        {"name": "", "email": "bad"},
        {"name": "New Name", "email": "keep@example.com"},  # upsert by email, any case
        "not an object",
        {"name": "Ada again", "email": "ADA@example.com"},  # duplicate inside the batch
        {"name": "Bob", "email": "bob@example.com", "age": 3},
    ]
    client = await aiohttp_client(create_app(jcfg))
    resp = await client.post("/bulk-process", json=records)
    assert resp.status == 202
    done = await wait_task(client, (await resp.json())["task_id"])
    assert done["status"] == "completed", done
    result = done["result"]
    assert result["total"] == 6 and result["imported"] == 2 and result["failed"] == 4
    assert [e["row"] for e in result["errors"]] == [2, 4, 5, 6]
    assert {e["field"] for e in result["errors"][0]["errors"]} == {"name", "email"}
    assert "duplicate of row 1" in result["errors"][2]["errors"][0]["message"]
    assert result["errors"][3]["errors"][0]["field"] == "age"
    assert done["progress"]["done"] == 6 and done["progress"]["total"] == 6
    rows = await pg.fetch("SELECT name, email FROM users ORDER BY lower(email)")
    assert [(r["name"], r["email"]) for r in rows] == [
        ("Ada", "ada@example.com"),
        ("New Name", "keep@example.com"),
    ]


async def test_bulk_csv_in_chunks(aiohttp_client: Any, jcfg: Config, pg: asyncpg.Pool) -> None:
    lines = ["name,email"] + [f"User {i},user{i}@example.com" for i in range(2500)] + ["Broken,not-an-email"]
    client = await aiohttp_client(create_app(jcfg))
    resp = await client.post("/bulk-process", data="\n".join(lines), headers={"Content-Type": "text/csv"})
    assert resp.status == 202
    done = await wait_task(client, (await resp.json())["task_id"])
    assert done["status"] == "completed", done
    assert done["result"]["imported"] == 2500
    assert done["result"]["errors"] == [
        {"row": 2501, "errors": [{"field": "email", "message": "must be a valid email address"}]}
    ]
    assert await pg.fetchval("SELECT count(*) FROM users") == 2500
    assert await pg.fetchval("SELECT name FROM users WHERE email = 'user1234@example.com'") == "User 1234"


async def test_a_bulk_result_lists_a_bounded_number_of_bad_rows(aiohttp_client: Any, jcfg: Config) -> None:
    """Defect: every bad row's every error was kept (10,000 rows x 14 errors: a 6.3 MB task
    answer rendered for each GET). The first BULK_ERRORS_KEPT are listed, the rest counted."""
    client = await aiohttp_client(create_app(jcfg))
    rows = [{"name": 1, **{f"k{j}": j for j in range(8)}} for _ in range(BULK_ERRORS_KEPT + 50)]
    resp = await client.post("/bulk-process", json=rows)
    assert resp.status == 202, await resp.text()
    done = await wait_task(client, (await resp.json())["task_id"])
    result = done["result"]
    assert result["failed"] == BULK_ERRORS_KEPT + 50 and result["imported"] == 0
    assert len(result["errors"]) == BULK_ERRORS_KEPT and result["errors_omitted"] == 50
    assert result["errors"][0]["row"] == 1


async def test_bulk_limits(aiohttp_client: Any, jcfg: Config) -> None:
    cfg = replace(jcfg, jobs={"concurrency": 0, "bulk_max_rows": 3})
    client = await aiohttp_client(create_app(cfg))
    rows = [{"name": f"n{i}", "email": f"e{i}@example.com"} for i in range(4)]
    resp = await client.post("/bulk-process", json=rows)
    assert resp.status == 413 and resp.content_type == "application/problem+json"
    assert (await client.post("/bulk-process", json=[])).status == 422
    assert (await client.post("/bulk-process", json={"name": "x"})).status == 400
    resp = await client.post("/bulk-process", json=[{"name": "nul\u0000", "email": "n@example.com"}])
    assert resp.status == 422  # jsonb cannot store NUL: refused, not a 500
    resp = await client.post("/bulk-process", data=b"x", headers={"Content-Type": "image/png"})
    assert resp.status == 415
    assert (await client.post("/bulk-process", json=rows[:3])).status == 202


# ---------------------------------------------------------------- API: idempotency, cancel, list


async def test_idempotency_key_gives_the_same_task(
    aiohttp_client: Any, jcfg: Config, pg: asyncpg.Pool
) -> None:
    client = await aiohttp_client(create_app(replace(jcfg, jobs={"concurrency": 0})))
    params = {"recipient": "ada@example.com", "subject": "s", "content": "c"}
    key = {"Idempotency-Key": "order-42-confirmation"}
    first = await client.post("/send-notification", params=params, headers=key)
    second = await client.post("/send-notification", params=params, headers=key)
    assert first.status == 202 and second.status == 200
    assert (await first.json())["task_id"] == (await second.json())["task_id"]
    # concurrent repeats: still one job
    answers = await asyncio.gather(
        *(client.post("/send-notification", params=params, headers=key) for _ in range(10))
    )
    assert {(await a.json())["task_id"] for a in answers} == {(await first.json())["task_id"]}
    assert await pg.fetchval("SELECT count(*) FROM jobs") == 1
    other = await client.post("/send-notification", params={**params, "content": "other"}, headers=key)
    assert other.status == 409
    bad = await client.post("/send-notification", params=params, headers={"Idempotency-Key": "bad key"})
    assert bad.status == 422


async def test_cancel_a_queued_task(aiohttp_client: Any, jcfg: Config) -> None:
    client = await aiohttp_client(create_app(replace(jcfg, jobs={"concurrency": 0})))
    resp = await client.post("/send-notification", json={"recipient": "a@example.com"})
    task_id = (await resp.json())["task_id"]
    assert (await (await client.get(f"/task-status/{task_id}")).json())["status"] == "queued"
    resp = await client.delete(f"/task-status/{task_id}")
    assert resp.status == 200
    assert (await resp.json())["status"] == "cancelled"
    resp = await client.delete(f"/task-status/{task_id}")
    assert resp.status == 409 and resp.content_type == "application/problem+json"
    assert (await client.delete("/task-status/999999")).status == 404
    assert (await client.get("/task-status/999999")).status == 404
    assert (await client.get("/task-status/99999999999999999999")).status == 404


async def test_list_tasks_by_state_with_keyset_pages(aiohttp_client: Any, jcfg: Config) -> None:
    client = await aiohttp_client(create_app(replace(jcfg, jobs={"concurrency": 0})))
    ids = []
    for i in range(5):
        resp = await client.post("/send-notification", json={"recipient": f"u{i}@example.com"})
        ids.append((await resp.json())["task_id"])
    await client.delete(f"/task-status/{ids[1]}")
    page = await (await client.get("/tasks", params={"state": "queued", "limit": "2"})).json()
    assert [t["task_id"] for t in page["items"]] == [ids[0], ids[2]]
    page2 = await (await client.get(page["next"])).json()
    assert [t["task_id"] for t in page2["items"]] == [ids[3], ids[4]]
    everything = await (await client.get("/tasks")).json()
    assert [t["task_id"] for t in everything["items"]] == ids and everything["next"] is None
    resp = await client.get("/tasks", params={"state": "sleeping"})
    assert resp.status == 422
    resp = await client.get(f"/task-status/{ids[0]}", headers={"Accept": "application/yaml"})
    assert resp.status == 200 and resp.content_type == "application/yaml"


# ---------------------------------------------------------------- engine: retries, cancel, listeners


class Harness:
    """An Engine and a Runner in this process with test-only job kinds."""

    def __init__(self, cfg: Config, kinds: dict[str, Any]) -> None:
        self.cfg = cfg
        self.kinds = kinds

    async def __aenter__(self) -> Harness:
        self.pool = await asyncpg.create_pool(self.cfg.database.url, min_size=1, max_size=5)
        self.engine = Engine(Database(self.pool, 5.0, 5), self.cfg.jobs)
        self.runner = Runner(self.engine, self.kinds, self.cfg, self.cfg.database.url)
        await self.runner.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.close()
        await self.pool.close()

    async def wait(self, job_id: int, states: frozenset[str] = FINAL, timeout: float = 20.0) -> Any:
        async def check() -> Any:
            job = await self.engine.get(job_id, EVERY)
            return job if job.state in states else None

        return await until(check, f"job {job_id} in {sorted(states)}", timeout)


async def test_retries_with_exponential_backoff(jcfg: Config) -> None:
    seen: list[float] = []

    async def flaky(ctx: JobContext, payload: dict[str, Any]) -> Any:
        seen.append(time.monotonic())
        if ctx.job.attempts < 3:
            raise RuntimeError(f"transient failure {ctx.job.attempts}")
        return {"ok": True}

    async def broken(ctx: JobContext, payload: dict[str, Any]) -> Any:
        raise RuntimeError("always")

    async def refused(ctx: JobContext, payload: dict[str, Any]) -> Any:
        raise PermanentError("not fixable by retrying")

    jobs = {**FAST, "max_attempts": {"default": "3"}, "backoff_base": {"default": "0.3"}}
    cfg = replace(jcfg, jobs=jobs)
    async with Harness(cfg, {"flaky": flaky, "broken": broken, "refused": refused}) as h:
        job, _ = await h.engine.enqueue("flaky", {})
        done = await h.wait(job.id)
        assert done.state == "completed" and done.attempts == 3 and done.result == {"ok": True}
        # base 0.3 s, doubled, +-25 % jitter: >= 0.225 s, then >= 0.45 s
        assert seen[1] - seen[0] >= 0.22 and seen[2] - seen[1] >= 0.44, seen
        job, _ = await h.engine.enqueue("broken", {})
        failed = await h.wait(job.id)
        assert failed.state == "failed" and failed.attempts == 3 and "always" in (failed.error or "")
        job, _ = await h.engine.enqueue("refused", {})
        failed = await h.wait(job.id)
        assert failed.state == "failed" and failed.attempts == 1 and failed.error == "not fixable by retrying"


async def test_cancel_a_processing_task_at_its_next_progress_point(jcfg: Config) -> None:
    started = asyncio.Event()
    steps: list[int] = []

    async def long(ctx: JobContext, payload: dict[str, Any]) -> Any:
        for i in range(10_000):
            steps.append(i)
            await ctx.progress(i, 10_000, "working")
            started.set()
            await asyncio.sleep(0.005)  # the job's own work
        return "finished"

    async with Harness(jcfg, {"long": long}) as h:
        events: list[dict[str, Any]] = []

        async def listener(job: Job) -> None:
            events.append(job.snapshot())

        h.engine.listeners.append(listener)
        job, _ = await h.engine.enqueue("long", {})
        await asyncio.wait_for(started.wait(), 10)
        cancelling = await h.engine.cancel(job.id, EVERY)
        assert cancelling.state == "processing" and cancelling.cancel_requested
        done = await h.wait(job.id)
        assert done.state == "cancelled"
        assert len(steps) < 10_000
        statuses = [e["status"] for e in events]
        assert statuses[0] == "queued" and "processing" in statuses and statuses[-1] == "cancelled"
        assert any(e["progress"]["message"] == "working" for e in events)


async def test_delete_of_a_processing_task_answers_202_then_it_stops(
    aiohttp_client: Any, jcfg: Config
) -> None:
    started = asyncio.Event()

    async def endless(ctx: JobContext, payload: dict[str, Any]) -> Any:
        while True:
            await ctx.progress(0, None, "waiting")
            started.set()
            await asyncio.sleep(0.01)  # the job's own work

    client = await aiohttp_client(create_app(replace(jcfg, jobs={"concurrency": 0})))
    async with Harness(jcfg, {"endless": endless}) as h:
        job, _ = await h.engine.enqueue("endless", {})
        await asyncio.wait_for(started.wait(), 10)
        resp = await client.delete(f"/task-status/{job.id}")
        assert resp.status == 202
        body = await resp.json()
        assert body["status"] == "processing" and body["cancel_requested"] is True
        assert (await wait_task(client, job.id))["status"] == "cancelled"
        assert (await client.delete(f"/task-status/{job.id}")).status == 409


async def test_cleanup_removes_old_finished_jobs(jcfg: Config, pg: asyncpg.Pool) -> None:
    cfg = replace(jcfg, jobs={**FAST, "retention": 2.0})
    old = await pg.fetchval(
        "INSERT INTO jobs (kind, state, finished_at) VALUES ('noop', 'completed', now() - interval '1 hour') "
        "RETURNING id"
    )
    failed = await pg.fetchval(
        "INSERT INTO jobs (kind, state, finished_at) VALUES ('noop', 'failed', now() - interval '1 hour') "
        "RETURNING id"
    )
    fresh = await pg.fetchval(
        "INSERT INTO jobs (kind, state, finished_at) VALUES ('noop', 'completed', now()) RETURNING id"
    )
    future = await pg.fetchval(
        "INSERT INTO jobs (kind, run_after) VALUES ('noop', now() + interval '1 day') RETURNING id"
    )
    async with Harness(cfg, KINDS):  # its cleanup loop runs at start and every retention / 4

        async def gone() -> bool:
            left = {r["id"] for r in await pg.fetch("SELECT id FROM jobs")}
            return old not in left and failed not in left

        await until(gone, "old jobs removed")
        left = {r["id"] for r in await pg.fetch("SELECT id FROM jobs")}
        assert fresh in left and future in left


async def test_graceful_shutdown_hands_back_running_jobs(jcfg: Config) -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def quick(ctx: JobContext, payload: dict[str, Any]) -> Any:
        started.set()
        await release.wait()
        return "done"

    async def stuck(ctx: JobContext, payload: dict[str, Any]) -> Any:
        await asyncio.get_running_loop().create_future()

    cfg = replace(jcfg, jobs={**FAST, "shutdown_timeout": 0.5})
    h = Harness(cfg, {"quick": quick, "stuck": stuck})
    await h.__aenter__()
    try:
        a, _ = await h.engine.enqueue("quick", {})
        b, _ = await h.engine.enqueue("stuck", {})
        await h.wait(b.id, frozenset({"processing"}))
        await asyncio.wait_for(started.wait(), 10)
        closing = asyncio.create_task(h.runner.close())
        release.set()  # the quick job finishes within the timeout, the stuck one does not
        await closing
        assert (await h.engine.get(a.id, EVERY)).state == "completed"
        back = await h.engine.get(b.id, EVERY)
        assert back.state == "queued" and back.attempts == 0 and back.worker is None
    finally:
        await h.pool.close()


# ---------------------------------------------------------------- worker processes


def worker_env(cfg: Config, **extra: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": cfg.database.url,
        "REDIS_URL": cfg.redis.url,
        "HOTPATH_EMBEDDED_DATA_DIR": cfg.embedded.data_dir,
        "HOTPATH_JOBS_LEASE": "1.0",
        "HOTPATH_JOBS_HEARTBEAT_INTERVAL": "0.2",
        "HOTPATH_JOBS_POLL_INTERVAL": "0.2",
        "HOTPATH_JOBS_SHUTDOWN_TIMEOUT": "2",
    }
    env.update(extra)
    return env


async def start_worker(env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as stderr:
        return await asyncio.create_subprocess_exec(
            PYTHON, "run.py", "worker", cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )


async def stop(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(proc.wait(), 30)


async def test_kill_9_mid_job_then_another_worker_completes_it(
    aiohttp_client: Any, jcfg: Config, tmp_path: Path
) -> None:
    handler = Recorder(stall_first=True)  # the first worker dies waiting for DATA's answer
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    smtp = {
        "HOTPATH_SMTP_HOST": "127.0.0.1",
        "HOTPATH_SMTP_PORT": str(port),
        "HOTPATH_SMTP_STARTTLS": "false",
    }
    env = worker_env(jcfg, **smtp, HOTPATH_SMTP_TIMEOUT="60")
    client = await aiohttp_client(create_app(replace(jcfg, jobs={"concurrency": 0})))
    first = second = None
    try:
        resp = await client.post("/send-notification", json={"recipient": "k@example.com", "subject": "kill"})
        task_id = (await resp.json())["task_id"]
        first = await start_worker(env, tmp_path / "w1.log")

        async def stalled() -> bool:
            assert first is not None and first.returncode is None
            return handler.first_data.is_set()

        await until(stalled, "the first worker to reach DATA", 60)
        processing = await wait_task(client, task_id, frozenset({"processing"}))
        assert processing["attempts"] == 1
        first.kill()  # SIGKILL: no clean-up, the lease just stops being renewed
        await first.wait()
        second = await start_worker(env, tmp_path / "w2.log")
        done = await wait_task(client, task_id, timeout=60)
        assert done["status"] == "completed", done
        assert done["attempts"] == 2
        assert len(handler.messages) == 1  # the dead worker's DATA was never acknowledged
        assert parsed(handler.messages[0])["Message-ID"] == done["result"]["message_id"]
        assert await stop(second) == 0
    finally:
        for proc in (first, second):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
        controller.stop()


async def test_a_job_that_kills_its_worker_every_time_ends_failed(jcfg: Config, pg: asyncpg.Pool) -> None:
    # Three claims whose worker died (lease expired each time): attempts are counted at claim.
    job_id = await pg.fetchval(
        "INSERT INTO jobs (kind, state, attempts, max_attempts, worker, lease_until) "
        "VALUES ('noop', 'processing', 3, 3, 'dead-worker', now() - interval '1 second') RETURNING id"
    )
    async with Harness(jcfg, KINDS) as h:
        job = await h.wait(job_id)
        assert job.state == "failed" and job.attempts == 3
        assert "dead-worker" in (job.error or "") and "lease expired" in (job.error or "")


async def test_queued_jobs_survive_a_restart_and_run(
    aiohttp_client: Any, jcfg: Config, tmp_path: Path
) -> None:
    # Accepted by a process that runs no jobs and then goes away...
    client = await aiohttp_client(create_app(replace(jcfg, jobs={"concurrency": 0})))
    ids = []
    for i in range(5):
        resp = await client.post(
            "/send-notification", json={"recipient": f"r{i}@example.com", "subject": f"{i}"}
        )
        ids.append((await resp.json())["task_id"])
    await client.close()
    # ...and run by a worker started afterwards.
    proc = await start_worker(worker_env(jcfg), tmp_path / "worker.log")
    try:
        client = await aiohttp_client(create_app(replace(jcfg, jobs={"concurrency": 0})))
        for task_id in ids:
            assert (await wait_task(client, task_id, timeout=60))["status"] == "completed"
        assert await stop(proc) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert len(list(mailbox.Maildir(Path(jcfg.embedded.data_dir) / "outbox", create=False))) == 5


async def test_two_worker_processes_never_run_the_same_job(
    aiohttp_client: Any, jcfg: Config, tmp_path: Path, pg: asyncpg.Pool, smtp_plain: tuple[Recorder, int]
) -> None:
    handler, port = smtp_plain
    smtp = {
        "HOTPATH_SMTP_HOST": "127.0.0.1",
        "HOTPATH_SMTP_PORT": str(port),
        "HOTPATH_SMTP_STARTTLS": "false",
    }
    env = worker_env(
        jcfg, **smtp, HOTPATH_JOBS_LEASE="30", HOTPATH_JOBS_CONCURRENCY="8", HOTPATH_JOBS_BATCH_SIZE="4"
    )
    client = await aiohttp_client(create_app(replace(jcfg, jobs={"concurrency": 0})))
    workers = [await start_worker(env, tmp_path / f"w{i}.log") for i in range(2)]
    try:

        async def both_listening() -> bool:
            for proc in workers:
                assert proc.returncode is None, "a worker exited"
            sql = (
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query LIKE 'LISTEN%'"
            )
            return await pg.fetchval(sql) == 2

        await until(both_listening, "both workers listening", 60)
        n = 200
        for i in range(n):
            resp = await client.post(
                "/send-notification", json={"recipient": f"p{i}@example.com", "subject": str(i)}
            )
            assert resp.status == 202

        async def all_done() -> bool:
            return await pg.fetchval("SELECT count(*) FROM jobs WHERE state = 'completed'") == n

        await until(all_done, "all jobs completed", 90)
        assert await pg.fetchval("SELECT max(attempts) FROM jobs") == 1
        ids = [parsed(m)["Message-ID"] for m in handler.messages]
        assert len(ids) == n and len(set(ids)) == n  # each job ran exactly once
        assert await pg.fetchval("SELECT count(DISTINCT worker) FROM jobs") == 2  # both took part
        for proc in workers:
            assert await stop(proc) == 0
    finally:
        for proc in workers:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_sigterm_lets_the_worker_hand_back_a_job_it_cannot_finish(
    aiohttp_client: Any, jcfg: Config, tmp_path: Path, pg: asyncpg.Pool
) -> None:
    handler = Recorder(stall_first=True)
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    smtp = {
        "HOTPATH_SMTP_HOST": "127.0.0.1",
        "HOTPATH_SMTP_PORT": str(port),
        "HOTPATH_SMTP_STARTTLS": "false",
    }
    env = worker_env(jcfg, **smtp, HOTPATH_SMTP_TIMEOUT="60", HOTPATH_JOBS_SHUTDOWN_TIMEOUT="0.5")
    client = await aiohttp_client(create_app(replace(jcfg, jobs={"concurrency": 0})))
    proc = None
    try:
        resp = await client.post("/send-notification", json={"recipient": "t@example.com", "subject": "term"})
        task_id = (await resp.json())["task_id"]
        proc = await start_worker(env, tmp_path / "worker.log")

        async def stalled() -> bool:
            assert proc is not None and proc.returncode is None
            return handler.first_data.is_set()

        await until(stalled, "the worker to reach DATA", 60)
        assert await stop(proc) == 0  # SIGTERM: 0.5 s to finish, then the job is handed back
        job = await pg.fetchrow(
            "SELECT state, attempts, worker, lease_until FROM jobs WHERE id = $1", task_id
        )
        assert dict(job) == {"state": "queued", "attempts": 0, "worker": None, "lease_until": None}
        assert "handed back 1 unfinished jobs" in (tmp_path / "worker.log").read_text()
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        controller.stop()


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"HOTPATH_JOBS_MAX_ATTEMPTS": '{ default = "0" }'}, "jobs.max_attempts.default"),
        ({"HOTPATH_JOBS_MAX_ATTEMPTS": '{ bulk_process = "many" }'}, "jobs.max_attempts.bulk_process"),
        ({"HOTPATH_JOBS_BACKOFF_BASE": '{ default = "-1" }'}, "jobs.backoff_base.default"),
        ({"HOTPATH_JOBS_CONCURRENCY": "-1"}, "jobs.concurrency"),
        ({"HOTPATH_SMTP_PORT": "0"}, "smtp.port"),
    ],
)
def test_bad_jobs_settings_name_the_key(env: dict[str, str], key: str) -> None:
    from server.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(env=env)
    assert key in str(info.value)


def test_per_kind_attempts_and_backoff() -> None:
    from server.config import load_config
    from server.jobs.runner import backoff_delay

    cfg = load_config(env={"HOTPATH_JOBS_MAX_ATTEMPTS": '{ default = "4", noop = "1" }'}).jobs
    assert cfg.attempts_for("noop") == 1 and cfg.attempts_for("generate_report") == 4
    cfg = Config().jobs
    assert cfg.attempts_for("send_notification") == 6
    delays = [backoff_delay(cfg, "send_notification", n) for n in (1, 2, 3)]
    assert 3.75 <= delays[0] <= 6.25 and 7.5 <= delays[1] <= 12.5 and 15 <= delays[2] <= 25
    assert backoff_delay(cfg, "generate_report", 40) == cfg.backoff_max  # capped
