"""The floor: a bare aiohttp app (uvloop, orjson body, no middleware, no access log).

Every hotpath speed figure is quoted as a ratio to this app's req/s measured in the same run.

    python bench/floor.py --port 8081
"""

from __future__ import annotations

import argparse

import orjson
import uvloop
from aiohttp import web


async def json_handler(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps({"message": "Hello, World!"}), content_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/json", json_handler)
    web.run_app(
        app, host=args.host, port=args.port, access_log=None, print=None, loop=uvloop.new_event_loop()
    )


if __name__ == "__main__":
    main()
