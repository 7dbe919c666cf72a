"""The expensive calculation: a real CPU-bound sum, run in an executor, cached per value."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from server.cache import cached
from server.http.operations import Schema


def sum_of_squares(value: int) -> int:
    """sum(i * i for i in range(value * 1000)), the figure old clients expect."""
    return sum(i * i for i in range(value * 1000))


# What expensive_calculation() returns.
CALCULATION = Schema(
    "Calculation",
    {
        "type": "object",
        "required": ["input", "result", "timestamp"],
        "properties": {
            "input": {"type": "integer"},
            "result": {"type": "integer"},
            "timestamp": {"type": "string", "format": "date-time"},
        },
    },
)


# The result of a value never changes, so it may live long; only the timestamp ages.
@cached("calc", ttl=3600.0)
async def expensive_calculation(value: int) -> dict[str, Any]:
    """{input, result, timestamp}; computed off the event loop (CPU-bound, up to ~0.1 s)."""
    result = await asyncio.get_running_loop().run_in_executor(None, sum_of_squares, value)
    return {"input": value, "result": result, "timestamp": dt.datetime.now(dt.UTC)}
