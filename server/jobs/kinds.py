"""The job kinds: email notifications, reports, bulk user imports, and a no-op for the benchmark.

Delivery is at least once, so each kind is idempotent: a notification carries a Message-ID
derived from its job and is recorded as sent before the job completes; a report is stored
under its job id (a retry overwrites it); a bulk import upserts by email.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import os
import re
import ssl
from collections.abc import Mapping
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import orjson

from server.config import Config, SmtpConfig
from server.errors import NotFound, ValidationFailed
from server.http import bodies
from server.http.bounds import DATE_MIN, RANGE_TEXT, date_in_range
from server.http.operations import Schema
from server.jobs.queue import Viewer
from server.jobs.runner import Handler, JobContext, PermanentError
from server.storage.db import Database, local_statement_timeout
from server.users import EMAIL_MAX, is_email, validate_user_fields

REPORT_TYPES = ("signups", "user-activity")
SUBJECT_MAX = 998  # RFC 5322 line length
CONTENT_MAX = 100_000
# What a subject or a recipient may not hold, since each becomes a mail header: controls (tab
# allowed in a subject) and every line break str.splitlines() and the email package know
# (CR, LF, NEL, LS, PS, ...); unpaired surrogates, which cannot be encoded at all; and "=?",
# the start of an RFC 2047 encoded word, which the email package decodes when it reads the
# header, so "=?utf-8?q?a=0D=0ABcc:_x@y?=" became a CR LF and a Bcc header of the client's.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]|=\?")
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")  # what jsonb and UTF-8 refuse
BULK_CHUNK = 1000
# Bad rows a bulk import's result lists (the rest are counted): 10,000 rows of 16 unknown
# fields each made a result of 140,000 errors, a 6.3 MB answer to every GET /task-status.
BULK_ERRORS_KEPT = 100
REPORT_MAX_DAYS = 3660  # a signups report spans at most 10 years (3661 rows)

# ---------------------------------------------------------------- validation (request time)

# What validate_notification() and validate_report() take, with their limits.
NOTIFICATION = Schema(
    "Notification",
    {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "recipient": {"type": "string", "format": "email", "maxLength": EMAIL_MAX},
            "subject": {"type": "string", "maxLength": SUBJECT_MAX},
            "content": {"type": "string", "maxLength": CONTENT_MAX},
        },
    },
)
REPORT_REQUEST = Schema(
    "ReportRequest",
    {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "report_type": {"enum": list(REPORT_TYPES)},
            "user_id": {"type": ["integer", "string"]},
            "start": {"type": "string", "format": "date"},
            "end": {"type": "string", "format": "date"},
        },
    },
)


def validate_notification(data: Mapping[str, Any]) -> dict[str, str]:
    """recipient (an email address), subject, content: the clean payload, or ValidationFailed."""
    errors: list[dict[str, str]] = []
    clean: dict[str, str] = {}
    for key in data:
        if key not in ("recipient", "subject", "content"):
            errors.append({"field": str(key), "message": "unknown field"})
    recipient = data.get("recipient")
    if not isinstance(recipient, str) or not recipient.strip():
        errors.append({"field": "recipient", "message": "is required"})
    elif not is_email(recipient.strip()) or "=?" in recipient:
        errors.append({"field": "recipient", "message": "must be a valid email address"})
    else:
        clean["recipient"] = recipient.strip()
    subject = data.get("subject", "")
    if not isinstance(subject, str):
        errors.append({"field": "subject", "message": "must be a string"})
    elif len(subject) > SUBJECT_MAX or _CONTROL.search(subject):
        message = f"at most {SUBJECT_MAX} characters, no line breaks or control characters, no '=?'"
        errors.append({"field": "subject", "message": message})
    else:
        clean["subject"] = subject
    content = data.get("content", "")
    if not isinstance(content, str):
        errors.append({"field": "content", "message": "must be a string"})
    elif len(content) > CONTENT_MAX or _UNSTORABLE.search(content):
        message = f"at most {CONTENT_MAX} characters, no NUL or unpaired surrogates"
        errors.append({"field": "content", "message": message})
    else:
        clean["content"] = content
    if errors:
        raise ValidationFailed(errors)
    return clean


def _date(value: Any, name: str, errors: list[dict[str, str]]) -> dt.date | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            day = dt.date.fromisoformat(value)
        except ValueError:
            pass
        else:
            if date_in_range(day):
                return day
            errors.append({"field": name, "message": f"must be a date {RANGE_TEXT}"})
            return None
    errors.append({"field": name, "message": "must be a date (YYYY-MM-DD)"})
    return None


def _span_error(start: dt.date, end: dt.date) -> str | None:
    if start > end or (end - start).days > REPORT_MAX_DAYS:
        return "start <= end, at most 10 years apart"
    return None


async def validate_report(db: Database, data: Mapping[str, Any]) -> dict[str, Any]:
    """report_type (signups | user-activity), user_id (user-activity: an existing user),
    start/end dates (signups; default the last 30 days), each within server.http.bounds' range."""
    errors: list[dict[str, str]] = []
    for key in data:
        if key not in ("report_type", "user_id", "start", "end"):
            errors.append({"field": str(key), "message": "unknown field"})
    report_type = data.get("report_type")
    if report_type not in REPORT_TYPES:
        errors.append({"field": "report_type", "message": f"must be one of {', '.join(REPORT_TYPES)}"})
    user_id: int | None = None
    raw = data.get("user_id")
    if raw is not None and raw != "":
        try:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            user_id = int(raw)
            if isinstance(raw, bool) or not 1 <= user_id < 2**63:
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            errors.append({"field": "user_id", "message": "must be a positive integer"})
            user_id = None
    elif report_type == "user-activity":
        errors.append({"field": "user_id", "message": "is required for user-activity"})
    start = _date(data.get("start"), "start", errors)
    end = _date(data.get("end"), "end", errors)
    if errors:
        raise ValidationFailed(errors)
    if report_type == "signups":
        end_d = end or dt.datetime.now(dt.UTC).date()
        start_d = start or max(DATE_MIN, end_d - dt.timedelta(days=29))
        problem = _span_error(start_d, end_d)
        if problem is not None:
            raise ValidationFailed([{"field": "start", "message": problem}])
        return {"report_type": report_type, "start": start_d.isoformat(), "end": end_d.isoformat()}
    assert user_id is not None
    if await db.fetchval("SELECT 1 FROM users WHERE id = $1", user_id) is None:
        raise ValidationFailed([{"field": "user_id", "message": f"user {user_id} does not exist"}])
    return {"report_type": report_type, "user_id": user_id}


def bulk_limits(max_rows: int, limits: bodies.Limits) -> bodies.Limits:
    """A bulk body's allowance: an object and a few values per record beside the usual one."""
    return bodies.Limits(containers=max_rows + limits.containers, items=8 * max_rows + limits.items)


def parse_bulk(
    content_type: str, body: bytes, max_rows: int, limits: bodies.Limits | None = None
) -> list[Any]:
    """Records from a JSON array or a CSV document (header row naming the fields).

    bodies.BodyError (a ValueError) for a body that is neither or breaks a bound,
    bodies.BodyTooLarge beyond `limits` (default: bulk_limits over bodies' defaults). At most
    max_rows + 1 CSV records are built; the caller maps more than max_rows to 413. JSON records
    pass bodies' depth and JSON-ability checks, so what is accepted here can be stored as the
    job's payload.
    """
    if content_type == "text/csv":
        return bodies.parse_csv_records(body, max_rows)
    data = bodies.parse_json(body, limits or bulk_limits(max_rows, bodies.Limits()))
    if isinstance(data, dict) and isinstance(data.get("records"), list) and len(data) == 1:
        data = data["records"]
    if not isinstance(data, list):
        raise ValueError("send a JSON array of user records (or CSV)")
    return data


# ---------------------------------------------------------------- send_notification


def message_id(job_id: int, created: dt.datetime, sender: str) -> str:
    """Stable per job: every retry sends the same Message-ID, so duplicates are recognisable.
    The domain is the sender's (no DNS lookup on the event loop, unlike socket.getfqdn())."""
    domain = sender.rpartition("@")[2] or "localhost"
    return f"<hotpath.job{job_id}.{int(created.timestamp() * 1e6)}@{domain}>"


def build_message(smtp: SmtpConfig, payload: Mapping[str, Any], msg_id: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = smtp.sender
    msg["To"] = payload["recipient"]
    msg["Subject"] = payload.get("subject", "")
    msg["Date"] = email.utils.formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = msg_id
    msg.set_content(payload.get("content", ""))
    # A job queued before the rules above (or by other code) must not become headers of its
    # own: a header that reads back with a line break is refused for good, never retried.
    for name in ("To", "Subject"):
        if any(c in str(msg[name]) for c in "\r\n\x85\u2028\u2029"):
            raise PermanentError(f"the {name} header would hold a line break; not sent")
    return msg


def deliver_maildir(outbox: Path, msg: EmailMessage, key: str) -> bool:
    """Put `msg` into the Maildir `outbox` under the fixed name `key`; False when it is already
    there (a retry). Standard Maildir delivery (write in tmp/, then a link into new/, which is
    atomic and fails if the name exists), with a name derived from the job instead of
    mailbox.Maildir.add()'s random one, which is what makes a second delivery detectable."""
    # with its parents: the data dir may not exist yet (only embedded mode makes it, and a
    # server on a configured PostgreSQL and Redis still writes its mail here); mailbox.Maildir
    # makes tmp/, new/ and cur/ only under a directory it creates itself
    for sub in ("tmp", "new", "cur"):
        (outbox / sub).mkdir(parents=True, exist_ok=True)
    if any(os.path.exists(os.path.join(outbox, sub, key)) for sub in ("new", "cur")) or any(
        name.startswith(key + ":") for name in os.listdir(os.path.join(outbox, "cur"))
    ):
        return False
    tmp = os.path.join(outbox, "tmp", f"{key}.{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(bytes(msg))
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(tmp, os.path.join(outbox, "new", key))
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def _tls_context(smtp: SmtpConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=smtp.ca_file or None)
    return ctx


async def send_notification(ctx: JobContext, payload: dict[str, Any]) -> Any:
    """Email through the configured relay, or into the Maildir outbox when none is configured."""
    job = ctx.job
    smtp = ctx.config.smtp
    msg_id = message_id(job.id, job.created_at, smtp.sender)
    if job.progress_done >= 1:  # an earlier attempt sent it and recorded that: never twice
        return {"recipient": payload["recipient"], "message_id": msg_id, "delivered": "earlier attempt"}
    msg = build_message(smtp, payload, msg_id)
    if not smtp.host:
        outbox = outbox_dir(ctx.config)
        key = msg_id.strip("<>").replace("/", "_")
        loop = asyncio.get_running_loop()
        fresh = await loop.run_in_executor(None, deliver_maildir, outbox, msg, key)
        await ctx.progress(1, 1, "written to the outbox" if fresh else "already in the outbox")
        return {"recipient": payload["recipient"], "message_id": msg_id, "transport": "maildir"}
    try:
        response = await aiosmtplib.send(
            msg,
            hostname=smtp.host,
            port=smtp.port,
            start_tls=smtp.starttls,
            use_tls=False,
            username=smtp.username or None,
            password=smtp.password or None,
            tls_context=_tls_context(smtp) if smtp.starttls else None,
            timeout=smtp.timeout,
        )
    except aiosmtplib.SMTPRecipientsRefused as exc:
        raise PermanentError(f"the relay refused the recipient: {exc}") from None
    except aiosmtplib.SMTPResponseException as exc:
        if 500 <= exc.code < 600:
            raise PermanentError(f"the relay answered {exc.code}: {exc.message}") from None
        raise
    await ctx.progress(1, 1, "sent")
    return {
        "recipient": payload["recipient"],
        "message_id": msg_id,
        "transport": "smtp",
        "relay_response": str(response[1]),
    }


def outbox_dir(config: Config) -> Path:
    return config.embedded_data_dir / "outbox"


# ---------------------------------------------------------------- generate_report

SQL_SIGNUPS = """
SELECT d::date AS day, count(u.id)::int AS signups
  FROM generate_series($1::date, $2::date, interval '1 day') AS d
  LEFT JOIN users u ON (u.created_at AT TIME ZONE 'UTC')::date = d::date
 GROUP BY d ORDER BY d
"""
SQL_USER = "SELECT id, name, email, created_at, updated_at FROM users WHERE id = $1"
# only the tasks of the report's own owner: a report must not reveal another key's tasks
SQL_USER_JOBS = """
SELECT id, kind, state, created_at, finished_at FROM jobs
 WHERE payload->>'user_id' = $1::text AND owner IS NOT DISTINCT FROM $2::bigint ORDER BY id
"""
SQL_STORE_REPORT = """
INSERT INTO reports (job_id, report_type, params, summary, rows)
VALUES ($1, $2, $3::jsonb, $4::jsonb, $5::jsonb)
ON CONFLICT (job_id) DO UPDATE
   SET params = EXCLUDED.params, summary = EXCLUDED.summary, rows = EXCLUDED.rows, created_at = now()
RETURNING id
"""
# reports.owner is its job's owner (a trigger sets it, server/storage/sql/004_access.sql); the
# viewer's filter as for jobs (server/jobs/queue.py SQL_GET)
SQL_GET_REPORT = """
SELECT id, job_id, report_type, params, summary, rows, created_at FROM reports
 WHERE id = $1 AND ($2::boolean OR owner IS NOT DISTINCT FROM $3::bigint)
"""


async def generate_report(ctx: JobContext, payload: dict[str, Any]) -> Any:
    """Build the report from PostgreSQL and store it under this job (a retry overwrites it)."""
    report_type = payload["report_type"]
    await ctx.progress(0, 2, "querying")
    if report_type == "signups":
        start, end = dt.date.fromisoformat(payload["start"]), dt.date.fromisoformat(payload["end"])
        # a job queued before these bounds were checked at request time must not run forever
        if not (date_in_range(start) and date_in_range(end)) or _span_error(start, end):
            raise PermanentError(f"dates out of range: {payload['start']} .. {payload['end']}")
        rows = [
            {"day": r["day"].isoformat(), "signups": r["signups"]}
            for r in await ctx.db.fetch(SQL_SIGNUPS, start, end)
        ]
        summary: dict[str, Any] = {
            "total": sum(r["signups"] for r in rows),
            "days": len(rows),
            "start": payload["start"],
            "end": payload["end"],
        }
    elif report_type == "user-activity":
        user = await ctx.db.fetchrow(SQL_USER, payload["user_id"])
        if user is None:
            raise PermanentError(f"user {payload['user_id']} does not exist")
        rows = [{"at": user["created_at"].isoformat(), "event": "signed up", "detail": user["email"]}]
        if user["updated_at"] > user["created_at"]:
            rows.append({"at": user["updated_at"].isoformat(), "event": "profile updated", "detail": ""})
        for j in await ctx.db.fetch(SQL_USER_JOBS, str(payload["user_id"]), ctx.job.owner):
            event = f"task {j['kind']}"
            rows.append({"at": j["created_at"].isoformat(), "event": event, "detail": j["state"]})
        rows.sort(key=lambda r: r["at"])
        summary = {
            "user_id": user["id"],
            "name": user["name"],
            "email": user["email"],
            "member_since": user["created_at"].date().isoformat(),
            "events": len(rows),
        }
    else:
        raise PermanentError(f"unknown report type {report_type!r}")
    await ctx.progress(1, 2, "storing")
    report_id = await ctx.db.fetchval(
        SQL_STORE_REPORT,
        ctx.job.id,
        report_type,
        orjson.dumps(payload).decode(),
        orjson.dumps(summary).decode(),
        orjson.dumps(rows).decode(),
    )
    await ctx.progress(2, 2, "done")
    return {"report_id": report_id, "report_url": f"/reports/{report_id}", "rows": len(rows)}


_TIME = {"type": "string", "format": "date-time"}
# What get_report() returns.
REPORT = Schema(
    "Report",
    {
        "type": "object",
        "required": ["id", "task_id", "report_type", "params", "summary", "rows", "created_at"],
        "properties": {
            "id": {"type": "integer"},
            "task_id": {"type": "integer"},
            "report_type": {"type": "string"},
            "params": {"type": "object"},
            "summary": {"type": "object"},
            "rows": {"type": "array", "items": {"type": "object"}},
            "created_at": _TIME,
        },
    },
)


async def get_report(db: Database, report_id: int, viewer: Viewer) -> dict[str, Any]:
    """A stored report: id, job (task) id, type, params, summary, rows, created_at. NotFound
    unless `viewer` may see its task (the task's owner, or an admin)."""
    row = await db.fetchrow(SQL_GET_REPORT, report_id, viewer.every, viewer.owner)
    if row is None:
        raise NotFound(f"report {report_id} does not exist")
    return {
        "id": row["id"],
        "task_id": row["job_id"],
        "report_type": row["report_type"],
        "params": orjson.loads(row["params"]),
        "summary": orjson.loads(row["summary"]),
        "created_at": row["created_at"],
        "rows": orjson.loads(row["rows"]),
    }


# ---------------------------------------------------------------- bulk_process

# One statement for a whole chunk: rows copied (binary COPY) into a temporary table, then
# upserted by email, any case (the unique index on lower(email)).
SQL_BULK_TEMP = "CREATE TEMP TABLE bulk_users (name text, email text) ON COMMIT DROP"
SQL_BULK_UPSERT = """
INSERT INTO users (name, email) SELECT name, email FROM bulk_users
ON CONFLICT ((lower(email))) DO UPDATE SET name = EXCLUDED.name, email = EXCLUDED.email, updated_at = now()
 WHERE users.name IS DISTINCT FROM EXCLUDED.name OR users.email IS DISTINCT FROM EXCLUDED.email
"""


async def bulk_process(ctx: JobContext, payload: dict[str, Any]) -> Any:
    """Validate each record like POST /users, upsert the valid ones chunk by chunk with binary
    COPY, report progress after each chunk; the result counts every bad row and lists the
    first BULK_ERRORS_KEPT of them."""
    records = payload["records"]
    total = len(records)
    errors: list[dict[str, Any]] = []
    good: list[tuple[int, str, str]] = []
    seen: dict[str, int] = {}
    for index, record in enumerate(records, start=1):
        try:
            clean = validate_user_fields(record, partial=False)
        except ValidationFailed as exc:
            errors.append({"row": index, "errors": exc.extra["errors"]})
            continue
        key = clean["email"].lower()
        if key in seen:
            errors.append(
                {"row": index, "errors": [{"field": "email", "message": f"duplicate of row {seen[key]}"}]}
            )
            continue
        seen[key] = index
        good.append((index, clean["name"], clean["email"]))
    await ctx.progress(0, total, f"{len(errors)} invalid rows; importing {len(good)}")
    written = 0
    # The pool's limits are for short requests; an upsert may wait for rows that requests hold.
    timeout = ctx.config.jobs.bulk_timeout
    for start in range(0, len(good), BULK_CHUNK):
        chunk = good[start : start + BULK_CHUNK]
        async with ctx.db.acquire() as conn, conn.transaction():
            await local_statement_timeout(conn, timeout)
            await conn.execute(SQL_BULK_TEMP)
            await conn.copy_records_to_table(
                "bulk_users", records=[(n, e) for _i, n, e in chunk], timeout=timeout
            )
            status = await conn.execute(SQL_BULK_UPSERT, timeout=timeout)
        written += int(status.rsplit(" ", 1)[1])
        done = chunk[-1][0]
        await ctx.progress(done, total, f"imported {start + len(chunk)} of {len(good)} valid rows")
    await ctx.progress(total, total, "done")
    return {
        "total": total,
        "imported": len(good),
        "changed": written,
        "failed": len(errors),
        "errors": errors[:BULK_ERRORS_KEPT],
        "errors_omitted": max(0, len(errors) - BULK_ERRORS_KEPT),
    }


# ---------------------------------------------------------------- noop


async def noop(ctx: JobContext, payload: dict[str, Any]) -> Any:
    """Does nothing: what bench/jobs.py measures is the queue itself. No endpoint creates it."""
    return None


KINDS: Mapping[str, Handler] = {
    "send_notification": send_notification,
    "generate_report": generate_report,
    "bulk_process": bulk_process,
    "noop": noop,
}
