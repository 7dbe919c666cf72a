"""The ranges a client may choose for dates and instants, checked before any of them reaches SQL.

Why bounds at all: asyncpg sends `date.min` / `date.max` (0001-01-01, 9999-12-31) and the
matching datetimes as PostgreSQL's `-infinity` / `infinity`, and `generate_series` from or to
infinity never ends (it filled 8.8 GB of temporary files for three report requests). A datetime
with a UTC offset can also lie past Python's year 9999 once converted to UTC, which asyncpg
cannot encode at all (`9999-12-31T23:59:59-23:59`).

Why these: nothing hotpath stores predates the Unix epoch (rows are stamped `now()`, and the
users export already starts at the epoch when no `since` is given), and 2999-12-31 is far beyond
any calendar a report or an export is asked about while staying seven millennia short of the
values asyncpg turns into infinity. Inside the range every date and instant means itself in
Python, asyncpg and PostgreSQL alike.
"""

from __future__ import annotations

import datetime as dt

DATE_MIN = dt.date(1970, 1, 1)
DATE_MAX = dt.date(2999, 12, 31)
INSTANT_MIN = dt.datetime.combine(DATE_MIN, dt.time(), tzinfo=dt.UTC)
INSTANT_END = dt.datetime.combine(DATE_MAX + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)  # excluded
RANGE_TEXT = f"between {DATE_MIN.isoformat()} and {DATE_MAX.isoformat()}"


def date_in_range(value: dt.date) -> bool:
    return DATE_MIN <= value <= DATE_MAX


def utc_instant(value: dt.datetime) -> dt.datetime | None:
    """`value` in UTC (a naive value is taken as UTC), or None when it lies outside the range,
    including values that cannot be represented in UTC at all."""
    aware = value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
    try:
        utc = aware.astimezone(dt.UTC)
    except OverflowError:  # past 9999-12-31 or before 0001-01-01 once in UTC
        return None
    return utc if INSTANT_MIN <= utc < INSTANT_END else None
