"""A local upstream for the fan-out benchmark: /delay?ms=N answers after N ms, /mib a 1 MiB JSON body.

python bench/upstream.py --port 8099
"""

from __future__ import annotations

import argparse
import asyncio

import orjson
import uvloop
from aiohttp import web

_MIB = orjson.dumps({"blob": "x" * (1024 * 1024 - 12)})  # exactly 1 MiB of JSON


async def delay(request: web.Request) -> web.Response:
    await asyncio.sleep(int(request.query.get("ms", "100")) / 1000)
    return web.json_response({"ok": True, "i": request.query.get("i")})


async def mib(request: web.Request) -> web.Response:
    return web.Response(body=_MIB, content_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8099)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/delay", delay)
    app.router.add_get("/mib", mib)
    web.run_app(
        app, host="127.0.0.1", port=args.port, access_log=None, print=None, loop=uvloop.new_event_loop()
    )


if __name__ == "__main__":
    main()
