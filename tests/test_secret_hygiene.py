"""No token, key, cookie or vault token in logs, error bodies, headers or metrics.

One module-wide run drives three gateways (``auto`` with a secrets file,
``api_key`` with a secrets file, ``api_key`` with ScaiVault) in front of the
ScaiGrid simulator, with logging at DEBUG into a StringIO. Every route is
called with valid, expired, forged and garbage tokens. The sgk_ keys come from
the environment, the file and the vault, and one of them is revoked. Requests
also carry cookies and a Proxy-Authorization header, and a few are malformed so
that aiohttp's own HTTP parser rejects them. The tests then search everything
the gateways logged or sent back for each secret and for anything that looks
like a JWT.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp.test_utils import TestServer

from scaiproxy.app import create_app
from scaiproxy.config import LoggingConfig, settings_from_mapping
from scaiproxy.logs import configure_logging
from scaiproxy.simulator import SimOptions, Simulator

VAULT_TOKEN = "vault-secret-token-5e2b91"
COOKIE_SECRET = "cookie-secret-7f3a9c44"
PROXY_SECRET = "proxy-secret-c41d0a77"
GARBAGE_TOKEN = "garbage-bearer-secret-93kq"
ENV_KEY = "sgk_envkey" + "Q7" * 16
REVOKED_KEY = "sgk_revoked" + "R3" * 16
NEW_KEY = "sgk_newkey" + "N5" * 16
SHORT_KEY = "sgk_short-secret-x1"
# Three base64url parts, the first starting '{"': what a JWT looks like.
JWT_LIKE = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{4,}")
LINE_LIMIT = 16384


@dataclass
class Transcript:
    """Everything the gateways logged or sent back during the run."""

    logs: str = ""
    bodies: list[bytes] = field(default_factory=list)
    headers: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    #: The 400s for requests that aiohttp's HTTP parser rejected.
    parser_answers: list[bytes] = field(default_factory=list)
    secrets: dict[str, str] = field(default_factory=dict)

    @property
    def answers(self) -> str:
        return b"\n".join(self.bodies).decode("utf-8", "replace")


def gateway_settings(sim: Simulator, mode: str, secrets: dict[str, Any]):
    config = {
        "upstream": {"base_url": sim.base_url, "timeout_s": 5},
        "auth": {
            "mode": "scaikey",
            "jwks_url": sim.jwks_url,
            "issuers": [sim.options.issuer],
            "audience": sim.options.audience,
            "upstream_credentials": mode,
        },
        "secrets": {"cache_ttl_s": 0, **secrets},
        "logging": {"level": "debug", "format": "json"},
        "plugins": {"enabled": ["scaicore", "lookups", "tenants"]},
    }
    return settings_from_mapping(config, environ={})


def routes(sim: Simulator, tenant: str) -> list[tuple[str, str, Any]]:
    scope_id = (
        sim.state.tenants[tenant].scopes[0]["id"]
        if tenant in sim.state.tenants
        else "scope_x"
    )
    return [
        ("GET", "/api/v1/me", None),
        ("GET", "/api/v1/scaicore/events?limit=3", None),
        ("GET", "/api/v1/scaicore/checkpoints", None),
        (
            "POST",
            "/api/v1/scaicore/checkpoints/ckpt_missing/resolve",
            {"resolution": "ok"},
        ),
        (
            "POST",
            "/api/v1/scaicore/cores/core_flaky/invoke",
            {"input": {"succeed": False}},
        ),
        (
            "POST",
            "/api/v1/scaicore/cores/core_flaky/invoke",
            {"input": {"succeed": True}},
        ),
        ("GET", "/api/v1/scaiqueue/scopes", None),
        ("GET", f"/api/v1/scaiqueue/scopes/{scope_id}/queues", None),
        ("GET", "/api/v1/scaibunker/bunkers", None),
        ("GET", "/api/v1/scaigrid/models", None),
        ("GET", "/api/v1/tenants/me/scaigrid_credentials", None),
        ("GET", f"/api/v1/scaicore/events?access_token={GARBAGE_TOKEN}", None),
        ("GET", "/api/v1/no/such/route", None),
        ("DELETE", "/api/v1/scaicore/events", None),
    ]


async def raw_exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def drive_gateway(
    server: TestServer, sim: Simulator, tokens: dict[str, str], out: Transcript
) -> None:
    cookie = {"Cookie": f"session={COOKIE_SECRET}; theme=dark"}
    proxy = {"Proxy-Authorization": f"Basic {PROXY_SECRET}"}

    async with aiohttp.ClientSession() as session:

        async def send(method: str, path: str, body: Any, headers: dict) -> None:
            async with session.request(
                method, server.make_url(path), json=body, headers=headers
            ) as response:
                out.bodies.append(await response.read())
                out.headers.append(json.dumps(dict(response.headers)))
                out.statuses.append(response.status)

        for name in ("acme", "globex", "initech"):
            auth = {"Authorization": f"Bearer {tokens[name]}", **cookie, **proxy}
            for method, path, body in routes(sim, name):
                await send(method, path, body, auth)

        admin = {"Authorization": f"Bearer {tokens['acme']}"}
        path = "/api/v1/tenants/me/scaigrid_credentials"
        await send("POST", path, {"api_key": SHORT_KEY}, admin)
        await send("POST", path, {"api_key": NEW_KEY, "base_url": "ftp://x"}, admin)
        await send("POST", path, {"api_key": NEW_KEY}, admin)
        await send("GET", path, None, admin)
        await send("POST", path, {"api_key": sim.demo_api_keys["acme"]}, admin)

        for name in ("expired", "forged", "wrong_audience"):
            headers = {"Authorization": f"Bearer {tokens[name]}", **cookie}
            await send("GET", "/api/v1/scaicore/events", None, headers)
        for value in (
            f"Bearer {GARBAGE_TOKEN}",
            GARBAGE_TOKEN,
            f"Basic {PROXY_SECRET}",
        ):
            await send("GET", "/api/v1/me", None, {"Authorization": value})
        await send("GET", "/api/v1/me", None, cookie)
        await send(
            "POST",
            "/api/v1/scaicore/cores/core_flaky/invoke",
            {"input": {"token": tokens["acme"]}, "api_key": NEW_KEY},
            admin,
        )

        for path in ("/healthz", "/readyz", "/openapi.json"):
            await send("GET", path, None, cookie)
        async with session.get(server.make_url("/metrics")) as response:
            out.metrics.append(await response.text())

    # Requests that aiohttp's HTTP parser rejects before any middleware runs.
    first_line = "GET /api/v1/me HTTP/1.1\r\nHost: x\r\n"
    head = f"{first_line}Authorization: Bearer {tokens['acme']}\r\n"
    oversized = f"Cookie: session={COOKIE_SECRET}{'p' * LINE_LIMIT}\r\n\r\n"
    bare_cr = f"Cookie: session={COOKIE_SECRET}\rX: 1\r\n\r\n"
    long_token = f"Authorization: Bearer {tokens['acme']}{'A' * LINE_LIMIT}\r\n\r\n"
    for request in (head + oversized, head + bare_cr, first_line + long_token):
        answer = await raw_exchange(server.port, request.encode())
        out.parser_answers.append(answer)


async def run_everything(tmp_path: Path) -> Transcript:
    out = Transcript()
    sim = Simulator(SimOptions(vault_token=VAULT_TOKEN))
    await sim.start()
    try:
        sim.add_api_key(ENV_KEY, "initech")
        secrets_file = tmp_path / "secrets.json"
        secrets_file.write_text(
            json.dumps(
                {
                    "tenants/acme/scaigrid_api_key": sim.demo_api_keys["acme"],
                    "tenants/globex/scaigrid_api_key": REVOKED_KEY,
                }
            )
        )
        os.chmod(secrets_file, 0o600)
        sim.put_secret(
            "tenants/globex/scaigrid_api_key", {"value": REVOKED_KEY}, "api_key"
        )

        tokens = {
            name: sim.mint_token(name, roles=("tenant_admin",))
            for name in ("acme", "globex", "initech")
        }
        tokens["expired"] = sim.mint_token("acme", ttl_s=-600)
        tokens["wrong_audience"] = sim.mint_token("acme", aud="someone-else")
        header, payload, _ = tokens["acme"].split(".")
        tokens["forged"] = f"{header}.{payload}.c2lnbmF0dXJlLWZvcmdlZA"
        out.secrets = {
            **{f"jwt_{name}": token for name, token in tokens.items()},
            **{f"demo_key_{name}": key for name, key in sim.demo_api_keys.items()},
            "env_key": ENV_KEY,
            "revoked_key": REVOKED_KEY,
            "new_key": NEW_KEY,
            "short_key": SHORT_KEY,
            "vault_token": VAULT_TOKEN,
            "cookie": COOKIE_SECRET,
            "proxy_authorization": PROXY_SECRET,
            "garbage_token": GARBAGE_TOKEN,
        }

        environ = {"SCAIGRID_API_KEY": ENV_KEY, "SCAIVAULT_TOKEN": VAULT_TOKEN}
        file_backend = {"backend": "file", "file": {"path": str(secrets_file)}}
        vault_backend = {
            "backend": "scaivault",
            "scaivault": {"base_url": sim.vault_url},
        }
        for mode, backend in (
            ("auto", file_backend),
            ("api_key", file_backend),
            ("api_key", vault_backend),
        ):
            settings = gateway_settings(sim, mode, backend)
            server = TestServer(create_app(settings, environ=environ), host="127.0.0.1")
            await server.start_server()
            try:
                await drive_gateway(server, sim, tokens, out)
            finally:
                await server.close()
    finally:
        await sim.stop()
    return out


@pytest.fixture(scope="module")
def transcript(tmp_path_factory) -> Transcript:
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    configure_logging(LoggingConfig(level="debug", format="json"), stream=stream)
    try:
        out = asyncio.run(run_everything(tmp_path_factory.mktemp("hygiene")))
    finally:
        for handler in list(root.handlers):
            if getattr(handler, "_scaiproxy", False):
                root.removeHandler(handler)
        root.setLevel(level)
        structlog.reset_defaults()
    out.logs = stream.getvalue()
    return out


SECRET_NAMES = [
    "jwt_acme",
    "jwt_globex",
    "jwt_initech",
    "jwt_expired",
    "jwt_forged",
    "jwt_wrong_audience",
    "demo_key_acme",
    "demo_key_globex",
    "env_key",
    "revoked_key",
    "new_key",
    "short_key",
    "vault_token",
    "cookie",
    "proxy_authorization",
    "garbage_token",
]


def test_run_exercised_paths(transcript):
    """The run logged what it should, so the absence checks below mean something."""
    events = [json.loads(line)["event"] for line in transcript.logs.splitlines()]
    assert events.count("request") > 100
    expected = (
        "upstream_error_status",
        "jwks_fetched",
        "development_key_enabled",
        "http_request_rejected",
    )
    for name in expected:
        assert name in events, name
    assert {200, 204, 401, 404, 405, 422, 502} <= set(transcript.statuses)
    assert "upstream_auth_failed" in transcript.answers
    assert "sgk_…" in transcript.answers


def test_secret_names_cover_all(transcript):
    assert set(SECRET_NAMES) == set(transcript.secrets)


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_secret_not_in_logs(name, transcript):
    assert transcript.secrets[name] not in transcript.logs


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_secret_not_in_answers(name, transcript):
    assert transcript.secrets[name] not in transcript.answers


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_secret_not_in_headers(name, transcript):
    assert transcript.secrets[name] not in "\n".join(transcript.headers)


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_secret_not_in_metrics(name, transcript):
    assert transcript.secrets[name] not in "\n".join(transcript.metrics)


def test_no_jwt_in_logs(transcript):
    assert JWT_LIKE.findall(transcript.logs) == []


def test_no_jwt_in_answers(transcript):
    assert JWT_LIKE.findall(transcript.answers) == []


def test_parser_answers_are_enveloped_400(transcript):
    """Requests aiohttp's parser rejects get the envelope, quoting nothing."""
    assert len(transcript.parser_answers) == 9
    for answer in transcript.parser_answers:
        assert answer.startswith(b"HTTP/1.0 400 ")
        assert b"application/json" in answer
        assert b'"error":"bad_request"' in answer


@pytest.mark.parametrize("name", ["jwt_acme", "vault_token", "env_key"])
def test_parser_answers_hold_no_full_token(name, transcript):
    answers = b"\n".join(transcript.parser_answers).decode("utf-8", "replace")
    assert transcript.secrets[name] not in answers


def test_metrics_name_no_tenant(transcript):
    metrics = "\n".join(transcript.metrics)
    assert metrics
    for tenant in ("acme", "globex", "initech"):
        assert tenant not in metrics
