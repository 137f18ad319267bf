"""Shared fixtures: real signing keys, a JWKS server, a recording upstream and
the gateway built from a config mapping."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from scaiproxy.app import create_app
from scaiproxy.config import settings_from_mapping

ISSUER = "https://scaikey.test/platform"
AUDIENCE = "scaiflow-canvas"


@dataclass
class SigningKey:
    """A private key with its public JWK."""

    kid: str
    algorithm: str
    private_key: Any

    def jwk(self) -> dict[str, Any]:
        algorithm = jwt.algorithms.RSAAlgorithm if self.algorithm.startswith("RS") else jwt.algorithms.ECAlgorithm
        public = json.loads(algorithm.to_jwk(self.private_key.public_key()))
        public.update({"kid": self.kid, "use": "sig", "alg": self.algorithm})
        return public


def make_rsa_key(kid: str = "rsa-1") -> SigningKey:
    return SigningKey(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


def make_ec_key(kid: str = "ec-1") -> SigningKey:
    return SigningKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


_RSA_KEY = make_rsa_key()
_EC_KEY = make_ec_key()


@pytest.fixture
def rsa_key() -> SigningKey:
    return _RSA_KEY


@pytest.fixture
def ec_key() -> SigningKey:
    return _EC_KEY


def mint(
    key: SigningKey,
    *,
    tenant_id: str | None = "acme",
    sub: str = "user-1",
    permissions: list[str] | None = None,
    roles: list[str] | None = None,
    ttl_s: int = 3600,
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    """Sign a ScaiKey-like access token; claims set to None are left out."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": sub,
        "tenant_id": tenant_id,
        "iat": now,
        "nbf": now,
        "exp": now + ttl_s,
        "jti": uuid.uuid4().hex,
    }
    if permissions is not None:
        payload["permissions"] = permissions
    if roles is not None:
        payload["roles"] = roles
    payload.update(claims)
    payload = {name: value for name, value in payload.items() if value is not None}
    return jwt.encode(
        payload,
        key.private_key,
        algorithm=key.algorithm,
        headers={"kid": key.kid, **(headers or {})},
    )


@dataclass
class JWKSServer:
    """A real aiohttp server publishing a JWKS that tests can rotate."""

    keys: list[SigningKey]
    server: TestServer | None = None
    fetches: int = 0
    fail: bool = False

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/.well-known/jwks.json"))


@pytest.fixture
async def jwks_server(rsa_key: SigningKey, ec_key: SigningKey):
    state = JWKSServer(keys=[rsa_key, ec_key])

    async def serve(request: web.Request) -> web.Response:
        state.fetches += 1
        if state.fail:
            return web.Response(status=503, text="down")
        return web.json_response({"keys": [key.jwk() for key in state.keys]})

    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", serve)
    state.server = TestServer(app, host="127.0.0.1")
    await state.server.start_server()
    yield state
    await state.server.close()


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    raw_query: str
    headers: dict[str, str]
    header_names: list[str]
    body: bytes


@dataclass
class Upstream:
    """A real aiohttp server standing in for ScaiGrid; records every request."""

    requests: list[Recorded] = field(default_factory=list)
    handlers: dict[tuple[str, str], Callable[[web.Request], Awaitable[web.StreamResponse]]] = field(default_factory=dict)
    server: TestServer | None = None

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def route(self, method: str, path: str, handler: Any = None, *, json_body: Any = None, status: int = 200, headers: dict[str, str] | None = None) -> None:
        """Serve ``method path`` with a handler or a fixed JSON body."""
        if handler is None:
            payload = json.dumps(json_body).encode()

            async def handler(request: web.Request) -> web.Response:
                return web.Response(status=status, body=payload, content_type="application/json", headers=headers)

        self.handlers[(method, path)] = handler

    @property
    def last(self) -> Recorded:
        return self.requests[-1]


@pytest.fixture
async def upstream():
    state = Upstream()

    async def dispatch(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        query: dict[str, list[str]] = {}
        for key, value in request.query.items():
            query.setdefault(key, []).append(value)
        state.requests.append(
            Recorded(
                method=request.method,
                path=request.path,
                query=query,
                raw_query=request.query_string,
                headers={k: v for k, v in request.headers.items()},
                header_names=[k.lower() for k in request.headers.keys()],
                body=body,
            )
        )
        handler = state.handlers.get((request.method, request.path))
        if handler is None:
            return web.json_response(
                {"status": "error", "error": {"code": "not_found", "message": "no such route"}, "meta": {"request_id": "up-404"}},
                status=404,
            )
        return await handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", dispatch)
    state.server = TestServer(app, host="127.0.0.1")
    await state.server.start_server()
    yield state
    await state.server.close()


def base_config(upstream_url: str, jwks_url: str, **sections: Any) -> dict[str, Any]:
    """A complete config mapping for tests; ``sections`` replace top-level keys."""
    config: dict[str, Any] = {
        "environment": "development",
        "server": {"base_path": "/api"},
        "upstream": {"base_url": upstream_url, "timeout_s": 5, "connect_timeout_s": 2},
        "auth": {
            "mode": "scaikey",
            "jwks_url": jwks_url,
            "issuers": [ISSUER],
            "audience": AUDIENCE,
            "upstream_credentials": "auto",
        },
        "secrets": {"backend": "none"},
        "logging": {"level": "debug", "format": "json"},
        "plugins": {"enabled": ["scaicore"]},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


@pytest.fixture
def make_gateway(aiohttp_client):
    """Build and start a gateway client from a config mapping."""

    async def build(config: dict[str, Any], *, environ: dict[str, str] | None = None, plugins: dict[str, Any] | None = None):
        environ = {} if environ is None else environ
        settings = settings_from_mapping(config, environ=environ)
        app = create_app(settings, plugins=plugins, environ=environ)
        return await aiohttp_client(app)

    return build


@pytest.fixture
async def gateway(make_gateway, upstream, jwks_server):
    """The gateway with the ScaiCore plugin, in front of the recording upstream."""
    return await make_gateway(base_config(upstream.base_url, jwks_server.url))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def log_stream():
    """Send the gateway's log lines, as JSON, to a StringIO that the test reads.

    Restores the root logger's level and structlog's defaults afterwards.
    """
    import io
    import logging

    import structlog

    from scaiproxy.config import LoggingConfig
    from scaiproxy.logs import configure_logging

    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    configure_logging(LoggingConfig(level="debug", format="json"), stream=stream)
    yield stream
    for handler in list(root.handlers):
        if getattr(handler, "_scaiproxy", False):
            root.removeHandler(handler)
    root.setLevel(level)
    structlog.reset_defaults()


@pytest.fixture
async def simulator():
    """A running ScaiGrid simulator on 127.0.0.1 (seed 7, no faults)."""
    from scaiproxy.simulator import SimOptions, Simulator

    sim = Simulator(SimOptions())
    await sim.start()
    yield sim
    await sim.stop()


@dataclass
class GatewayProcess:
    """A ``scaiproxy serve`` child process and where it listens."""

    process: Any
    url: str
    port: int
    log_path: Any

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@pytest.fixture
async def gateway_process(tmp_path):
    """Start ``scaiproxy serve`` as a child process from a config mapping.

    ``await start(config, environ=...)`` writes the YAML, picks a free loopback
    port, waits until ``/readyz`` returns 200 and returns a
    :class:`GatewayProcess`. The child gets only ``PATH`` and ``environ`` as its
    environment. Processes still running at teardown get SIGTERM, then SIGKILL.
    """
    import asyncio
    import os
    import socket
    import sys
    from pathlib import Path

    import aiohttp
    import yaml

    started: list[GatewayProcess] = []
    script = Path(sys.executable).with_name("scaiproxy")
    if script.exists():
        command = [str(script)]
    else:
        command = [sys.executable, "-m", "scaiproxy.cli"]

    async def start(
        config: dict[str, Any],
        *,
        environ: dict[str, str] | None = None,
        ready_timeout_s: float = 30.0,
    ) -> GatewayProcess:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        number = len(started)
        config_path = tmp_path / f"gateway-{number}.yaml"
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        log_path = tmp_path / f"gateway-{number}.log"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(environ or {})}
        with open(log_path, "wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                *command,
                "serve",
                "--config",
                str(config_path),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                cwd=str(tmp_path),
            )
        child = GatewayProcess(process, f"http://127.0.0.1:{port}", port, log_path)
        started.append(child)

        deadline = asyncio.get_running_loop().time() + ready_timeout_s
        async with aiohttp.ClientSession() as session:
            while True:
                if process.returncode is not None:
                    raise RuntimeError(
                        f"scaiproxy serve exited with {process.returncode}:\n"
                        + child.log_text()[-4000:]
                    )
                try:
                    async with session.get(
                        child.url + "/readyz", timeout=aiohttp.ClientTimeout(total=2)
                    ) as response:
                        if response.status == 200:
                            return child
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError(
                        f"scaiproxy serve was not ready in {ready_timeout_s} s:\n"
                        + child.log_text()[-4000:]
                    )
                await asyncio.sleep(0.1)

    yield start

    for child in started:
        process = child.process
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 15)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()
