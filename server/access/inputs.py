"""What an operator may ask of a key, checked the same way from the command line (run.py keys)
and over HTTP (handlers/admin.py): its name, scopes, expiry and rate, and a rotation's overlap.

Each check returns the clean value or raises InvalidInput naming the field; the HTTP side
gathers them into one ValidationFailed, the command line prints the message.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from server.access.scopes import SCOPES
from server.config import parse_rates

__all__ = [
    "DURATION_PATTERN",
    "EXPIRY_MAX",
    "NAME_MAX",
    "OVERLAP_MAX",
    "RATE_MAX",
    "InvalidInput",
    "check_name",
    "check_rate",
    "check_scopes",
    "describe",
    "parse_duration",
    "parse_expiry",
    "parse_overlap",
    "scopes_from_text",
]

NAME_MAX = 100
RATE_MAX = 200
EXPIRY_MAX = timedelta(days=100 * 366)  # a key lives at most about a century
OVERLAP_MAX = 366 * 86400.0  # a rotated key keeps working at most a year beside its replacement
# A duration: a number and a unit (s, m, h, d, w); a bare number is seconds.
DURATION_PATTERN = r"^[0-9]{1,12}(\.[0-9]{1,6})?[smhdw]?$"
_DURATION = re.compile(DURATION_PATTERN)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# C0 and C1 controls, DEL and lone surrogates: nothing a name shown in a table should hold.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class InvalidInput(ValueError):
    """A value an operator gave that cannot be used; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def error(self) -> dict[str, str]:
        """The entry of a ValidationFailed's `errors`."""
        return {"field": self.field, "message": self.message}


def check_name(value: Any, field: str = "name") -> str:
    if not isinstance(value, str):
        raise InvalidInput(field, "must be a string")
    name = value.strip()
    if not 1 <= len(name) <= NAME_MAX:
        raise InvalidInput(field, f"must be 1 to {NAME_MAX} characters")
    if _CONTROL.search(name):
        raise InvalidInput(field, "must not contain control characters")
    if any(unicodedata.category(c) == "Cf" for c in name):  # RLO, zero-width space: spoofing
        raise InvalidInput(field, "must not contain invisible formatting characters")
    return name


def check_scopes(value: Any, field: str = "scopes") -> tuple[str, ...]:
    """At least one scope, every one of them known (server/access/scopes.py); repeats dropped."""
    if not isinstance(value, list | tuple) or not all(isinstance(s, str) for s in value):
        raise InvalidInput(field, "must be a list of scope names")
    scopes = tuple(dict.fromkeys(s.strip() for s in value if s.strip()))
    if not scopes:
        raise InvalidInput(field, f"name at least one scope: {', '.join(SCOPES)}")
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise InvalidInput(
            field, f"unknown scope(s) {', '.join(map(repr, unknown))}; scopes: {', '.join(SCOPES)}"
        )
    return scopes


def check_rate(value: Any, field: str = "rate") -> str | None:
    """A rate policy of the key's own ("1000/minute", "10/second, 500/hour"), or None."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(field, 'must be a rate such as "1000/minute"')
    rate = value.strip()
    if len(rate) > RATE_MAX:
        raise InvalidInput(field, f"must be at most {RATE_MAX} characters")
    try:
        parse_rates(rate)
    except ValueError as exc:
        raise InvalidInput(field, str(exc)) from None
    return rate


def parse_duration(value: Any, field: str) -> float:
    """Seconds from a number, or a text such as "90", "1.5h", "30d", "2w"."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidInput(field, "must be a number of seconds or a duration such as 1h or 30d")
    if isinstance(value, str):
        text = value.strip().lower()
        if not _DURATION.match(text):
            raise InvalidInput(field, f"{value!r} is not a duration such as 3600, 90m, 1h or 30d")
        unit = _UNITS.get(text[-1])
        seconds = float(text[:-1]) * unit if unit is not None else float(text)
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidInput(field, "must be zero or more seconds")
    return seconds


def parse_expiry(value: Any, field: str = "expires_at", now: datetime | None = None) -> datetime | None:
    """When a key stops working: an ISO 8601 date-time (without a zone: UTC), or a duration
    from now ("30d", "12h"); None stays None (never expires). It must lie in the future."""
    if value is None:
        return None
    now = now or datetime.now(UTC)
    if not isinstance(value, str):
        raise InvalidInput(field, "must be an ISO 8601 date-time or a duration such as 30d")
    text = value.strip()
    if _DURATION.match(text.lower()):
        seconds = parse_duration(text, field)
        if seconds <= 0 or seconds > EXPIRY_MAX.total_seconds():
            raise InvalidInput(field, f"must be more than 0 s and at most {EXPIRY_MAX.days} days from now")
        return now + timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(
            field, f"{value!r} is neither an ISO 8601 date-time (2027-01-31T12:00:00Z) nor a duration (30d)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if when <= now:
        raise InvalidInput(field, "must be in the future")
    if when - now > EXPIRY_MAX:
        raise InvalidInput(field, f"must be at most {EXPIRY_MAX.days} days from now")
    return when


def parse_overlap(value: Any, field: str = "overlap") -> float:
    """How long a rotated key keeps working beside its replacement, in seconds."""
    seconds = parse_duration(value, field)
    if seconds > OVERLAP_MAX:
        raise InvalidInput(field, f"must be at most {OVERLAP_MAX:g} seconds (a year)")
    return seconds


def scopes_from_text(text: str, field: str = "--scopes") -> tuple[str, ...]:
    """The scopes of a comma-separated list ("users:read,jobs")."""
    return check_scopes(text.split(","), field)


def describe(scopes: Iterable[str]) -> list[dict[str, str]]:
    """Each scope with what it allows."""
    return [{"name": s, "allows": SCOPES[s]} for s in scopes]
