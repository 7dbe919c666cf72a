"""Slow clients and the connection cap: `run()`, hotpath's `web.run_app` for one listening socket.

aiohttp cuts an idle keep-alive connection (`keepalive_timeout`) but has no deadline for a
request head or body that trickles in, and uvloop accepts every connection it is offered: when
descriptors run out, libuv accepts and closes the queued connections silently. So `run.py`
serves through `run()` here instead of `web.run_app`:

- `GuardedRequestHandler` (server/runtime/protocol.py, aiohttp's protocol) gives a request head
  `server.client_header_timeout` seconds and a request body `server.client_body_timeout`
  seconds (a 408), and aborts a client that reads nothing for `server.send_timeout`.
- `GuardedSite` (server/runtime/site.py) counts the connections of this worker and stops
  accepting at `server.max_connections`; when every worker is full, new connections get a
  pre-written 503 problem with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any

from aiohttp import web

from server.config import Config
from server.runtime.site import GuardedSite, connection_cap
from server.runtime.supervisor import Board

__all__ = ("run",)


async def _serve(
    app: web.Application,
    sock: socket.socket,
    config: Config,
    cap: int,
    board: Board | None,
    handler_kwargs: dict[str, Any],
    on_listening: Callable[[], None],
) -> None:
    srv = config.server
    runner = web.AppRunner(app, handle_signals=True, shutdown_timeout=srv.shutdown_timeout, **handler_kwargs)
    await runner.setup()
    site = GuardedSite(
        runner,
        sock,
        backlog=srv.backlog,
        cap=cap,
        header_timeout=srv.client_header_timeout,
        body_timeout=srv.client_body_timeout,
        handler_kwargs=handler_kwargs,
        board=board,
        send_timeout=srv.send_timeout,
    )
    try:
        await site.start()
        on_listening()
        await asyncio.get_running_loop().create_future()  # until SIGTERM/SIGINT cancels us
    finally:
        await runner.cleanup()


def run(
    app: web.Application,
    sock: socket.socket,
    config: Config,
    *,
    loop: asyncio.AbstractEventLoop,
    board: Board | None = None,
    access_log: logging.Logger | None = None,
    access_log_class: type[Any] | None = None,
    on_listening: Callable[[], None] = lambda: None,
) -> None:
    """`web.run_app` for one listening socket, through GuardedSite; returns after SIGTERM/SIGINT
    once in-flight requests finished (server.shutdown_timeout) and the app's cleanup ran."""
    handler_kwargs: dict[str, Any] = {
        "keepalive_timeout": config.server.keepalive_timeout,
        "access_log": access_log,
    }
    if access_log_class is not None:
        handler_kwargs["access_log_class"] = access_log_class
    cap = connection_cap(config)
    main = loop.create_task(_serve(app, sock, config, cap, board, handler_kwargs, on_listening))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            _cancel_remaining(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler(
                {
                    "message": "unhandled exception during shutdown",
                    "exception": task.exception(),
                    "task": task,
                }
            )
