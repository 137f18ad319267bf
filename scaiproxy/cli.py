"""The ``scaiproxy`` command: serve, check-config, routes, sim and demo."""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

from scaiproxy import __version__
from scaiproxy.errors import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sim"]:
        # The simulator parses its own options, --help included.
        from scaiproxy.simulator import main as simulator_main

        return simulator_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"scaiproxy: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130



def port_number(text: str) -> int:
    """Parse a TCP port for argparse: 0 to 65535, where 0 picks a free one."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"expected a port from 0 to 65535, got {text!r}"
        )
    return port

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scaiproxy",
        description="Gateway between the ScaiFlow canvas and ScaiGrid.",
    )
    parser.add_argument("--version", action="version", version=f"scaiproxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def with_config(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--config",
            help="config file (default: $SCAIPROXY_CONFIG, then ./config.yaml)",
        )

    serve = commands.add_parser("serve", help="run the gateway")
    with_config(serve)
    serve.add_argument("--host", help="address to listen on (overrides server.host)")
    serve.add_argument("--port", type=int, help="port to listen on (overrides server.port)")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the port (SO_REUSEPORT); default 1",
    )
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check-config", help="validate the config and plugins")
    with_config(check)
    check.set_defaults(run=_check_config)

    routes = commands.add_parser("routes", help="list the routes with permissions")
    with_config(routes)
    routes.set_defaults(run=_routes)

    # Listed for --help only: main() hands "sim" and its options to the simulator.
    commands.add_parser(
        "sim", help="run the ScaiGrid simulator alone (scaiproxy sim --help)"
    )

    demo = commands.add_parser(
        "demo", help="run the simulator and the gateway together, with sample curls"
    )
    with_config(demo)
    demo.add_argument(
        "--port", type=port_number, help="gateway port (default server.port)"
    )
    demo.add_argument(
        "--sim-port", type=port_number, default=8701, help="simulator port"
    )
    demo.set_defaults(run=_demo)
    return parser


def _load(args: argparse.Namespace, **overrides: Any):
    from scaiproxy.config import load_settings

    return load_settings(args.config, overrides=overrides)


def _check_config(args: argparse.Namespace) -> int:
    from scaiproxy.app import ROUTES, create_app

    settings = _load(args)
    app = create_app(settings)
    count = len(app[ROUTES])
    print(
        f"configuration is valid: {count} route{'' if count == 1 else 's'}, "
        f"plugins {', '.join(settings.plugins.enabled) or 'none'}"
    )
    return 0


def _routes(args: argparse.Namespace) -> int:
    from scaiproxy.plugins import PluginHost

    settings = _load(args)
    # Only the plugins are loaded: listing routes needs no secret store, so
    # it works without the backend's token in the environment.
    host = PluginHost(settings)
    host.configure()
    rows = [("METHOD", "PATH", "PERMISSION", "PLUGIN")]
    for spec in host.routes():
        needs = spec.permission or (" or ".join(spec.roles) if spec.roles else "-")
        rows.append((spec.method, settings.server.base_path + spec.path, needs, spec.plugin))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _serve(args: argparse.Namespace) -> int:
    if args.workers < 1:
        print("scaiproxy: --workers must be 1 or more", file=sys.stderr)
        return 2
    settings = _load(args, **{"server.host": args.host, "server.port": args.port})
    if args.workers == 1:
        run_worker(args.config, settings.server.host, settings.server.port, reuse_port=False)
        return 0
    if settings.server.port == 0:
        print("scaiproxy: --workers needs a fixed port, not 0", file=sys.stderr)
        return 2
    return _run_workers(args.config, settings.server.host, settings.server.port, args.workers)


def run_worker(config: str | None, host: str, port: int, reuse_port: bool) -> None:
    """Run one gateway process until SIGINT or SIGTERM."""
    from aiohttp import web

    import structlog

    from scaiproxy.app import create_app
    from scaiproxy.config import load_settings
    from scaiproxy.logs import configure_logging

    settings = load_settings(config, overrides={"server.host": host, "server.port": port})
    configure_logging(settings.logging)
    app = create_app(settings)
    log = structlog.get_logger("scaiproxy.cli")

    def listening(_message: str) -> None:
        log.info("listening", host=host, port=port, pid=os.getpid())

    app.on_startup.append(_freeze_gc)
    try:
        web.run_app(
            app,
            host=host,
            port=port,
            reuse_port=reuse_port or None,
            access_log=None,
            print=listening,
            shutdown_timeout=settings.server.shutdown_timeout_s,
            handle_signals=True,
            loop=new_event_loop(),
        )
    except socket.gaierror as exc:
        raise SystemExit(
            f"scaiproxy: cannot listen on {host}:{port}: the host name does not "
            f"resolve ({exc.strerror or exc}); set server.host or pass --host "
            "with an address of this machine, such as 127.0.0.1"
        ) from None
    except OSError as exc:
        raise SystemExit(
            f"scaiproxy: cannot listen on {host}:{port}: {exc.strerror or exc}; "
            "pass --port or stop what uses it"
        ) from None


def new_event_loop() -> asyncio.AbstractEventLoop:
    """Return a uvloop event loop where uvloop is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def _freeze_gc(app: Any) -> None:
    # Objects alive after start-up (modules, config, routes) live as long as the
    # process; keeping them out of the cyclic collector shortens its pauses.
    gc.collect()
    gc.freeze()


def _worker_main(config: str | None, host: str, port: int) -> None:
    try:
        run_worker(config, host, port, reuse_port=True)
    except KeyboardInterrupt:
        pass


def _run_workers(config: str | None, host: str, port: int, count: int) -> int:
    from scaiproxy.config import load_settings
    from scaiproxy.logs import configure_logging

    settings = load_settings(config)
    configure_logging(settings.logging)
    import structlog

    log = structlog.get_logger("scaiproxy.cli")
    if not hasattr(socket, "SO_REUSEPORT"):
        print("scaiproxy: --workers needs SO_REUSEPORT (Linux, BSD)", file=sys.stderr)
        return 2

    context = multiprocessing.get_context("spawn")
    workers: list[Any] = []
    stopping = False

    def start() -> Any:
        process = context.Process(target=_worker_main, args=(config, host, port), daemon=False)
        process.start()
        return process

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for process in workers:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    workers.extend(start() for _ in range(count))
    log.info("workers_started", workers=count, host=host, port=port)
    while not stopping:
        time.sleep(0.5)
        for index, process in enumerate(workers):
            if not process.is_alive() and not stopping:
                log.error("worker_exited", pid=process.pid, exitcode=process.exitcode)
                time.sleep(1)
                workers[index] = start()
    deadline = time.monotonic() + settings.server.shutdown_timeout_s + 5
    for process in workers:
        process.join(max(0.1, deadline - time.monotonic()))
        if process.is_alive():
            log.error("worker_killed", pid=process.pid)
            process.kill()
    log.info("workers_stopped")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from scaiproxy.demo import run_demo

    return run_demo(args.config, gateway_port=args.port, sim_port=args.sim_port)


if __name__ == "__main__":
    raise SystemExit(main())
