"""``scaiproxy demo``: the ScaiGrid simulator and the gateway, together on loopback.

The simulator replaces ScaiGrid, ScaiKey and ScaiVault. The gateway runs
with the given config (``config.yaml`` by default), its ScaiGrid and ScaiKey
settings pointed at the simulator, and the demo prints a ready token and curl
commands that send real requests through the gateway.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
from aiohttp import web

from scaiproxy.app import create_app
from scaiproxy.config import load_settings
from scaiproxy.logs import configure_logging

DEMO_TENANT = "acme"
TOKEN_FILE = Path("var/demo-token")


def run_demo(config: str | None, gateway_port: int | None, sim_port: int) -> int:
    """Run the demo until SIGINT or SIGTERM; returns the exit status."""
    try:
        return asyncio.run(_demo(config, gateway_port, sim_port))
    except KeyboardInterrupt:
        return 0


async def _demo(config: str | None, gateway_port: int | None, sim_port: int) -> int:
    from scaiproxy.simulator import SimOptions, Simulator

    options = SimOptions(activity_interval_s=3.0)
    simulator = Simulator(options)
    try:
        await simulator.start("127.0.0.1", sim_port)
    except OSError as exc:
        print(
            f"scaiproxy demo: cannot listen on 127.0.0.1:{sim_port} for the "
            f"simulator ({exc.strerror}); pass --sim-port",
            file=sys.stderr,
        )
        return 1

    # The demo's gateway always talks to the demo's own simulator, whatever the
    # config sets for ScaiGrid and ScaiKey.
    overrides = {
        "upstream.base_url": simulator.base_url,
        "auth.mode": "scaikey",
        "auth.jwks_url": simulator.jwks_url,
        "auth.issuers": [options.issuer],
        "auth.audience": options.audience,
    }
    if gateway_port:
        overrides["server.port"] = gateway_port
    try:
        settings = load_settings(config, overrides=overrides)
    except Exception:
        await simulator.stop()
        raise
    configure_logging(settings.logging)

    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, settings.server.host, settings.server.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        await simulator.stop()
        print(
            f"scaiproxy demo: cannot listen on {settings.server.host}:"
            f"{settings.server.port} ({exc.strerror}); pass --port",
            file=sys.stderr,
        )
        return 1

    gateway = f"http://{settings.server.host}:{settings.server.port}"
    base = gateway + settings.server.base_path
    token = simulator.mint_token(
        DEMO_TENANT, sub="demo-user", roles=["tenant_admin"], ttl_s=12 * 3600
    )
    try:
        _write_token(token)
    except OSError as exc:
        await runner.cleanup()
        await simulator.stop()
        print(
            f"scaiproxy demo: cannot write the demo token to {TOKEN_FILE} "
            f"({exc.strerror or exc}); run the demo in a folder where it can "
            f"create {TOKEN_FILE}",
            file=sys.stderr,
        )
        return 1

    checkpoint_id = await _pending_checkpoint(base, token)
    status = await _first_request(base, token)
    print(_banner(gateway, base, simulator.base_url, checkpoint_id, status), flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()
    await simulator.stop()
    return 0


def _write_token(token: str) -> None:
    """Write the token to ``TOKEN_FILE``, readable by its owner only."""
    TOKEN_FILE.parent.mkdir(parents=True, exist_ok=True)
    # Created with mode 0600, so the token is never readable by others.
    descriptor = os.open(TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(token + "\n")
    os.chmod(TOKEN_FILE, 0o600)


async def _pending_checkpoint(base: str, token: str) -> str | None:
    """Invoke the review Core once through the gateway, so a checkpoint waits."""
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.post(
            f"{base}/v1/scaicore/cores/core_invoice_review/invoke",
            json={"input": {"invoice_id": "inv_1001", "amount": 1200}},
        ) as response:
            await response.read()
        async with session.get(f"{base}/v1/scaicore/checkpoints") as response:
            if response.status != 200:
                return None
            page = await response.json()
    checkpoints = page["data"]["checkpoints"]
    return checkpoints[0]["id"] if checkpoints else None


async def _first_request(base: str, token: str) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(
            f"{base}/v1/scaicore/events",
            params={"limit": "5"},
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            body = await response.json()
    if response.status != 200:
        return f"HTTP {response.status}: {body}"
    count = len(body["data"]["events"])
    return f"HTTP 200, {count} events, request id {response.headers['X-Request-ID']}"


def _banner(
    gateway: str, base: str, simulator: str, checkpoint_id: str | None, status: str
) -> str:
    checkpoint = checkpoint_id or "CHECKPOINT_ID"
    return f"""
scaiproxy demo is running.

  gateway    {gateway}  (routes under {base})
  simulator  {simulator}  (ScaiGrid, ScaiKey and ScaiVault stand-ins)

First request through the gateway: GET /api/v1/scaicore/events -> {status}

A token for tenant 'acme' (role tenant_admin) is in {TOKEN_FILE}. In another
terminal, in this folder:

  TOKEN=$(cat {TOKEN_FILE})

  # live events (the simulator keeps invoking Cores every few seconds)
  curl -s -H "Authorization: Bearer $TOKEN" '{base}/v1/scaicore/events?limit=5'

  # paused executions waiting for a decision
  curl -s -H "Authorization: Bearer $TOKEN" '{base}/v1/scaicore/checkpoints'

  # approve one
  curl -s -X POST -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \\
       -d '{{"resolution": "approve", "comment": "Within budget."}}' \\
       '{base}/v1/scaicore/checkpoints/{checkpoint}/resolve'

  # invoke a Core
  curl -s -X POST -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \\
       -d '{{"input": {{"message": "My invoice is wrong"}}}}' \\
       '{base}/v1/scaicore/cores/core_support_triage/invoke'

  # the caller as the gateway authenticated it
  curl -s -H "Authorization: Bearer $TOKEN" '{base}/v1/me'

Operations: {gateway}/healthz  {gateway}/metrics  {gateway}/openapi.json
Press Ctrl-C to stop.
"""
