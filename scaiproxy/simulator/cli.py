"""Command line: run the simulator until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import sys

from scaiproxy.cli import port_number
from scaiproxy.simulator.options import MODELS_SHAPES, SimOptions
from scaiproxy.simulator.server import Simulator

logger = logging.getLogger("scaiproxy.simulator")

DEFAULT_PORT = 8701
# The program name in usage lines and errors. ``scaiproxy sim`` calls main()
# with the options after "sim" and no program name, so the default is its own.
DEFAULT_PROG = "scaiproxy sim"
# The printed token lasts a working day, so a demo does not need a new one.
PRINTED_TOKEN_TTL_S = 24 * 3600


def build_parser(prog: str = DEFAULT_PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Run stand-ins for ScaiGrid, ScaiKey and ScaiVault on one port, for "
            "development and tests. Its test controls need no credentials, so "
            "listen on loopback only."
        ),
    )

    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    parser.add_argument(
        "--port",
        type=port_number,
        default=DEFAULT_PORT,
        help="TCP port; 0 picks a free one.",
    )

    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="Delay in milliseconds added to every ScaiGrid request.",
    )
    parser.add_argument(
        "--error-rate",
        type=float,
        default=0.0,
        help="Fraction (0 to 1) of ScaiGrid requests that fail with a 500 response.",
    )
    parser.add_argument(
        "--rate-limit-per-minute",
        type=int,
        default=None,
        help="Maximum ScaiGrid requests per tenant per minute; unlimited if unset.",
    )
    parser.add_argument(
        "--models-shape",
        choices=MODELS_SHAPES,
        default="native",
        help="Response shape of GET /v1/models.",
    )

    parser.add_argument(
        "--activity-interval-s",
        type=float,
        default=None,
        help="Seconds between background invocations of demo cores; off if unset.",
    )

    parser.add_argument(
        "--seed", type=int, default=7, help="Seed for ids, demo API keys and data."
    )
    parser.add_argument(
        "--issuer", default=SimOptions.issuer, help="Token issuer (iss)."
    )
    parser.add_argument(
        "--audience", default=SimOptions.audience, help="Token audience (aud)."
    )
    parser.add_argument(
        "--vault-token",
        default=SimOptions.vault_token,
        help="Bearer token that the ScaiVault stand-in accepts.",
    )

    parser.add_argument(
        "--no-access-log",
        action="store_true",
        help="Do not log a line per request.",
    )
    return parser


def main(argv: list[str] | None = None, prog: str = DEFAULT_PROG) -> int:
    """Parse ``argv``, run the simulator until a stop signal, return the exit code.

    ``prog`` is the command the user typed, shown in usage lines and errors.
    """
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        options = SimOptions(
            issuer=args.issuer,
            audience=args.audience,
            latency_ms=args.latency_ms,
            error_rate=args.error_rate,
            rate_limit_per_minute=args.rate_limit_per_minute,
            models_shape=args.models_shape,
            activity_interval_s=args.activity_interval_s,
            seed=args.seed,
            vault_token=args.vault_token,
        )
    except ValueError as exc:
        parser.error(str(exc))

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.no_access_log:
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if not _is_loopback(args.host):
        logger.warning(
            "listening on %s: the /_sim controls and the development token route "
            "need no credentials, so anyone who can reach this port can use them",
            args.host,
        )

    try:
        asyncio.run(_serve(Simulator(options), args.host, args.port))
    except OSError as exc:
        print(
            f"{prog}: error: cannot listen on {args.host}:{args.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    return 0


async def _serve(sim: Simulator, host: str, port: int) -> None:
    await sim.start(host, port)
    _print_banner(sim)

    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)
    try:
        await stopped.wait()
    finally:
        logger.info("stopping the simulator")
        await sim.stop()


def _print_banner(sim: Simulator) -> None:
    token = sim.mint_token("acme", ttl_s=PRINTED_TOKEN_TTL_S)
    lines = [
        "ScaiGrid simulator is running (development only).",
        f"  ScaiGrid base URL  {sim.base_url}",
        f"  ScaiKey JWKS       {sim.jwks_url}",
        f"  Token issuer       {sim.options.issuer}",
        f"  Token audience     {sim.options.audience}",
        f"  Development tokens POST {sim.base_url}/scaikey/dev/token "
        '{"tenant_id": "acme"}',
        f"  ScaiVault          {sim.vault_url} (bearer {sim.options.vault_token})",
        "ScaiGrid API keys:",
        *(f"  {tenant:<8} {key}" for tenant, key in sim.demo_api_keys.items()),
        "Access token for tenant acme (tenant_admin, valid 24 h):",
        f"  {token}",
        "Stop with Ctrl+C.",
    ]
    print("\n".join(lines), flush=True)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
