"""Start-up retries: wait for a server that is down, starting or briefly refusing."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from server.errors import StartupError

log = logging.getLogger("hotpath.resources")

T = TypeVar("T")


async def retry_until(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    transient: tuple[type[BaseException], ...],
    timeout: float,
) -> T:
    """Call `attempt` until it succeeds, backing off 0.1 s → 2 s, for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.1
    warned = False
    while True:
        try:
            return await attempt()
        except transient as exc:
            remaining = deadline - time.monotonic()
            reason = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
            if remaining <= 0:
                raise StartupError(f"cannot reach {what}: {reason} (gave up after {timeout:g} s)") from None
            if not warned:
                log.warning("waiting for %s: %s (retrying for up to %g s)", what, reason, timeout)
                warned = True
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 2.0)
        except Exception as exc:
            raise StartupError(f"cannot use {what}: {type(exc).__name__}: {exc}") from None
