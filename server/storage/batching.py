"""KeyBatcher: coalesce concurrent single-key lookups into one batched query.

Under load many requests for different ids arrive in the same event-loop pass. Instead of
one pool checkout and one round trip each, every key asked for during a pass is collected
and fetched with a single `WHERE id = ANY($1)` in the next pass. Concurrent requests for
the same key share one row. A request only joins a batch that has not been sent yet, so a
read that starts after a write has returned always sees that write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class KeyBatcher(Generic[K, V]):
    """Collects `load(key)` calls made in one loop pass and answers them with one `load_many`.

    `load_many(keys)` returns a mapping of the keys it found; missing keys resolve to None.
    Its exception reaches every caller of that batch. Each caller waits on a future of its
    own, so cancelling one request never cancels the batch or its other callers.
    """

    def __init__(
        self, load_many: Callable[[list[K]], Awaitable[Mapping[K, V]]], max_batch: int = 256
    ) -> None:
        self._load_many = load_many
        self._max_batch = max_batch
        self._pending: dict[K, list[asyncio.Future[V | None]]] = {}
        self._scheduled: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def load(self, key: K) -> V | None:
        if self._closed:
            raise RuntimeError("KeyBatcher is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[V | None] = loop.create_future()
        waiters = self._pending.get(key)
        if waiters is None:
            self._pending[key] = [fut]
            if len(self._pending) >= self._max_batch:
                self._dispatch()
            elif self._scheduled is None:
                self._scheduled = loop.call_soon(self._dispatch)
        else:
            waiters.append(fut)
        return await fut

    def _dispatch(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        batch, self._pending = self._pending, {}
        if batch:
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: dict[K, list[asyncio.Future[V | None]]]) -> None:
        try:
            found = await self._load_many(list(batch))
        except BaseException as exc:
            for waiters in batch.values():
                for fut in waiters:
                    if not fut.done():
                        fut.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for key, waiters in batch.items():
            value = found.get(key)
            for fut in waiters:
                if not fut.done():
                    fut.set_result(value)

    async def close(self) -> None:
        """Stop accepting keys, send what is pending, and wait for batches in flight."""
        self._closed = True
        if self._pending:
            self._dispatch()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
