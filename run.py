"""hotpath command line: serve (default), worker or migrate.

python run.py [serve] [--host H] [--port P] [--config PATH]
python run.py worker [--config PATH]      background jobs only, no HTTP listener
python run.py migrate [--config PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from server.config import Config, ConfigError, load_config, mask_url

log = logging.getLogger("hotpath")

EXIT_CONFIG = 2
EXIT_STARTUP = 1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run.py", description="hotpath API server")
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "migrate", "worker"))
    parser.add_argument("--config", default=None, help="path to a config.toml (default: the project's)")
    parser.add_argument("--host", default=None, help="listen address (overrides server.host)")
    parser.add_argument("--port", default=None, help="listen port (overrides server.port)")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    server: dict[str, Any] = {}
    if args.host is not None:
        server["host"] = args.host
    if args.port is not None:
        try:
            server["port"] = int(args.port)
        except ValueError:
            raise ConfigError("--port", f"expected an integer, got {args.port!r}") from None
    return load_config(args.config, overrides={"server": server} if server else None)


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed (Linux, macOS), the stock loop elsewhere."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def access_logger() -> logging.Logger:
    """`hotpath.access`: bare JSON lines on stderr, not mixed into the application log's format."""
    from server.accesslog import BufferedLineHandler

    logger = logging.getLogger("hotpath.access")
    handler = BufferedLineHandler(sys.stderr.fileno())
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def serve(config: Config) -> int:
    from aiohttp import web

    from server.accesslog import JsonAccessLogger
    from server.app import create_app
    from server.embedded import EmbeddedError, EmbeddedServices
    from server.errors import StartupError

    # Until run_app installs its own handlers, SIGTERM unwinds through `finally` like
    # Ctrl-C does, so embedded servers that were started are stopped.
    signal.signal(signal.SIGTERM, _raise_exit)
    embedded: EmbeddedServices | None = None
    try:
        if config.embedded_mode:
            started = time.perf_counter()
            embedded = EmbeddedServices(config.embedded_data_dir)
            try:
                db_url, redis_url = embedded.start()
            except EmbeddedError as exc:
                log.error("%s", exc)
                return EXIT_STARTUP
            config = dataclasses.replace(
                config,
                database=dataclasses.replace(config.database, url=db_url),
                redis=dataclasses.replace(config.redis, url=redis_url),
            )
            log.info(
                "embedded PostgreSQL and Redis ready in %.2f s (data in %s)",
                time.perf_counter() - started,
                config.embedded_data_dir,
            )
        srv = config.server
        listening = (
            f"hotpath listening on http://{srv.host}:{srv.port} "
            f"(database {mask_url(config.database.url)}, redis {mask_url(config.redis.url)}"
            f"{', embedded' if embedded else ''})"
        )
        loop = new_loop()
        asyncio.set_event_loop(loop)
        try:
            web.run_app(
                create_app(config),
                host=srv.host,
                port=srv.port,
                shutdown_timeout=srv.shutdown_timeout,
                access_log=access_logger() if srv.access_log else None,
                access_log_class=JsonAccessLogger,
                print=lambda *_: log.info("%s", listening),
                loop=loop,
            )
        except StartupError as exc:
            log.error("%s", exc)
            return EXIT_STARTUP
        except ConfigError as exc:  # found while assembling (e.g. a policy naming no route)
            log.error("configuration error: %s", exc)
            return EXIT_CONFIG
        except OSError as exc:
            log.error("cannot listen on %s:%s: %s", srv.host, srv.port, exc.strerror or exc)
            return EXIT_STARTUP
        return 0
    finally:
        if embedded is not None:
            embedded.stop()
            log.info("embedded PostgreSQL and Redis stopped")


def migrate(config: Config) -> int:
    import asyncpg

    from server.embedded import EmbeddedServices
    from server.errors import StartupError
    from server.migrations import MigrationError, apply_migrations
    from server.resources import retry_until

    async def run(url: str) -> list[int]:
        async def connect() -> asyncpg.Connection:
            return await asyncpg.connect(url)

        conn = await retry_until(
            f"PostgreSQL at {mask_url(url)}",
            connect,
            (OSError, asyncpg.CannotConnectNowError),
            config.database.start_timeout,
        )
        try:
            return await apply_migrations(conn)
        finally:
            await conn.close()

    signal.signal(signal.SIGTERM, _raise_exit)
    embedded = EmbeddedServices(config.embedded_data_dir) if config.embedded_mode else None
    try:
        url = embedded.start()[0] if embedded else config.database.url
        loop = new_loop()
        try:
            applied = loop.run_until_complete(run(url))
        finally:
            loop.close()
    except (StartupError, MigrationError) as exc:
        log.error("%s", exc)
        return EXIT_STARTUP
    finally:
        if embedded is not None:
            embedded.stop()
    log.info("migrations applied: %s", ", ".join(f"{v:03d}" for v in applied) if applied else "none pending")
    return 0


def worker(config: Config) -> int:
    """Run jobs only (jobs.concurrency at a time) until SIGTERM or Ctrl-C, then shut down
    gracefully: stop claiming, let running jobs finish up to jobs.shutdown_timeout, hand back the rest."""
    from aiohttp import web

    from server.app import create_worker_app
    from server.embedded import EmbeddedError, EmbeddedPostgres
    from server.errors import StartupError

    if config.jobs.concurrency < 1:
        log.error("configuration error: jobs.concurrency: must be >= 1 for run.py worker")
        return EXIT_CONFIG

    async def run(cfg: Config) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        runner = web.AppRunner(create_worker_app(cfg), handle_signals=False)
        await runner.setup()  # opens the cleanup contexts: pool, migrations, job runner
        try:
            log.info(
                "hotpath worker running %d jobs at a time (database %s)",
                cfg.jobs.concurrency,
                mask_url(cfg.database.url),
            )
            await stop.wait()
            log.info("worker stopping: finishing running jobs")
        finally:
            await runner.cleanup()

    signal.signal(signal.SIGTERM, _raise_exit)
    # Embedded mode: PostgreSQL only (a worker needs no Redis). The cluster under the data dir
    # is shared with a `run.py` already running there and stopped by whichever leaves last.
    embedded: EmbeddedPostgres | None = None
    try:
        if config.embedded_mode:
            embedded = EmbeddedPostgres(config.embedded_data_dir / "postgres")
            try:
                config.embedded_data_dir.mkdir(parents=True, exist_ok=True)
                embedded.start()
            except EmbeddedError as exc:
                log.error("%s", exc)
                return EXIT_STARTUP
            config = dataclasses.replace(
                config, database=dataclasses.replace(config.database, url=embedded.url)
            )
        loop = new_loop()
        try:
            loop.run_until_complete(run(config))
        except StartupError as exc:
            log.error("%s", exc)
            return EXIT_STARTUP
        finally:
            loop.close()
        return 0
    finally:
        if embedded is not None:
            embedded.stop()


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    args = parse_args(argv)
    try:
        config = build_config(args)
    except ConfigError as exc:
        print(f"hotpath: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logging.getLogger().setLevel(config.log.level)
    try:
        if args.command == "migrate":
            return migrate(config)
        if args.command == "worker":
            return worker(config)
        return serve(config)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
