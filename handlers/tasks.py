"""Background tasks: create (notification, report, bulk import), read, list, cancel; reports.

A task belongs to the key family that made it; reads, lists and cancels answer the caller's
own tasks only (an admin's: every task), so another key's task is a 404 (server/jobs/queue.py)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from handlers.common import page_link, path_id, query_int
from server.config import CONFIG
from server.errors import Unavailable, ValidationFailed
from server.http import bodies, bounds
from server.http.auth import PRINCIPAL
from server.http.operations import STRING, Body, Param, Schema, header, query
from server.http.parser_process import ParserUnavailable
from server.http.reading import (
    FORM_TYPES,
    PARSER_PROCESS,
    PayloadTooLarge,
    body_limits,
    read_body,
    read_form,
    read_limited,
)
from server.http.render import Shape
from server.http.representation import negotiate, represent, represent_rows
from server.jobs import JOBS, kinds
from server.jobs.queue import STATES, Job, Viewer
from server.storage.pool import DB
from server.users import USER_CREATE

TASK = Shape("task")
TASKS = Shape("tasks", rows="items")
REPORT = Shape("report", rows="rows")
PAGE_DEFAULT = 50
PAGE_MAX = 200
# Visible ASCII, 1-255 characters (what Stripe and the IETF draft accept in practice).
IDEMPOTENCY_KEY_MAX = 255
IDEMPOTENCY_KEY_PATTERN = f"^[\\x21-\\x7e]{{1,{IDEMPOTENCY_KEY_MAX}}}$"
_IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)
_CSV = "text/csv"
# Rough seconds per job kind for `estimated_time` (a hint for pollers, not a promise).
_ESTIMATE = {"send_notification": 1, "generate_report": 2}
_NO_BODY: Any = object()

# ---------------------------------------------------------------- shapes (the API document)

_TIME = {"type": "string", "format": "date-time"}
_TIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}
# What _accepted() answers, with its headers.
TASK_ACCEPTED = Schema(
    "TaskAccepted",
    {
        "type": "object",
        "required": ["message", "task_id", "status", "status_url", "estimated_time"],
        "properties": {
            "message": {"type": "string"},
            "task_id": {"type": "integer"},
            "status": {"enum": list(STATES)},
            "status_url": {"type": "string"},
            "estimated_time": {"type": "number", "description": "seconds (a hint)"},
            "created_at": _TIME,
        },
    },
)
ACCEPTED_HEADERS = {
    "Location": {"schema": {"type": "string"}, "description": "the status URL"},
    "Retry-After": {"schema": {"type": "integer"}, "description": "seconds before polling"},
}
# What _task() answers: the job's snapshot and its status URL.
TASK_SCHEMA = Schema(
    "Task",
    {
        "type": "object",
        "required": ["task_id", "kind", "status", "progress", "attempts", "created_at", "status_url"],
        "properties": {
            "task_id": {"type": "integer"},
            "kind": {"type": "string"},
            "status": {"enum": list(STATES)},
            "progress": {
                "type": "object",
                "properties": {
                    "done": {"type": "integer"},
                    "total": {"type": ["integer", "null"]},
                    "message": {"type": ["string", "null"]},
                },
            },
            "result": {"description": "present when completed"},
            "error": {"type": ["string", "null"]},
            "attempts": {"type": "integer"},
            "max_attempts": {"type": "integer"},
            "cancel_requested": {"type": "boolean"},
            "status_url": {"type": "string"},
            "created_at": _TIME,
            "updated_at": _TIME,
            "started_at": _TIME_OR_NULL,
            "finished_at": _TIME_OR_NULL,
            "run_after": _TIME,
        },
    },
)
TASK_PAGE = Schema(
    "TaskPage",
    {
        "type": "object",
        "required": ["items", "limit", "next"],
        "properties": {
            "items": {"type": "array", "items": TASK_SCHEMA},
            "limit": {"type": "integer"},
            "next": {"type": ["string", "null"]},
        },
    },
)
IDEMPOTENCY_KEY = header(
    "Idempotency-Key",
    "the same key (from the same API key) returns the same task, never a second one; "
    "keys are per API key: another key's use of the same value makes a task of its own",
    {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
)
# list_tasks()
PAGE_QUERY: tuple[Param, ...] = (
    query("state", schema={"enum": list(STATES)}),
    query("after", "return tasks with an id greater than this", {"type": "integer", "minimum": 0}),
    query(
        "limit", f"page size (default {PAGE_DEFAULT}, at most {PAGE_MAX})", {"type": "integer", "minimum": 1}
    ),
)
# The fields _fields() reads from the query, as the old clients send them.
_DAYS = f"{bounds.DATE_MIN.isoformat()} to {bounds.DATE_MAX.isoformat()}"
NOTIFICATION_QUERY: tuple[Param, ...] = (
    query("recipient", "email address (old clients send the fields as query parameters)"),
    query("subject", "subject line"),
    query("content", "plain-text body"),
)
REPORT_QUERY: tuple[Param, ...] = (
    query("report_type", " or ".join(kinds.REPORT_TYPES)),
    query("user_id", "the user (user-activity)"),
    query("start", f"first day (signups, YYYY-MM-DD, {_DAYS})"),
    query("end", "last day (signups, YYYY-MM-DD, same range, at most 10 years after start)"),
)


def _fields_body(schema: Schema) -> Body:
    """What _fields() reads over the query: an object in a body read_body reads, or a form."""
    problem = "body is not JSON, msgpack, YAML or a form, or a Content-Encoding that is not decoded"
    types = (*bodies.BODY_TYPES, *FORM_TYPES)
    return Body({media: schema for media in types}, required=False, errors={415: problem})


NOTIFICATION_BODY = _fields_body(kinds.NOTIFICATION)
REPORT_BODY = _fields_body(kinds.REPORT_REQUEST)
# What bulk_process() reads: its own body reader, its own limits.
BULK_BODY = Body(
    {
        "application/json": {"type": "array", "items": USER_CREATE},
        _CSV: {**STRING, "description": "header row name,email"},
    },
    errors={
        400: "missing or malformed body",
        413: "more records than jobs.bulk_max_rows, or a body beyond jobs.bulk_max_size",
        415: "body is neither JSON nor CSV",
        422: "no records, or a bad Idempotency-Key",
    },
)


def viewer(request: web.Request) -> Viewer:
    """Whose tasks the caller may see: its key family's, every task with `admin`, the unowned
    ones when it calls without a key (an open route)."""
    return Viewer.of(request.get(PRINCIPAL))


def _status_url(request: web.Request, job_id: int) -> str:
    return str(request.app.router["task_status"].url_for(task_id=str(job_id)))


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.match(key):
        raise ValidationFailed(
            [{"field": "Idempotency-Key", "message": f"1-{IDEMPOTENCY_KEY_MAX} visible ASCII characters"}],
            "bad Idempotency-Key header",
        )
    return key


async def _fields(request: web.Request) -> dict[str, Any]:
    """Query parameters (what the old clients send), overlaid by a JSON/msgpack/YAML or form body."""
    fields: dict[str, Any] = {k: v for k, v in request.query.items() if k not in ("format", "pretty")}
    if not request.body_exists:
        return fields
    if request.content_type in FORM_TYPES:
        fields.update(await read_form(request))
        return fields
    # an empty body beside query parameters is what the old clients send
    body = await read_body(request, empty=_NO_BODY)
    if body is _NO_BODY:
        return fields
    if not isinstance(body, Mapping):
        detail = "the body must be an object"
        raise ValidationFailed([{"field": "", "message": detail}], detail)
    fields.update(body)
    return fields


async def _accepted(
    request: web.Request, media: str, kind: str, payload: Mapping[str, Any], estimate: float
) -> web.Response:
    key = _idempotency_key(request)
    principal = request.get(PRINCIPAL)
    owner = None if principal is None else principal.owner
    job, created = await request.app[JOBS].enqueue(kind, payload, idempotency_key=key, owner=owner)
    url = _status_url(request, job.id)
    body = {
        "message": f"{kind.replace('_', ' ')} accepted" if created else "already accepted (Idempotency-Key)",
        "task_id": job.id,
        "status": job.state,
        "status_url": url,
        "estimated_time": estimate,
        "created_at": job.created_at,
    }
    headers = {"Location": url, "Retry-After": "1"}
    return represent(request, body, TASK, status=202 if created else 200, headers=headers, media=media)


async def send_notification(request: web.Request) -> web.Response:
    media = negotiate(request)
    payload = kinds.validate_notification(await _fields(request))
    return await _accepted(request, media, "send_notification", payload, _ESTIMATE["send_notification"])


async def generate_report(request: web.Request) -> web.Response:
    media = negotiate(request)
    payload = await kinds.validate_report(request.app[DB], await _fields(request))
    return await _accepted(request, media, "generate_report", payload, _ESTIMATE["generate_report"])


async def bulk_process(request: web.Request) -> web.Response:
    media = negotiate(request)
    config = request.app[CONFIG]
    max_rows = config.jobs.bulk_max_rows
    ctype = request.content_type if "Content-Type" in request.headers else "application/json"
    if ctype not in ("application/json", _CSV):
        raise web.HTTPUnsupportedMediaType(
            text=f"send a JSON array or text/csv, not {ctype}",
            headers={"Accept-Post": f"application/json, {_CSV}"},
        )
    body = await read_limited(request, config.jobs.bulk_max_size, "jobs.bulk_max_size")
    if not body.strip():
        raise web.HTTPBadRequest(text="a request body is required")
    try:
        if ctype == _CSV and len(body) > bodies.CSV_INLINE_MAX:  # Python per row: off the loop
            records: list[Any] = await request.app[PARSER_PROCESS].csv(body, max_rows)
        else:  # orjson: ~8 ms for 2 MiB of records, in C (a thread would not free the loop)
            limits = kinds.bulk_limits(max_rows, body_limits(request))
            records = kinds.parse_bulk(ctype, body, max_rows, limits)
    except bodies.BodyTooLarge as exc:
        raise PayloadTooLarge(str(exc)) from None
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    except ParserUnavailable as exc:
        raise Unavailable(str(exc)) from None
    if len(records) > max_rows:
        detail = f"more than {max_rows} records (jobs.bulk_max_rows)"
        raise PayloadTooLarge(detail, extra={"max_rows": max_rows})
    if not records:
        raise ValidationFailed([{"field": "", "message": "no records"}], "no records to import")
    estimate = round(0.5 + len(records) / 20000, 1)
    return await _accepted(request, media, "bulk_process", {"records": records}, estimate)


def _task(request: web.Request, job: Job) -> dict[str, Any]:
    snap = job.snapshot()
    snap["status_url"] = _status_url(request, job.id)
    return snap


async def task_status(request: web.Request) -> web.Response:
    job = await request.app[JOBS].get(path_id(request, "task_id", "task"), viewer(request))
    headers = {} if job.state in ("completed", "failed", "cancelled") else {"Retry-After": "1"}
    return represent(request, _task(request, job), TASK, headers=headers)


async def cancel_task(request: web.Request) -> web.Response:
    job_id = path_id(request, "task_id", "task")
    media = negotiate(request)
    job = await request.app[JOBS].cancel(job_id, viewer(request))
    # 200: cancelled now; 202: cancellation asked for, the job stops at its next progress point
    status = 200 if job.state == "cancelled" else 202
    return represent(request, _task(request, job), TASK, status=status, media=media)


async def list_tasks(request: web.Request) -> web.Response:
    state = request.query.get("state") or None
    if state is not None and state not in STATES:
        raise ValidationFailed([{"field": "state", "message": f"must be one of {', '.join(STATES)}"}])
    after = query_int(request, "after", 0, minimum=0, maximum=2**63 - 1)
    limit = query_int(request, "limit", PAGE_DEFAULT, minimum=1, maximum=PAGE_MAX)
    jobs = await request.app[JOBS].page(viewer(request), state, after, limit)
    items = [_task(request, j) for j in jobs]
    next_url = None
    headers = {}
    if len(items) == limit:
        query = {"after": str(jobs[-1].id), "limit": str(limit), **({"state": state} if state else {})}
        next_url = page_link(request, "tasks", **query)
        headers["Link"] = f'<{next_url}>; rel="next"'
    page = {"items": items, "limit": limit, "next": next_url}
    return await represent_rows(request, page, TASKS, len(items), headers=headers)


async def get_report(request: web.Request) -> web.Response:
    report_id = path_id(request, "report_id", "report")
    report = await kinds.get_report(request.app[DB], report_id, viewer(request))
    return await represent_rows(request, report, REPORT, len(report.get("rows") or ()))
