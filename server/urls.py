"""Database and Redis URLs: choose another database in one, and hide its password.

Rebuilt as text, never with urllib's urlunsplit: on Python 3.11 that drops the `//` of an
empty authority, so `unix:///run/redis.sock` came back as `unix:/run/redis.sock` (which
redis-py refuses) and `postgresql://u@/db?host=/run` lost its socket form.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit

__all__ = ["mask_url", "with_database"]

# Query parameters that would override the database a URL's path names.
_PATH_DB_OVERRIDES = {
    "redis": ("db",),
    "rediss": ("db",),
    "postgres": ("dbname", "database"),
    "postgresql": ("dbname", "database"),
}


def with_database(url: str, database: str | int) -> str:
    """`url` with its database replaced by `database`, everything else kept as written.

    - `redis://` and `rediss://`: the path (`/N`), a number 0..15 on a stock server;
    - `unix://` (Redis on a socket): the `db` query parameter (the path is the socket);
    - `postgresql://` and `postgres://`: the path, with a TCP host or with an empty one and
      `?host=/socket/dir`.

    A query parameter that would override the path (`db=`, `dbname=`, `database=`) is dropped.
    Raises ValueError for any other scheme or a URL without `//`.
    """
    scheme, sep, rest = url.partition("://")
    key = scheme.lower()
    if not sep or (key not in _PATH_DB_OVERRIDES and key != "unix"):
        raise ValueError(f"not a Redis or PostgreSQL URL: {mask_url(url)}")
    rest, hash_sign, fragment = rest.partition("#")
    location, _, query = rest.partition("?")
    name = str(database)
    if key in ("redis", "rediss") and not name.isdigit():
        raise ValueError(f"a Redis database is a number, not {name!r}")
    params = [p for p in query.split("&") if p]
    if key == "unix":
        params = [p for p in params if p.partition("=")[0] != "db"] + [f"db={name}"]
    else:
        params = [p for p in params if p.partition("=")[0] not in _PATH_DB_OVERRIDES[key]]
        location = f"{location.partition('/')[0]}/{quote(name, safe='')}"
    out = f"{scheme}://{location}"
    if params:
        out += "?" + "&".join(params)
    return out + hash_sign + fragment


def mask_url(url: str) -> str:
    """The URL with its password replaced by ***, for logs and errors."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable url>"
    if not password:
        return url
    # the authority is the text right after "://", exactly as urlsplit cut it
    scheme, _, rest = url.partition("://")
    host = parts.netloc.rpartition("@")[2]
    return f"{scheme}://{parts.username or ''}:***@{host}{rest[len(parts.netloc) :]}"
