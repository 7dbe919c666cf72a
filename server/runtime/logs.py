"""Application log set-up: readable text for a terminal, or one JSON object per line."""

from __future__ import annotations

import logging
import os
import re
import sys

import orjson
from aiohttp.http_exceptions import HttpProcessingError

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# What the start of a refused request line or header, which aiohttp quotes in its message, may
# hold that no log may: a stream token in a query (?token=), a key or a shared token after a
# Bearer scheme, a hotpath key (hp_) or stream token (hps_) anywhere (a cookie, an alias header).
_SECRET_AFTER = re.compile(r"(?i)(token=|bearer\s+)[^\s&'\"]+")
_SECRET_KEY = re.compile(r"\b(hps?_)[A-Za-z0-9_.=-]+")


def redact(text: str) -> str:
    """`text` with the credentials it may quote replaced by "***"."""
    return _SECRET_KEY.sub(r"\1***", _SECRET_AFTER.sub(r"\1***", text))


class JsonLogFormatter(logging.Formatter):
    """{"ts", "level", "logger", "pid", "msg"[, "exc"]} per record, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process or os.getpid(),
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger on stderr (called again once the config is known)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs every request its parser refuses (bad request line, header, length...)
    at ERROR with a traceback, although it is the client's error and aiohttp has answered
    it with a 400 already. This filter, on the `aiohttp.server` logger, turns each into one
    INFO line without the traceback, at most one a second (a flood of them is one line a
    second, counting what it left out), so nobody can fill the log by sending garbage. What
    aiohttp quotes of the request (up to 100 bytes of a line too long) is redacted: a stream
    token in an over-long URL, or a key in an over-long header, was written to the log."""

    def __init__(self, interval: float = 1.0) -> None:
        super().__init__()
        self.interval = interval
        self._next = 0.0
        self._skipped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        if record.created < self._next:
            self._skipped += 1
            return False
        self._next = record.created + self.interval
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        reason = redact(" ".join(str(exc.message).split()))[:200] if exc.message else type(exc).__name__
        more = f" (+{self._skipped} more since the last line)" if self._skipped else ""
        self._skipped = 0
        record.msg, record.args = (
            "refused a malformed request from %s with %d: %s%s",
            (
                remote,
                exc.code,
                reason,
                more,
            ),
        )
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def quiet_malformed_requests() -> None:
    """Put one MalformedRequestFilter on aiohttp's server logger (once per process)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestFilter) for f in logger.filters):
        logger.addFilter(MalformedRequestFilter())
