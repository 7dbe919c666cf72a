"""The sliding windows in Redis: every check of one event-loop pass in one EVALSHA.

A caller's requests under one policy are a Redis sorted set of their times (microseconds from
Redis `TIME`, so hosts with skewed clocks agree), kept for the policy's longest window; each
window counts the members inside it, which makes "at most N in any W seconds" exact rather
than approximate. All checks made during one loop pass go to Redis together: one call
of sliding_window.lua (beside this module), which handles them in arrival order, atomically.
Exactness is kept (the script sees every earlier check of the batch), and under load a process
pays one round trip for many requests instead of one each.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
from importlib import resources

from server.ratelimit.policy import Decision, Policy
from server.ratelimit.resp import RespConnection

KEY_PREFIX = "hotpath:v1:rl"

# Read once at import, from the package directory (hotpath runs from its checkout).
SLIDING_WINDOW_LUA = resources.files("server.ratelimit").joinpath("sliding_window.lua").read_text("utf-8")
_SLIDING_WINDOW_SHA = hashlib.sha1(SLIDING_WINDOW_LUA.encode()).hexdigest()


class RedisWindows:
    """Coalesces the checks of one loop pass into one EVALSHA (see the module docstring)."""

    def __init__(self, conn: RespConnection, max_batch: int = 32) -> None:
        self._conn = conn
        self._sha = _SLIDING_WINDOW_SHA
        self._max_batch = max_batch
        self._pending: list[tuple[str, Policy, asyncio.Future[Decision]]] = []
        self._scheduled: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._token_prefix = os.urandom(6).hex()
        self._calls = itertools.count()
        # per policy, the arguments that describe it to the script, built once
        self._spec: dict[Policy, list[str | int]] = {}
        self.batches = 0
        self.checks = 0

    def _policy_args(self, policy: Policy) -> list[str | int]:
        spec = self._spec.get(policy)
        if spec is None:
            spec = [f"{KEY_PREFIX}:{policy.name}:", len(policy.windows)]
            for w in policy.windows:
                spec += [w.limit, w.seconds]
            self._spec[policy] = spec
        return spec

    async def check(self, identity: str, policy: Policy) -> Decision:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Decision] = loop.create_future()
        self._pending.append((identity, policy, fut))
        if len(self._pending) >= self._max_batch:
            self._dispatch()
        elif self._scheduled is None:
            self._scheduled = loop.call_soon(self._dispatch)
        return await fut

    def _dispatch(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[str, Policy, asyncio.Future[Decision]]]) -> None:
        index: dict[Policy, str] = {}
        args: list[str | int] = [f"{self._token_prefix}{next(self._calls):x}", 0]
        lines: list[str] = []
        for identity, policy, _ in batch:
            prefix = index.get(policy)
            if prefix is None:
                prefix = index[policy] = f"{len(index) + 1} "
                args += self._policy_args(policy)
            lines.append(prefix + identity)
        args[1] = len(index)
        args.append("\n".join(lines))
        try:
            raw = await self._conn.evalsha(self._sha, SLIDING_WINDOW_LUA, *args)
        except BaseException as exc:
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self.batches += 1
        self.checks += len(batch)
        for n, (_, policy, fut) in enumerate(batch):
            allowed, window, remaining, reset_us, retry_us = raw[5 * n : 5 * n + 5]
            if not fut.done():
                fut.set_result(
                    Decision(
                        bool(allowed),
                        policy,
                        policy.windows[window],
                        remaining,
                        reset_us / 1e6 if reset_us > 0 else 0.0,
                        retry_us / 1e6 if retry_us > 0 else 0.0,
                    )
                )

    async def close(self) -> None:
        if self._pending:
            self._dispatch()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._conn.close()
