"""hotpath command line: serve (default), worker, migrate or keys.

python run.py [serve] [--host H] [--port P] [--workers N|auto] [--config PATH]
python run.py worker [--config PATH]      background jobs only, no HTTP listener
python run.py migrate [--config PATH]
python run.py keys create --name NAME (--scopes a,b | --all-scopes) [--expires 30d] [--rate 1000/minute]
python run.py keys scopes | list [--all] | revoke ID | rotate ID [--overlap 1h]

With more than one worker this process supervises N `run.py serve --listen-fd` children
that share its listening socket (server/runtime/supervisor.py).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from server.config import Config, ConfigError, load_config
from server.runtime.logs import setup_logging
from server.urls import mask_url

if TYPE_CHECKING:
    from aiohttp import web

    from server.runtime.supervisor import Board

log = logging.getLogger("hotpath")

EXIT_CONFIG = 2
EXIT_STARTUP = 1


# What an option left out means (the subcommands' options default to "not given", so that
# `run.py --port 1 serve` and `run.py serve --port 1` both keep the port).
_DEFAULTS: dict[str, Any] = {
    "config": None,
    "host": None,
    "port": None,
    "workers": None,
    "listen_fd": None,
    "ready_fd": None,
    "board_fd": None,
    "slot": 0,
}


def _key_id(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 19 or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a key id is a positive number, not {text!r}")
    return int(text)


def add_keys_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    """`keys` and its commands (carried out by server/access/cli.py)."""
    keys = commands.add_parser(
        "keys",
        parents=[common],
        help="manage API keys: create, scopes, list, revoke, rotate",
        description="Manage API keys in the configured (or embedded) PostgreSQL; running servers "
        "are told through Redis. A new key is printed alone on the last line of standard output.",
    )
    sub = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    create = sub.add_parser("create", parents=[common], help="make a key (printed alone on the last line)")
    create.add_argument(
        "--name", required=True, help="what the key is for (shown in lists and the audit log)"
    )
    which = create.add_mutually_exclusive_group(required=True)
    which.add_argument("--scopes", help="comma-separated scopes (see `keys scopes`)")
    which.add_argument("--all-scopes", action="store_true", help="every scope, admin included")
    create.add_argument(
        "--expires",
        default=None,
        help="when it stops working: a duration (30d, 12h) or an ISO 8601 date-time",
    )
    create.add_argument(
        "--rate", default=None, help='its own rate limit instead of the routes\', e.g. "1000/minute"'
    )
    sub.add_parser("scopes", parents=[common], help="every scope with what it allows")
    listing = sub.add_parser("list", parents=[common], help="the active keys")
    listing.add_argument("--all", action="store_true", help="revoked and expired keys too")
    revoke = sub.add_parser("revoke", parents=[common], help="revoke a key at once")
    revoke.add_argument("key_id", metavar="ID", type=_key_id)
    rotate = sub.add_parser(
        "rotate", parents=[common], help="issue a replacement (printed alone on the last line)"
    )
    rotate.add_argument("key_id", metavar="ID", type=_key_id)
    rotate.add_argument(
        "--overlap",
        default=None,
        help="how long the old key keeps working: seconds or a duration (90m, 1h, 2d); "
        "default auth.rotate_overlap",
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", default=argparse.SUPPRESS, help="path to a config.toml (default: the project's)"
    )
    serving = argparse.ArgumentParser(add_help=False)
    serving.add_argument("--host", default=argparse.SUPPRESS, help="listen address (overrides server.host)")
    serving.add_argument("--port", default=argparse.SUPPRESS, help="listen port (overrides server.port)")
    serving.add_argument(
        "--workers",
        default=argparse.SUPPRESS,
        help="worker processes: a number, or auto = one per core (server.workers)",
    )
    # Set by the supervisor for its workers: the inherited listening socket, and a pipe to
    # write one byte into once this worker listens.
    serving.add_argument("--listen-fd", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    serving.add_argument("--ready-fd", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    # ... and the board where workers say they are at their connection cap, with our slot on it.
    serving.add_argument("--board-fd", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    serving.add_argument("--slot", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog="run.py", description="hotpath API server (no command: serve)", parents=[common, serving]
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", parents=[common, serving], help="serve HTTP (the default)")
    commands.add_parser("migrate", parents=[common, serving], help="apply the database migrations and exit")
    commands.add_parser("worker", parents=[common, serving], help="run background jobs only, no HTTP")
    add_keys_parser(commands, common)
    args = parser.parse_args(argv)
    if args.command is None:
        args.command = "serve"
    for name, value in _DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    return args


def build_config(args: argparse.Namespace) -> Config:
    server: dict[str, Any] = {}
    if args.host is not None:
        server["host"] = args.host
    if args.port is not None:
        try:
            server["port"] = int(args.port)
        except ValueError:
            raise ConfigError("--port", f"expected an integer, got {args.port!r}") from None
    if args.workers is not None:
        if args.workers == "auto":
            server["workers"] = 0
        elif args.workers.isdigit() and int(args.workers) > 0:
            server["workers"] = int(args.workers)
        else:
            raise ConfigError("--workers", f"expected a positive integer or auto, got {args.workers!r}")
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
    from server.runtime.accesslog import BufferedLineHandler

    logger = logging.getLogger("hotpath.access")
    handler = BufferedLineHandler(sys.stderr.fileno())
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


async def freeze_startup_heap(app: web.Application) -> None:
    """Move everything alive once the app has started (modules, pools, templates: ~60,000
    objects) out of the garbage collector's reach. A full collection walks every tracked object,
    and over that heap it held the loop for ~100 ms on our 2-core VM whenever a burst of
    allocations (a fan-out of 100 fetches) set one off; these objects live as long as the
    process, so scanning them finds nothing. Later objects are collected as before."""
    gc.freeze()


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def raise_open_files_limit() -> None:
    """Every open event stream holds a socket: let the process use all it is allowed."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def with_embedded(config: Config, embedded: Any) -> Config | None:
    """Start embedded PostgreSQL and Redis; the config pointing at them, or None on failure."""
    from server.runtime.embedded import EmbeddedError

    started = time.perf_counter()
    try:
        db_url, redis_url = embedded.start()
    except EmbeddedError as exc:
        log.error("%s", exc)
        return None
    log.info(
        "embedded PostgreSQL and Redis ready in %.2f s (data in %s)",
        time.perf_counter() - started,
        config.embedded_data_dir,
    )
    return dataclasses.replace(
        config,
        database=dataclasses.replace(config.database, url=db_url),
        redis=dataclasses.replace(config.redis, url=redis_url),
    )


def run_server(
    config: Config,
    listening: str,
    sock: socket.socket | None = None,
    ready_fd: int | None = None,
    board: Board | None = None,
) -> int:
    """One server process: on config's host and port, or on an inherited socket."""
    from server.app import create_app
    from server.errors import StartupError
    from server.runtime.accesslog import JsonAccessLogger
    from server.runtime.connections import run
    from server.runtime.supervisor import listening_socket

    def started() -> None:
        log.info("%s", listening)
        if ready_fd is not None:  # tell the supervisor we accept connections now
            os.write(ready_fd, b"R")
            os.close(ready_fd)

    srv = config.server
    raise_open_files_limit()
    loop = new_loop()
    asyncio.set_event_loop(loop)
    try:
        if sock is None:
            sock = listening_socket(srv.host, srv.port, srv.backlog, inheritable=False)
        app = create_app(config)
        app.on_startup.append(freeze_startup_heap)  # after every cleanup context has opened
        run(
            app,
            sock,
            config,
            loop=loop,
            board=board,
            access_log=access_logger() if srv.access_log else None,
            access_log_class=JsonAccessLogger,
            on_listening=started,
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
    finally:
        if not loop.is_closed():  # the listen failed before the loop ran
            loop.close()
        if sock is not None:
            sock.close()
    return 0


def supervise(config: Config, args: argparse.Namespace, count: int) -> int:
    """Bind once, then keep `count` worker processes serving on that socket."""
    from server.runtime.supervisor import Board, Supervisor, listening_socket

    srv = config.server
    try:
        sock = listening_socket(srv.host, srv.port, srv.backlog)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", srv.host, srv.port, exc.strerror or exc)
        return EXIT_STARTUP
    board_fd = Board.create(count)
    env = dict(os.environ)
    # Workers use the servers this process resolved (embedded ones included), and the
    # in-process rate-limit fallback splits each limit between them unless told otherwise.
    env["DATABASE_URL"], env["REDIS_URL"] = config.database.url, config.redis.url
    env.setdefault("HOTPATH_RATELIMIT_PROCESSES", str(count))
    # Workers share metric snapshots through a directory: the configured one (emptied of
    # an earlier run's snapshots), or a private temporary one removed at exit.
    metrics_dir = Path(config.metrics.shared_dir) if config.metrics.shared_dir else None
    temporary = metrics_dir is None
    if metrics_dir is None:
        metrics_dir = Path(tempfile.mkdtemp(prefix="hotpath-metrics-"))
    else:
        metrics_dir.mkdir(parents=True, exist_ok=True)
        for old in metrics_dir.glob("worker-*.json"):
            old.unlink(missing_ok=True)
    env["HOTPATH_METRICS_SHARED_DIR"] = str(metrics_dir)
    # Workers load the same config (file, environment) and get this process's CLI overrides.
    argv = [sys.executable, str(Path(__file__).resolve()), "serve", "--workers", "1"]
    argv += ["--host", srv.host, "--port", str(srv.port)]
    if args.config is not None:
        argv += ["--config", str(Path(args.config).resolve())]
    supervisor = Supervisor(
        argv,
        count,
        sock,
        env=env,
        shutdown_timeout=srv.shutdown_timeout,
        start_timeout=srv.start_timeout,
        board_fd=board_fd,
    )
    log.info(
        "hotpath supervisor (pid %d) on http://%s:%s, %d workers", os.getpid(), srv.host, srv.port, count
    )
    try:
        return asyncio.run(supervisor.run())
    finally:
        sock.close()
        os.close(board_fd)
        if temporary:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def serve(config: Config, args: argparse.Namespace) -> int:
    from server.runtime.embedded import EmbeddedServices
    from server.runtime.supervisor import Board, resolve_workers

    if args.listen_fd is not None:  # a worker of a supervisor: URLs come resolved, socket inherited
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # SIGHUP means "roll" to the supervisor, not to us
        sock = socket.socket(fileno=args.listen_fd)
        host, port = sock.getsockname()[:2]
        name = f"hotpath worker (pid {os.getpid()}) listening on http://{host}:{port}"
        board = Board(args.board_fd, args.slot) if args.board_fd is not None else None
        return run_server(config, name, sock=sock, ready_fd=args.ready_fd, board=board)

    # Until the server installs its own handlers, SIGTERM unwinds through `finally` like
    # Ctrl-C does, so embedded servers that were started are stopped.
    signal.signal(signal.SIGTERM, _raise_exit)
    embedded: EmbeddedServices | None = None
    try:
        if config.embedded_mode:
            embedded = EmbeddedServices(config.embedded_data_dir)
            resolved = with_embedded(config, embedded)
            if resolved is None:
                return EXIT_STARTUP
            config = resolved
            if config.auth.dev_key and not dev_key(config):
                return EXIT_STARTUP
        count = resolve_workers(config.server.workers)
        if count > 1:
            return supervise(config, args, count)
        srv = config.server
        listening = (
            f"hotpath listening on http://{srv.host}:{srv.port} "
            f"(database {mask_url(config.database.url)}, redis {mask_url(config.redis.url)}"
            f"{', embedded' if embedded else ''})"
        )
        return run_server(config, listening)
    finally:
        if embedded is not None:
            embedded.stop()
            log.info("embedded PostgreSQL and Redis stopped")


def dev_key(config: Config) -> bool:
    """The development key of an embedded start (auth.dev_key), made before any worker starts:
    shown once when made, kept in <embedded.data_dir>/dev-key. False when the database failed."""
    from server.access.cli import bootstrap_dev_key
    from server.errors import StartupError
    from server.storage.migrations import MigrationError

    try:
        found = bootstrap_dev_key(config, config.embedded_data_dir, new_loop)
    except (StartupError, MigrationError) as exc:
        log.error("%s", exc)
        return False
    if found.state == "created":
        # Written to the console, never to the log: a key is a secret (shown this once).
        sys.stderr.write(f"development key (every scope): {found.key}\n")
        sys.stderr.flush()
        log.info("development key %d made; kept in %s", found.record.id, found.path)
    elif found.state == "kept":
        log.info("development key (every scope): in %s", found.path)
    else:
        log.warning(
            "a development key (id %d) is active but %s does not hold it: revoke it "
            "(python run.py keys revoke %d) and start again for a new one",
            found.record.id,
            found.path,
            found.record.id,
        )
    return True


def keys(config: Config, args: argparse.Namespace) -> int:
    from server.access.cli import keys_main

    signal.signal(signal.SIGTERM, _raise_exit)  # an embedded PostgreSQL started for us is stopped
    return keys_main(config, args, new_loop)


def migrate(config: Config) -> int:
    import asyncpg

    from server.errors import StartupError
    from server.runtime.embedded import EmbeddedServices
    from server.storage.migrations import MigrationError, apply_migrations
    from server.storage.retry import retry_until

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
    from server.errors import StartupError
    from server.runtime.embedded import EmbeddedError, EmbeddedPostgres

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
    setup_logging()
    args = parse_args(argv)
    try:
        config = build_config(args)
    except ConfigError as exc:
        sys.stderr.write(f"hotpath: configuration error: {exc}\n")
        return EXIT_CONFIG
    setup_logging(config.log.level, config.log.format)
    try:
        if args.command == "migrate":
            return migrate(config)
        if args.command == "worker":
            return worker(config)
        if args.command == "keys":
            return keys(config, args)
        return serve(config, args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
