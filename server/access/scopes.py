"""Every scope a key can hold, with what it allows. Routes name theirs in server/routes.py; a
route's scopes are alternatives (a key needs one of them)."""

from __future__ import annotations

ADMIN = "admin"
READ = "read"
USERS_READ = "users:read"
USERS_WRITE = "users:write"
JOBS = "jobs"
FETCH = "fetch"
FEED_PUBLISH = "feed:publish"
METRICS = "metrics"

SCOPES: dict[str, str] = {
    READ: "public data when auth.public_reads is off (products, datasets, calculations, the ticker "
    "channel), and GET /protected-endpoint",
    USERS_READ: "read users, profiles and the export; the users feed channel",
    USERS_WRITE: "create, change and delete users",
    JOBS: "start background tasks (notifications, reports, bulk imports); read, follow and cancel "
    "its own tasks and read their reports; its own tasks on the feed",
    FETCH: "POST /process-urls (the server fetches URLs for you)",
    FEED_PUBLISH: "POST /events (publish on the feed)",
    METRICS: "GET /metrics and GET /cache/stats",
    ADMIN: "manage keys and read the audit log (/admin/...); read and cancel every task",
}


def unknown_scopes(scopes: list[str] | tuple[str, ...]) -> list[str]:
    return [s for s in scopes if s not in SCOPES]
