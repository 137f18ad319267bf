"""Graceful shutdown of ``scaiproxy serve`` on SIGTERM.

The gateway runs as a child process in front of a recording upstream whose
invoke route is slow, and SIGTERM arrives while an invoke is in flight. The
invoke must still complete with 200, and new connections must be refused from
then on. The process must exit within ``server.shutdown_timeout_s`` plus a
margin, also when the request in flight would take longer than that.

aiohttp closes the listening socket and the idle keep-alive connections before
it runs the app's shutdown hooks, so no client of a single process can reach
``/readyz`` during the drain. ``test_readyz_503_once_shutdown_starts`` checks
the readiness flag in process instead.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import base_config, bearer, mint

from scaiproxy.app import create_app
from scaiproxy.config import settings_from_mapping

INVOKE = "/api/v1/scaicore/cores/core_slow/invoke"
INVOKE_UP = "/v1/modules/scaicore/cores/core_slow/invoke"
SLOW_INVOKE_S = 2.0
SHUTDOWN_TIMEOUT_S = 5.0
# Time allowed beyond shutdown_timeout_s for the process to exit.
EXIT_MARGIN_S = 3.0

pytestmark = pytest.mark.skipif(
    not hasattr(signal, "SIGTERM"), reason="needs POSIX signals"
)


def slow_invoke(upstream, delay_s: float) -> tuple[asyncio.Event, asyncio.Event]:
    """Respond to invoke after ``delay_s`` or once released; return both events."""
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        arrived.set()
        try:
            await asyncio.wait_for(release.wait(), delay_s)
        except TimeoutError:
            pass
        return web.json_response(
            {"data": {"output": {"done": True}, "request_id": "r1", "duration_ms": 1}}
        )

    upstream.route("POST", INVOKE_UP, handler)
    return arrived, release


def serve_config(upstream, jwks_server, shutdown_timeout_s: float) -> dict[str, Any]:
    return base_config(
        upstream.base_url,
        jwks_server.url,
        server={"base_path": "/api", "shutdown_timeout_s": shutdown_timeout_s},
        plugins={"enabled": ["scaicore"], "scaicore": {"invoke_timeout_s": 30}},
        logging={"level": "info", "format": "json"},
    )


async def invoke(url: str, token: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url + INVOKE,
            json={"input": {"n": 1}},
            headers=bearer(token),
            timeout=aiohttp.ClientTimeout(total=60),
        ) as response,
    ):
        return response.status, await response.json()


async def refuses_connections(port: int, within_s: float) -> bool:
    """Tell whether a new connection to ``port`` is refused within ``within_s``."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except (ConnectionRefusedError, ConnectionResetError):
            # A connection still in the backlog when the listener closes is reset.
            return True
        writer.close()
        await asyncio.sleep(0.05)
    return False


@pytest.fixture
def token(rsa_key) -> str:
    return mint(rsa_key, permissions=["scaicore:view", "scaicore:manage"])


async def test_sigterm_drains_invoke(upstream, jwks_server, gateway_process, token):
    arrived, _ = slow_invoke(upstream, SLOW_INVOKE_S)
    gateway = await gateway_process(
        serve_config(upstream, jwks_server, SHUTDOWN_TIMEOUT_S)
    )
    in_flight = asyncio.ensure_future(invoke(gateway.url, token))
    await asyncio.wait_for(arrived.wait(), 10)

    gateway.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    refused = await refuses_connections(gateway.port, within_s=1.5)
    # Refused while the invoke was still being served, so during the drain.
    drained_later = not in_flight.done()
    status, body = await asyncio.wait_for(in_flight, 30)
    returncode = await asyncio.wait_for(
        gateway.process.wait(), SHUTDOWN_TIMEOUT_S + EXIT_MARGIN_S
    )
    exited_after = time.monotonic() - signalled

    assert status == 200
    assert body["data"]["output"] == {"done": True}
    assert refused
    assert drained_later
    assert returncode == 0
    assert exited_after < SHUTDOWN_TIMEOUT_S + EXIT_MARGIN_S
    assert '"gateway_stopped"' in gateway.log_text()


async def test_sigterm_bounded_by_timeout(
    upstream, jwks_server, gateway_process, token
):
    """A request longer than shutdown_timeout_s is cut off; the process exits."""
    short_timeout_s = 1.0
    arrived, release = slow_invoke(upstream, 60)
    gateway = await gateway_process(
        serve_config(upstream, jwks_server, short_timeout_s)
    )
    in_flight = asyncio.ensure_future(invoke(gateway.url, token))
    await asyncio.wait_for(arrived.wait(), 10)

    gateway.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    try:
        returncode = await asyncio.wait_for(
            gateway.process.wait(), short_timeout_s + EXIT_MARGIN_S
        )
    finally:
        release.set()
    exited_after = time.monotonic() - signalled
    outcome = await asyncio.gather(in_flight, return_exceptions=True)

    assert returncode == 0
    assert exited_after < short_timeout_s + EXIT_MARGIN_S
    # The client gets a closed connection or an error, never a hang.
    assert isinstance(outcome[0], Exception) or outcome[0][0] != 200
    lines = [json.loads(line) for line in gateway.log_text().splitlines()]
    [cut_off] = [line for line in lines if line["event"] == "request_cut_off"]
    assert cut_off["level"] == "warning"
    assert cut_off["route"] == "scaicore.invoke"
    [request] = [
        line
        for line in lines
        if line["event"] == "request" and line["route"] == "scaicore.invoke"
    ]
    # The shutdown cut it off: not logged as the client's disconnect (499).
    assert request["status"] == 503
    assert not [line for line in lines if line["event"] == "client_disconnected"]


async def test_sigterm_when_idle_exits_fast(upstream, jwks_server, gateway_process):
    gateway = await gateway_process(
        serve_config(upstream, jwks_server, SHUTDOWN_TIMEOUT_S)
    )
    gateway.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    returncode = await asyncio.wait_for(gateway.process.wait(), EXIT_MARGIN_S)
    assert returncode == 0
    assert time.monotonic() - signalled < EXIT_MARGIN_S


async def test_readyz_503_once_shutdown_starts(upstream, jwks_server):
    settings = settings_from_mapping(
        base_config(upstream.base_url, jwks_server.url), environ={}
    )
    server = TestServer(create_app(settings, environ={}), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            before = await session.get(server.make_url("/readyz"))
            await server.app.shutdown()
            during = await session.get(server.make_url("/readyz"))
            detail = (await during.json())["detail"]
    finally:
        await server.close()
    assert before.status == 200
    assert during.status == 503
    assert detail["error"] == "service_unavailable"
    assert during.headers.get("Retry-After") == "1"
