"""Upstream credential precedence, tenant base URLs, store failures and leaks.

Each test reads which ``Authorization`` the recording upstream received. Tenant
keys live in a real secrets file; the development key comes from the
``environ`` mapping given to the gateway.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import base_config, bearer, mint

import scaiproxy.credentials
from scaiproxy.app import create_app
from scaiproxy.auth import Principal
from scaiproxy.config import settings_from_mapping
from scaiproxy.credentials import CredentialResolver
from scaiproxy.errors import ConfigError
from scaiproxy.secrets import FileSecretStore, TenantSecretCache

EVENTS = "/v1/modules/scaicore/events"
EMPTY_PAGE = {"data": {"events": [], "next_cursor": None}}
TENANT_KEY = "sgk_acmeTenantKey0123456789abcdefghijKLMN"
OTHER_TENANT_KEY = "sgk_globexTenantKey0123456789abcdefghWXYZ"
ENV_KEY = "sgk_developmentKey0123456789abcdefghijQRST"
CREDENTIALS_ROUTE = "POST /api/v1/tenants/me/scaigrid_credentials"


def secrets_file(tmp_path: Path, values: dict[str, str] | None = None) -> Path:
    path = tmp_path / "secrets.json"
    values = {"tenants/acme/scaigrid_api_key": TENANT_KEY} if values is None else values
    path.write_text(json.dumps(values), encoding="utf-8")
    path.chmod(0o600)
    return path


def gateway_config(
    upstream_url: str,
    jwks_url: str,
    mode: str = "auto",
    secrets: Path | None = None,
    **auth: Any,
) -> dict[str, Any]:
    config = base_config(upstream_url, jwks_url)
    config["auth"].update(upstream_credentials=mode, **auth)
    if secrets is not None:
        config["secrets"] = {"backend": "file", "file": {"path": str(secrets)}}
    return config


def disabled_config(
    upstream_url: str, mode: str = "auto", secrets: Path | None = None
) -> dict[str, Any]:
    config = gateway_config(upstream_url, "", mode, secrets)
    config["auth"] = {
        "mode": "disabled",
        "upstream_credentials": mode,
        "dev_principal": {"tenant_id": "acme"},
    }
    return config


@pytest.fixture
def events(upstream):
    upstream.route("GET", EVENTS, json_body=EMPTY_PAGE)
    return upstream


async def get_events(client, headers: dict[str, str] | None = None):
    response = await client.get("/api/v1/scaicore/events", headers=headers)
    return response.status, await response.json()


def sent_authorization(upstream) -> str:
    assert len(upstream.requests) == 1
    return upstream.last.headers["Authorization"]


# auto


async def test_auto_forwards_jwt(make_gateway, events, jwks_server, rsa_key, tmp_path):
    config = gateway_config(
        events.base_url, jwks_server.url, "auto", secrets_file(tmp_path)
    )
    client = await make_gateway(config, environ={"SCAIGRID_API_KEY": ENV_KEY})
    token = mint(rsa_key, permissions=["scaicore:view"])
    status, body = await get_events(client, bearer(token))
    assert status == 200, body
    assert sent_authorization(events) == f"Bearer {token}"


async def test_auto_tenant_key_without_jwt(make_gateway, events, tmp_path):
    config = disabled_config(events.base_url, "auto", secrets_file(tmp_path))
    client = await make_gateway(config, environ={"SCAIGRID_API_KEY": ENV_KEY})
    status, body = await get_events(client)
    assert status == 200, body
    assert sent_authorization(events) == f"Bearer {TENANT_KEY}"


async def test_auto_env_key_last(make_gateway, events, tmp_path):
    config = disabled_config(events.base_url, "auto", secrets_file(tmp_path, {}))
    client = await make_gateway(config, environ={"SCAIGRID_API_KEY": ENV_KEY})
    status, body = await get_events(client)
    assert status == 200, body
    assert sent_authorization(events) == f"Bearer {ENV_KEY}"


async def test_auto_without_any_412(make_gateway, events, tmp_path):
    config = disabled_config(events.base_url, "auto", secrets_file(tmp_path, {}))
    client = await make_gateway(config)
    status, body = await get_events(client)
    assert status == 412
    assert body["detail"]["error"] == "missing_credentials"
    assert "'acme'" in body["detail"]["message"]
    assert CREDENTIALS_ROUTE in body["detail"]["fix"]
    assert events.requests == []


async def test_disabled_never_forwards_bearer(make_gateway, events, rsa_key, tmp_path):
    config = disabled_config(events.base_url, "auto", secrets_file(tmp_path, {}))
    client = await make_gateway(config)
    status, _ = await get_events(client, bearer(mint(rsa_key)))
    assert status == 412
    assert events.requests == []


async def test_disabled_bearer_replaced_by_key(make_gateway, events, rsa_key, tmp_path):
    config = disabled_config(events.base_url, "auto", secrets_file(tmp_path))
    client = await make_gateway(config)
    status, _ = await get_events(client, bearer(mint(rsa_key)))
    assert status == 200
    assert sent_authorization(events) == f"Bearer {TENANT_KEY}"


# user_jwt


async def test_user_jwt_forwards_jwt(
    make_gateway, events, jwks_server, rsa_key, tmp_path
):
    config = gateway_config(
        events.base_url, jwks_server.url, "user_jwt", secrets_file(tmp_path)
    )
    client = await make_gateway(config, environ={"SCAIGRID_API_KEY": ENV_KEY})
    token = mint(rsa_key, permissions=["scaicore:view"])
    status, _ = await get_events(client, bearer(token))
    assert status == 200
    assert sent_authorization(events) == f"Bearer {token}"


def test_user_jwt_with_disabled_auth_rejected(tmp_path):
    config = disabled_config("http://127.0.0.1:9", "user_jwt", secrets_file(tmp_path))
    settings = settings_from_mapping(config, environ={})
    with pytest.raises(ConfigError) as caught:
        create_app(settings, environ={})
    assert caught.value.key == "auth.upstream_credentials"


# api_key


async def test_api_key_uses_tenant_key(
    make_gateway, events, jwks_server, rsa_key, tmp_path
):
    config = gateway_config(
        events.base_url, jwks_server.url, "api_key", secrets_file(tmp_path)
    )
    client = await make_gateway(config, environ={"SCAIGRID_API_KEY": ENV_KEY})
    token = mint(rsa_key, permissions=["scaicore:view"])
    status, _ = await get_events(client, bearer(token))
    assert status == 200
    assert sent_authorization(events) == f"Bearer {TENANT_KEY}"
    assert all(token not in value for value in events.last.headers.values())


async def test_api_key_env_key_fallback(
    make_gateway, events, jwks_server, rsa_key, tmp_path
):
    config = gateway_config(
        events.base_url, jwks_server.url, "api_key", secrets_file(tmp_path, {})
    )
    client = await make_gateway(config, environ={"SCAIGRID_API_KEY": ENV_KEY})
    status, _ = await get_events(
        client, bearer(mint(rsa_key, permissions=["scaicore:view"]))
    )
    assert status == 200
    assert sent_authorization(events) == f"Bearer {ENV_KEY}"


async def test_api_key_never_forwards_jwt(
    make_gateway, events, jwks_server, rsa_key, tmp_path
):
    config = gateway_config(
        events.base_url, jwks_server.url, "api_key", secrets_file(tmp_path, {})
    )
    client = await make_gateway(config)
    status, body = await get_events(
        client, bearer(mint(rsa_key, permissions=["scaicore:view"]))
    )
    assert status == 412
    assert body["detail"]["tenant_id"] == "acme"
    assert body["detail"]["fix"] == (
        "A tenant admin sets the tenant's ScaiGrid key with " f"{CREDENTIALS_ROUTE}."
    )
    assert events.requests == []


async def test_api_key_other_tenant_key_unused(
    make_gateway, events, jwks_server, rsa_key, tmp_path
):
    store = secrets_file(
        tmp_path, {"tenants/globex/scaigrid_api_key": OTHER_TENANT_KEY}
    )
    config = gateway_config(events.base_url, jwks_server.url, "api_key", store)
    client = await make_gateway(config)
    token = mint(rsa_key, tenant_id="acme", permissions=["scaicore:view"])
    status, _ = await get_events(client, bearer(token))
    assert status == 412
    assert events.requests == []


async def test_fix_names_configured_base_path(
    make_gateway, events, jwks_server, rsa_key, tmp_path
):
    config = gateway_config(
        events.base_url, jwks_server.url, "api_key", secrets_file(tmp_path, {})
    )
    config["server"] = {"base_path": "/gateway"}
    client = await make_gateway(config)
    response = await client.get(
        "/gateway/v1/scaicore/events",
        headers=bearer(mint(rsa_key, permissions=["scaicore:view"])),
    )
    body = await response.json()
    assert "POST /gateway/v1/tenants/me/scaigrid_credentials" in body["detail"]["fix"]


async def test_malformed_tenant_key(
    make_gateway, events, jwks_server, rsa_key, tmp_path
):
    store = secrets_file(
        tmp_path, {"tenants/acme/scaigrid_api_key": "sgk_abc\r\nX-Evil: 1"}
    )
    config = gateway_config(events.base_url, jwks_server.url, "api_key", store)
    client = await make_gateway(config, environ={"SCAIGRID_API_KEY": ENV_KEY})
    status, body = await get_events(
        client, bearer(mint(rsa_key, permissions=["scaicore:view"]))
    )
    assert status == 412
    assert "X-Evil" not in json.dumps(body)
    assert events.requests == []


# SCAIFLOW_DEPLOY_AUTH and start-up checks


async def test_deploy_auth_overrides_config(
    make_gateway, events, jwks_server, rsa_key, tmp_path
):
    config = gateway_config(
        events.base_url, jwks_server.url, "auto", secrets_file(tmp_path)
    )
    client = await make_gateway(config, environ={"SCAIFLOW_DEPLOY_AUTH": "api_key"})
    status, _ = await get_events(
        client, bearer(mint(rsa_key, permissions=["scaicore:view"]))
    )
    assert status == 200
    assert sent_authorization(events) == f"Bearer {TENANT_KEY}"


def test_deploy_auth_unknown_value():
    config = base_config("http://127.0.0.1:9", "http://127.0.0.1:9/jwks")
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(config, environ={"SCAIFLOW_DEPLOY_AUTH": "jwt_please"})
    assert caught.value.key == "auth.upstream_credentials"
    assert "SCAIFLOW_DEPLOY_AUTH" in caught.value.message


def test_config_unknown_mode():
    config = base_config("http://127.0.0.1:9", "http://127.0.0.1:9/jwks")
    config["auth"]["upstream_credentials"] = "jwt_please"
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(config, environ={})
    assert caught.value.key == "auth.upstream_credentials"


async def test_env_key_refused_in_production(make_gateway, upstream, jwks_server):
    config = base_config(upstream.base_url, jwks_server.url)
    config["environment"] = "production"
    with pytest.raises(ConfigError) as caught:
        await make_gateway(config, environ={"SCAIGRID_API_KEY": ENV_KEY})
    assert caught.value.key == "auth.env_api_key_var"
    assert ENV_KEY not in str(caught.value)


async def test_env_key_with_newline_rejected(make_gateway, upstream, jwks_server):
    config = base_config(upstream.base_url, jwks_server.url)
    with pytest.raises(ConfigError) as caught:
        await make_gateway(config, environ={"SCAIGRID_API_KEY": "sgk_a\nb"})
    assert caught.value.key == "auth.env_api_key_var"


async def test_env_key_var_configurable(make_gateway, events, tmp_path):
    config = disabled_config(events.base_url, "api_key", secrets_file(tmp_path, {}))
    config["auth"]["env_api_key_var"] = "GRID_DEV_KEY"
    client = await make_gateway(
        config,
        environ={"GRID_DEV_KEY": ENV_KEY, "SCAIGRID_API_KEY": "sgk_unused_key_0000"},
    )
    status, _ = await get_events(client)
    assert status == 200
    assert sent_authorization(events) == f"Bearer {ENV_KEY}"


# Logs, error bodies and metrics


def log_events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_env_key_warning_once(make_gateway, events, tmp_path, log_stream):
    config = disabled_config(events.base_url, "auto", secrets_file(tmp_path, {}))
    client = await make_gateway(config, environ={"SCAIGRID_API_KEY": ENV_KEY})
    for _ in range(3):
        assert (await get_events(client))[0] == 200
    warnings = [
        e for e in log_events(log_stream) if e["event"] == "development_key_enabled"
    ]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"
    assert warnings[0]["masked_key"] == "sgk_…QRST"


async def test_env_key_unused_mode_no_warning(
    make_gateway, upstream, jwks_server, log_stream
):
    config = base_config(upstream.base_url, jwks_server.url)
    config["auth"]["upstream_credentials"] = "user_jwt"
    await make_gateway(config, environ={"SCAIGRID_API_KEY": ENV_KEY})
    names = [e["event"] for e in log_events(log_stream)]
    assert "development_key_enabled" not in names


async def test_no_credential_leaks(
    make_gateway, upstream, jwks_server, rsa_key, tmp_path, log_stream
):
    """Tokens and keys stay out of logs, error bodies and /metrics."""
    rejected = {
        "status": "error",
        "error": {"code": "unauthorized", "message": "bad key"},
    }
    upstream.route("GET", EVENTS, json_body=rejected, status=401)
    config = gateway_config(
        upstream.base_url, jwks_server.url, "api_key", secrets_file(tmp_path)
    )
    client = await make_gateway(config, environ={"SCAIGRID_API_KEY": ENV_KEY})
    token = mint(rsa_key, permissions=["scaicore:view"])
    expired = mint(rsa_key, ttl_s=-3600)

    bodies = []
    for headers in (
        bearer(token),
        bearer(expired),
        {"Authorization": f"Basic {TENANT_KEY}"},
    ):
        response = await client.get("/api/v1/scaicore/events", headers=headers)
        bodies.append(await response.text())
    metrics = await (await client.get("/metrics")).text()

    assert json.loads(bodies[0])["detail"]["error"] == "upstream_auth_failed"
    for secret in (token, expired, TENANT_KEY, ENV_KEY):
        assert secret not in log_stream.getvalue()
        assert all(secret not in body for body in bodies)
        assert secret not in metrics
    assert "credential_source" in log_stream.getvalue()


# Upstream rejections of each credential


async def test_rejected_tenant_key_is_502(
    make_gateway, upstream, jwks_server, rsa_key, tmp_path
):
    upstream.route("GET", EVENTS, json_body={"status": "error"}, status=401)
    config = gateway_config(
        upstream.base_url, jwks_server.url, "api_key", secrets_file(tmp_path)
    )
    client = await make_gateway(config)
    status, body = await get_events(
        client, bearer(mint(rsa_key, permissions=["scaicore:view"]))
    )
    assert status == 502
    assert body["detail"]["error"] == "upstream_auth_failed"
    assert CREDENTIALS_ROUTE in body["detail"]["fix"]
    assert "sgk_…KLMN" in body["detail"]["message"]
    assert "rejected the tenant key" in body["detail"]["message"]


async def test_rejected_env_key_is_502(make_gateway, upstream, tmp_path):
    upstream.route("GET", EVENTS, json_body={"status": "error"}, status=403)
    config = disabled_config(upstream.base_url, "api_key", secrets_file(tmp_path, {}))
    client = await make_gateway(config, environ={"SCAIGRID_API_KEY": ENV_KEY})
    status, body = await get_events(client)
    assert status == 502
    assert body["detail"]["error"] == "upstream_auth_failed"
    assert "environment variable" in body["detail"]["fix"]
    assert "rejected the development key" in body["detail"]["message"]


async def test_rejected_jwt_passes_status(make_gateway, upstream, jwks_server, rsa_key):
    answer = {
        "status": "error",
        "error": {"code": "token_revoked", "message": "The token was revoked."},
        "meta": {"request_id": "sg-1"},
    }
    upstream.route("GET", EVENTS, json_body=answer, status=401)
    client = await make_gateway(base_config(upstream.base_url, jwks_server.url))
    status, body = await get_events(
        client, bearer(mint(rsa_key, permissions=["scaicore:view"]))
    )
    assert status == 401
    assert body["detail"]["error"] == "upstream_error"
    assert body["detail"]["upstream_code"] == "token_revoked"
    assert body["detail"]["upstream_request_id"] == "sg-1"


# Tenant base URLs


@pytest.fixture
async def second_upstream():
    """Another ScaiGrid stand-in, recording the Authorization of each request."""
    received: list[tuple[str, str | None]] = []

    async def events_page(request: web.Request) -> web.Response:
        received.append((request.path, request.headers.get("Authorization")))
        return web.json_response(EMPTY_PAGE)

    app = web.Application()
    app.router.add_get("/grid" + EVENTS, events_page)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    server.received = received  # type: ignore[attr-defined]
    yield server
    await server.close()


async def test_allowed_tenant_base_url(
    make_gateway, events, second_upstream, jwks_server, rsa_key, tmp_path
):
    tenant_url = str(second_upstream.make_url("/grid"))
    store = secrets_file(
        tmp_path,
        {
            "tenants/acme/scaigrid_api_key": TENANT_KEY,
            "tenants/acme/scaigrid_base_url": tenant_url + "/",
        },
    )
    config = gateway_config(events.base_url, jwks_server.url, "api_key", store)
    config["upstream"]["allowed_base_urls"] = [tenant_url]
    client = await make_gateway(config)
    status, body = await get_events(
        client, bearer(mint(rsa_key, permissions=["scaicore:view"]))
    )
    assert status == 200, body
    assert second_upstream.received == [("/grid" + EVENTS, f"Bearer {TENANT_KEY}")]
    assert events.requests == []


async def test_unlisted_tenant_base_url(
    make_gateway, events, second_upstream, jwks_server, rsa_key, tmp_path
):
    store = secrets_file(
        tmp_path,
        {
            "tenants/acme/scaigrid_api_key": TENANT_KEY,
            "tenants/acme/scaigrid_base_url": str(second_upstream.make_url("/grid")),
        },
    )
    client = await make_gateway(
        gateway_config(events.base_url, jwks_server.url, "api_key", store)
    )
    status, body = await get_events(
        client, bearer(mint(rsa_key, permissions=["scaicore:view"]))
    )
    assert status == 502
    assert body["detail"]["error"] == "bad_gateway"
    assert "upstream.allowed_base_urls" in body["detail"]["message"]
    assert second_upstream.received == []
    assert events.requests == []


async def test_malformed_tenant_base_url(
    make_gateway, events, jwks_server, rsa_key, tmp_path
):
    store = secrets_file(tmp_path, {"tenants/acme/scaigrid_base_url": "file:///etc"})
    client = await make_gateway(
        gateway_config(events.base_url, jwks_server.url, "auto", store)
    )
    status, _ = await get_events(
        client, bearer(mint(rsa_key, permissions=["scaicore:view"]))
    )
    assert status == 502
    assert events.requests == []


# Secret store failures


async def test_corrupt_secrets_file(make_gateway, events, tmp_path):
    path = tmp_path / "secrets.json"
    path.write_text('{"tenants/acme/scaigrid_api_key": "sgk_', encoding="utf-8")
    path.chmod(0o600)
    config = disabled_config(events.base_url, "api_key", path)
    client = await make_gateway(config, environ={"SCAIGRID_API_KEY": ENV_KEY})
    status, body = await get_events(client)
    assert status == 502
    assert body["detail"]["error"] == "secret_store_unavailable"
    assert "(file)" in body["detail"]["message"]
    assert events.requests == []


async def test_scaivault_unreachable(make_gateway, events):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = disabled_config(events.base_url, "api_key")
    config["secrets"] = {
        "backend": "scaivault",
        "scaivault": {"base_url": f"http://127.0.0.1:{port}", "timeout_s": 2},
    }
    environ = {"SCAIGRID_API_KEY": ENV_KEY, "SCAIVAULT_TOKEN": "vault-token-123"}
    client = await make_gateway(config, environ=environ)
    status, body = await get_events(client)
    assert status == 502
    assert body["detail"]["error"] == "secret_store_unavailable"
    assert "(scaivault)" in body["detail"]["message"]
    assert "vault-token-123" not in json.dumps(body)
    assert events.requests == []


# Reuse of credential objects


def _principal(tenant: str, token: str) -> Principal:
    return Principal(
        sub="user-1",
        tenant_id=tenant,
        partner_id=None,
        roles=frozenset(),
        permissions=frozenset(),
        token=token,
    )


def _resolver() -> CredentialResolver:
    """Build a resolver in auto mode with no secret store and no development key."""
    settings = settings_from_mapping(
        gateway_config("http://127.0.0.1:9", "http://127.0.0.1:9/jwks", "auto"),
        environ={},
    )
    return CredentialResolver(settings, TenantSecretCache(None, 60), environ={})


async def test_credential_reused_per_secret():
    resolver = _resolver()
    first = await resolver.resolve(_principal("acme", "token-a"))
    again = await resolver.resolve(_principal("acme", "token-a"))
    other = await resolver.resolve(_principal("acme", "token-b"))
    assert again is first
    assert first.digest == hashlib.sha256(b"Bearer token-a").digest()
    assert other.authorization == "Bearer token-b"
    assert other.digest != first.digest


async def test_credential_reuse_bounded(monkeypatch):
    monkeypatch.setattr(scaiproxy.credentials, "MAX_CREDENTIALS", 3)
    resolver = _resolver()
    oldest = await resolver.resolve(_principal("acme", "token-0"))
    for number in range(1, 4):
        await resolver.resolve(_principal("acme", f"token-{number}"))
    assert len(resolver._credentials) == 3
    assert await resolver.resolve(_principal("acme", "token-0")) is not oldest


async def test_rejected_key_fix_names_base_path(
    make_gateway, upstream, jwks_server, rsa_key, tmp_path
):
    upstream.route(
        "GET",
        EVENTS,
        json_body={"status": "error", "error": {"code": "invalid_key"}},
        status=401,
    )
    config = gateway_config(
        upstream.base_url, jwks_server.url, "api_key", secrets_file(tmp_path)
    )
    config["server"] = {"base_path": "/gateway"}
    client = await make_gateway(config)
    response = await client.get(
        "/gateway/v1/scaicore/events",
        headers=bearer(mint(rsa_key, permissions=["scaicore:view"])),
    )
    detail = (await response.json())["detail"]
    assert response.status == 502
    assert detail["error"] == "upstream_auth_failed"
    assert "POST /gateway/v1/tenants/me/scaigrid_credentials" in detail["fix"]


async def test_missing_permission_fix_names_base_path(
    make_gateway, events, jwks_server, rsa_key
):
    config = gateway_config(events.base_url, jwks_server.url)
    config["server"] = {"base_path": "/gateway"}
    client = await make_gateway(config)
    response = await client.get(
        "/gateway/v1/scaicore/events",
        headers=bearer(mint(rsa_key, permissions=["other:view"])),
    )
    detail = (await response.json())["detail"]
    assert response.status == 403
    assert "GET /gateway/v1/me" in detail["fix"]


async def test_resolve_cached_waits_for_a_lookup(tmp_path):
    """Without cached secrets for the tenant it gives up; once they are cached
    it chooses what resolve() chooses, without awaiting the store."""
    path = secrets_file(tmp_path, {"tenants/acme/scaigrid_api_key": TENANT_KEY})
    settings = settings_from_mapping(
        gateway_config("http://127.0.0.1:9", "http://127.0.0.1:9/jwks", "api_key"),
        environ={},
    )
    secrets = TenantSecretCache(FileSecretStore(path), 60)
    resolver = CredentialResolver(settings, secrets, environ={})
    principal = _principal("acme", "token-a")
    assert resolver.resolve_cached(principal) is None
    resolved = await resolver.resolve(principal)
    assert resolver.resolve_cached(principal) is resolved
    assert resolved.source == "tenant_key"
