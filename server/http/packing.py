"""msgpack with the types hotpath's values carry: datetime, date, Decimal and UUID.

One codec for the cache's stored values (server/cache/entry.py) and for the bodies the parser process
hands back (server/http/parser_process.py). It imports nothing of hotpath's, so the parser process
starts without the cache's dependencies.
"""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import msgpack

__all__ = ["pack", "unpack"]

_EXT_DATETIME = 1
_EXT_DATE = 2
_EXT_DECIMAL = 3
_EXT_UUID = 4


def _default(obj: Any) -> msgpack.ExtType:
    # datetime before date: datetime is a subclass of date
    if isinstance(obj, dt.datetime):
        return msgpack.ExtType(_EXT_DATETIME, obj.isoformat().encode())
    if isinstance(obj, dt.date):
        return msgpack.ExtType(_EXT_DATE, obj.isoformat().encode())
    if isinstance(obj, Decimal):
        return msgpack.ExtType(_EXT_DECIMAL, str(obj).encode())
    if isinstance(obj, uuid.UUID):
        return msgpack.ExtType(_EXT_UUID, obj.bytes)
    raise TypeError(f"cannot cache a value of type {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_DATETIME:
        return dt.datetime.fromisoformat(data.decode())
    if code == _EXT_DATE:
        return dt.date.fromisoformat(data.decode())
    if code == _EXT_DECIMAL:
        return Decimal(data.decode())
    if code == _EXT_UUID:
        return uuid.UUID(bytes=data)
    raise ValueError(f"unknown msgpack extension type {code}")


def pack(value: Any) -> bytes:
    """msgpack bytes of `value` (TypeError for types this codec does not know; tuples become lists)."""
    return msgpack.packb(value, default=_default, use_bin_type=True, datetime=False)  # type: ignore[no-any-return]


def unpack(data: bytes) -> Any:
    """The value `pack` was given (lists for tuples)."""
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
