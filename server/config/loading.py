"""Load config.toml plus environment overrides into the frozen dataclasses of
server/config/sections.py, checking every value's type, range and choices, then the
settings that depend on each other."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from server.config.sections import DEFAULT_CONFIG_PATH, FEED_CHANNELS, Config
from server.urls import mask_url

ENV_PREFIX = "HOTPATH_"


class ConfigError(Exception):
    """A setting is missing, unknown, of the wrong type or out of range."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


# The rate grammar of ratelimit policies ("100/hour, 10/minute", "5/30s"): parsed here so a
# bad policy stops the process at load; server/ratelimit builds its windows from the result.
_PERIODS = {
    "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}  # fmt: skip
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*$")
# Bounds of one window: beyond them a key's rate (keys create --rate, POST /admin/keys) made
# every request of that key a 500 (a limit past 64 bits in rate_info), or the sliding-window
# script fail in Redis (a window of 10^12 days), which put the process's limits for everyone
# on the local fallback, again at each request of that key.
RATE_LIMIT_MAX = 1_000_000_000
RATE_PERIOD_MAX = 366 * 86400


def parse_rates(text: str) -> list[tuple[int, int]]:
    """ "100/hour, 10/minute" → [(limit, seconds), ...] in the written order. Raises ValueError."""
    rates = []
    for part in text.split(","):
        match = _RATE.match(part.lower())
        if match is None or match.group(3) not in _PERIODS:
            raise ValueError(f"{part.strip()!r} is not a rate like 100/hour or 5/30s")
        limit = int(match.group(1))
        seconds = int(match.group(2) or 1) * _PERIODS[match.group(3)]
        if limit < 1 or seconds < 1:
            raise ValueError(f"{part.strip()!r}: limit and period must be positive")
        if limit > RATE_LIMIT_MAX or seconds > RATE_PERIOD_MAX:
            raise ValueError(
                f"{part.strip()!r}: at most {RATE_LIMIT_MAX:,} requests in a window of at most 366 days"
            )
        rates.append((limit, seconds))
    if not rates:
        raise ValueError("a policy needs at least one window")
    return rates


_SECTION_TYPES: dict[str, type[Any]] = {
    f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)
}


def _coerce(key: str, value: Any, target: Any, from_env: bool) -> Any:
    """Check (or, for environment strings, parse) one value against its declared type."""
    if isinstance(target, types.UnionType):  # pragma: no cover - no optional settings yet
        target = next(t for t in typing.get_args(target) if t is not type(None))
    if target is bool:
        if from_env and isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(key, f"expected a boolean (true/false), got {value!r}")
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected a boolean, got {type(value).__name__} {value!r}")
    if target is int:
        if from_env and isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise ConfigError(key, f"expected an integer, got {value!r}") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected an integer, got {type(value).__name__} {value!r}")
    if target is float:
        if from_env and isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise ConfigError(key, f"expected a number, got {value!r}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(key, f"expected a number, got {type(value).__name__} {value!r}")
    if target is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {type(value).__name__} {value!r}")
    origin = typing.get_origin(target)
    if origin in (tuple, dict):
        if from_env and isinstance(value, str):
            # non-scalar settings come from the environment as TOML values:
            # HOTPATH_RATELIMIT_EXEMPT='["health", "ready"]'
            try:
                value = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                raise ConfigError(
                    key, f"expected a TOML {'array' if origin is tuple else 'inline table'}"
                ) from None
        if origin is tuple and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        if origin is dict and isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
            return dict(value)
        if origin is dict and typing.get_args(target)[1] is not str and isinstance(value, dict):
            return _coerce_tables(key, value)
        want = "an array of strings" if origin is tuple else "a table of strings"
        raise ConfigError(key, f"expected {want}, got {type(value).__name__} {value!r}")
    raise ConfigError(key, f"unsupported setting type {target!r}")  # pragma: no cover


def _coerce_tables(key: str, value: dict[str, Any]) -> dict[str, dict[str, float]]:
    """A table of tables of non-negative numbers: cache.routes = { user = { ttl = 30, grace = 5 } }."""
    out: dict[str, dict[str, float]] = {}
    for name, table in value.items():
        if not isinstance(table, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in table.values()
        ):
            raise ConfigError(f"{key}.{name}", f"expected a table of non-negative numbers, got {table!r}")
        out[name] = {k: float(v) for k, v in table.items()}
    return out


def _check_constraints(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise ConfigError(key, f"must be >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(key, f"must be <= {hi}, got {value!r}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(key, f"must be one of {', '.join(choices)}, got {value!r}")


def _build_section(name: str, raw: Mapping[str, Any], from_env: set[str]) -> Any:
    cls = _SECTION_TYPES[name]
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{name}.{key}"
        if key not in known:
            raise ConfigError(full, f"unknown setting (known: {', '.join(sorted(known))})")
        coerced = _coerce(full, value, hints[key], full in from_env)
        _check_constraints(full, coerced, known[key].metadata)
        values[key] = coerced
    return cls(**values)


def _validate_whole(config: Config) -> None:
    db = config.database
    if db.min_size > db.max_size:
        raise ConfigError("database.min_size", f"must be <= database.max_size ({db.max_size})")
    if config.users.default_limit > config.users.max_limit:
        raise ConfigError("users.default_limit", f"must be <= users.max_limit ({config.users.max_limit})")
    if config.products.default_limit > config.products.max_limit:
        raise ConfigError(
            "products.default_limit", f"must be <= products.max_limit ({config.products.max_limit})"
        )
    for key, url, schemes in (
        ("database.url", db.url, ("postgres", "postgresql")),
        ("redis.url", config.redis.url, ("redis", "rediss", "unix")),
    ):
        if url and urlsplit(url).scheme not in schemes:
            raise ConfigError(key, f"scheme must be one of {', '.join(schemes)}: {mask_url(url)}")
    rl = config.ratelimit
    for name, text in [*rl.policies.items(), *([("default", rl.default)] if rl.default.strip() else [])]:
        try:
            parse_rates(text)
        except ValueError as exc:
            key = (
                "ratelimit.default"
                if name == "default" and text == rl.default
                else f"ratelimit.policies.{name}"
            )
            raise ConfigError(key, str(exc)) from None
    for cidr in rl.trusted_proxies:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError("ratelimit.trusted_proxies", f"{cidr!r} is not an IP network") from None
    for coding in config.compression.order:
        if coding not in ("gzip", "br", "zstd"):
            raise ConfigError("compression.order", f"{coding!r} is not one of gzip, br, zstd")
    for route, policy in config.cache.routes.items():
        unknown = sorted(set(policy) - {"ttl", "grace", "max_age"})
        if unknown or policy.get("ttl", 0) <= 0:
            why = f"unknown {', '.join(unknown)}" if unknown else "needs ttl > 0"
            raise ConfigError(f"cache.routes.{route}", f"{why} (keys: ttl, grace, max_age)")
    for channel in config.feed.private_channels:
        if channel not in FEED_CHANNELS:
            raise ConfigError(
                "feed.private_channels", f"{channel!r} is not one of {', '.join(FEED_CHANNELS)}"
            )
    auth = config.auth
    if auth.stream_token_ttl > auth.stream_token_max_ttl:
        raise ConfigError(
            "auth.stream_token_ttl", f"must be <= auth.stream_token_max_ttl ({auth.stream_token_max_ttl})"
        )
    cors = config.cors
    for origin in cors.allow_origins:
        parts = urlsplit(origin)
        if origin != "*" and (
            parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query
        ):
            raise ConfigError(
                "cors.allow_origins", f"{origin!r} is not an origin like https://app.example.com"
            )
    if cors.allow_credentials and "*" in cors.allow_origins:
        raise ConfigError("cors.allow_credentials", 'needs explicit origins, not "*"')
    if bool(db.url) != bool(config.redis.url):
        missing = "redis.url (REDIS_URL)" if db.url else "database.url (DATABASE_URL)"
        raise ConfigError(
            missing,
            "set both database and Redis URLs, or neither (then embedded servers are started)",
        )
    for kind, text in config.jobs.max_attempts.items():
        try:
            ok = int(text) >= 1
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"jobs.max_attempts.{kind}", f"expected an integer >= 1, got {text!r}")
    for kind, text in config.jobs.backoff_base.items():
        try:
            ok = float(text) >= 0
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"jobs.backoff_base.{kind}", f"expected a number of seconds >= 0, got {text!r}")


def _env_overrides(env: Mapping[str, str]) -> tuple[dict[str, dict[str, Any]], set[str]]:
    out: dict[str, dict[str, Any]] = {}
    touched: set[str] = set()
    if "DATABASE_URL" in env:
        out.setdefault("database", {})["url"] = env["DATABASE_URL"]
        touched.add("database.url")
    if "REDIS_URL" in env:
        out.setdefault("redis", {})["url"] = env["REDIS_URL"]
        touched.add("redis.url")
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        section = next((s for s in _SECTION_TYPES if rest.startswith(s + "_")), None)
        if section is None:
            raise ConfigError(var, f"unknown section (known: {', '.join(_SECTION_TYPES)})")
        key = rest[len(section) + 1 :]
        out.setdefault(section, {})[key] = value
        touched.add(f"{section}.{key}")
    return out, touched


def load_config(
    path: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Read `path` (default: the project's config.toml), apply environment and CLI overrides.

    Raises ConfigError naming the offending key on any invalid value.
    """
    file_path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        raw: dict[str, Any] = tomllib.loads(file_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("--config", f"file not found: {file_path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(file_path), f"not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(str(file_path), f"cannot read: {exc.strerror}") from None

    for section, body in raw.items():
        if section not in _SECTION_TYPES:
            raise ConfigError(section, f"unknown section (known: {', '.join(_SECTION_TYPES)})")
        if not isinstance(body, dict):
            raise ConfigError(section, "must be a table")

    env_values, from_env = _env_overrides(os.environ if env is None else env)
    merged: dict[str, dict[str, Any]] = {name: dict(raw.get(name, {})) for name in _SECTION_TYPES}
    for layer in (env_values, overrides or {}):
        for section, values in layer.items():
            merged[section].update(values)
    sections = {name: _build_section(name, merged[name], from_env) for name in _SECTION_TYPES}
    config = Config(**sections)
    _validate_whole(config)
    return config
