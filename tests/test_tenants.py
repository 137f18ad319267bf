"""The tenants plugin: reading and setting a tenant's ScaiGrid credentials."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import base_config, bearer, mint

ROUTE = "/api/v1/tenants/me/scaigrid_credentials"
EVENTS = "/api/v1/scaicore/events"
EVENTS_UPSTREAM = "/v1/modules/scaicore/events"
KEY_A = "sgk_" + "a1B2c3D4e5" * 4
KEY_B = "sgk_" + "Zz9_Yy8-Xx" * 4
ALLOWED = "https://grid.example.com"


def config_for(upstream, jwks_server, tmp_path: Path, **sections: Any) -> dict:
    config = base_config(
        upstream.base_url,
        jwks_server.url,
        secrets={
            "backend": "file",
            "cache_ttl_s": 300,
            "file": {"path": str(tmp_path / "secrets" / "secrets.json")},
        },
        plugins={"enabled": ["scaicore", "tenants"]},
    )
    config["upstream"] = {**config["upstream"], "allowed_base_urls": [ALLOWED]}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


@pytest.fixture
async def client(make_gateway, upstream, jwks_server, tmp_path):
    return await make_gateway(config_for(upstream, jwks_server, tmp_path))


@pytest.fixture
async def api_key_client(make_gateway, upstream, jwks_server, tmp_path):
    config = config_for(
        upstream, jwks_server, tmp_path, auth={"upstream_credentials": "api_key"}
    )
    upstream.route(
        "GET", EVENTS_UPSTREAM, json_body={"data": {"events": [], "next_cursor": None}}
    )
    return await make_gateway(config)


def admin(rsa_key, tenant_id: str = "acme", role: str = "tenant_admin") -> dict:
    return bearer(mint(rsa_key, tenant_id=tenant_id, sub="admin-1", roles=[role]))


def member(rsa_key, tenant_id: str = "acme", role: str = "tenant_viewer") -> dict:
    return bearer(mint(rsa_key, tenant_id=tenant_id, sub="member-1", roles=[role]))


async def read(client, headers: dict) -> dict:
    response = await client.get(ROUTE, headers=headers)
    assert response.status == 200, await response.text()
    return (await response.json())["data"]


async def set_key(client, headers: dict, **body: Any):
    return await client.post(ROUTE, json=body, headers=headers)


def field_errors(document: dict) -> dict[str, str]:
    return {entry["field"]: entry["message"] for entry in document["detail"]["errors"]}


# Reading and setting


async def test_read_unconfigured(client, rsa_key):
    data = await read(client, member(rsa_key))
    assert data == {"configured": False, "base_url": None, "masked_key": None}


async def test_set_then_read(client, rsa_key):
    response = await set_key(client, admin(rsa_key), api_key=KEY_A, base_url=ALLOWED)
    assert response.status == 204
    assert await response.read() == b""

    data = await read(client, member(rsa_key))
    assert data["configured"] is True
    assert data["masked_key"] == f"sgk_…{KEY_A[-4:]}"
    assert data["base_url"] == ALLOWED


async def test_set_without_base_url(client, rsa_key):
    response = await set_key(client, admin(rsa_key), api_key=KEY_A)
    assert response.status == 204
    assert (await read(client, member(rsa_key)))["base_url"] is None


async def test_set_normalizes_base_url(client, rsa_key):
    response = await set_key(
        client, admin(rsa_key), api_key=KEY_A, base_url=ALLOWED + "/"
    )
    assert response.status == 204
    assert (await read(client, member(rsa_key)))["base_url"] == ALLOWED


async def test_read_mask_shows_eight_characters(client, rsa_key):
    await set_key(client, admin(rsa_key), api_key=KEY_A)
    masked = (await read(client, member(rsa_key)))["masked_key"]
    assert masked.replace("…", "") == KEY_A[:4] + KEY_A[-4:]


def store_directly(tmp_path: Path, **secrets: str) -> None:
    """Write tenant acme's secrets as an operator would, past the route's checks."""
    path = tmp_path / "secrets" / "secrets.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({f"tenants/acme/{name}": value for name, value in secrets.items()})
    )
    path.chmod(0o600)


async def test_read_hides_base_url_credentials(client, rsa_key, tmp_path):
    store_directly(
        tmp_path,
        scaigrid_api_key=KEY_A,
        scaigrid_base_url="https://ops:hunter2@grid.example.com/v1?token=abc#part",
    )
    data = await read(client, member(rsa_key))
    assert data["base_url"] == "https://grid.example.com/v1"
    assert "hunter2" not in json.dumps(data)
    assert "abc" not in json.dumps(data)


async def test_read_hides_unparsable_base_url(client, rsa_key, tmp_path):
    store_directly(tmp_path, scaigrid_api_key=KEY_A, scaigrid_base_url="not a url")
    assert (await read(client, member(rsa_key)))["base_url"] is None


async def test_read_masks_short_key_whole(client, rsa_key, tmp_path):
    store_directly(tmp_path, scaigrid_api_key="superSecretValue")
    data = await read(client, member(rsa_key))
    assert data["configured"] is True
    assert data["masked_key"] == "…"


async def test_set_by_super_admin(client, rsa_key):
    response = await set_key(client, admin(rsa_key, role="super_admin"), api_key=KEY_A)
    assert response.status == 204


async def test_set_writes_tenant_paths(client, rsa_key, tmp_path):
    await set_key(client, admin(rsa_key), api_key=KEY_A, base_url=ALLOWED)
    stored = json.loads((tmp_path / "secrets" / "secrets.json").read_text())
    assert stored == {
        "tenants/acme/scaigrid_api_key": KEY_A,
        "tenants/acme/scaigrid_base_url": ALLOWED,
    }


# Who may call


@pytest.mark.parametrize("role", ["tenant_user", "tenant_viewer", "partner_admin"])
async def test_set_refused_without_admin_role(client, rsa_key, role):
    response = await set_key(client, member(rsa_key, role=role), api_key=KEY_A)
    assert response.status == 403
    detail = (await response.json())["detail"]
    assert detail["error"] == "insufficient_scope"
    assert detail["required"] == ["tenant_admin", "super_admin"]


async def test_refused_set_writes_nothing(client, rsa_key, tmp_path):
    await set_key(client, member(rsa_key), api_key=KEY_A)
    assert not (tmp_path / "secrets" / "secrets.json").exists()


async def test_set_refused_for_permissions_alone(client, rsa_key):
    token = mint(rsa_key, permissions=["scaicore:manage", "scaicore:*"])
    response = await set_key(client, bearer(token), api_key=KEY_A)
    assert response.status == 403


async def test_read_by_member_without_permissions(client, rsa_key):
    token = mint(rsa_key, roles=["tenant_user"])
    response = await client.get(ROUTE, headers=bearer(token))
    assert response.status == 200


async def test_read_needs_token(client):
    response = await client.get(ROUTE)
    assert response.status == 401
    assert (await response.json())["detail"]["error"] == "missing_token"


async def test_set_needs_token(client):
    response = await client.post(ROUTE, json={"api_key": KEY_A})
    assert response.status == 401


# Validation


@pytest.mark.parametrize(
    ("api_key", "expected"),
    [
        ("sgk_" + "a" * 31, "too short"),
        ("sgk_", "too short"),
        ("", "must start with 'sgk_'"),
        ("sk_" + "a" * 40, "must start with 'sgk_'"),
        ("SGK_" + "a" * 40, "must start with 'sgk_'"),
        ("sgk_" + "a" * 31 + "!", "invalid characters"),
        ("sgk_" + "a" * 20 + " " + "a" * 20, "invalid characters"),
        ("sgk_" + "a" * 40 + "\n", "invalid characters"),
        ("sgk_" + "a" * 300, "too long"),
    ],
)
async def test_set_rejects_bad_key(client, rsa_key, api_key, expected):
    response = await set_key(client, admin(rsa_key), api_key=api_key)
    assert response.status == 422
    text = await response.text()
    document = json.loads(text)
    assert document["detail"]["error"] == "validation_error"
    errors = field_errors(document)
    assert list(errors) == ["api_key"]
    assert expected in errors["api_key"]
    if len(api_key) > 4:
        assert api_key.strip() not in text


async def test_set_rejects_key_of_wrong_type(client, rsa_key):
    response = await set_key(client, admin(rsa_key), api_key=12345678)
    assert response.status == 422
    errors = field_errors(await response.json())
    assert errors["api_key"] == "expected a string"


async def test_set_rejects_missing_key(client, rsa_key):
    response = await set_key(client, admin(rsa_key), base_url=ALLOWED)
    assert response.status == 422
    assert field_errors(await response.json())["api_key"] == "required value is missing"


@pytest.mark.parametrize(
    ("base_url", "expected"),
    [
        ("http://grid.example.com", "only for loopback hosts"),
        ("http://10.0.0.8:8080", "only for loopback hosts"),
        ("https://internal.example.net", "not an allowed ScaiGrid base URL"),
        ("https://grid.example.com.evil.test", "not an allowed ScaiGrid base URL"),
        ("https://grid.example.com/other", "not an allowed ScaiGrid base URL"),
        ("https://user:hunter2@grid.example.com", "user name or password"),
        ("https://user@grid.example.com", "user name or password"),
        ("https://@grid.example.com", "user name or password"),
        ("https://grid.example.com/?region=eu", "query string or fragment"),
        ("https://grid.example.com?", "query string or fragment"),
        ("https://grid.example.com#top", "query string or fragment"),
        ("ftp://grid.example.com", "expected an https URL"),
        ("grid.example.com", "expected an https URL"),
        ("https://grid.example.com\r\nX-Injected: 1", "control characters"),
        ("https://" + "a" * 2100 + ".com", "too long"),
        ("https://grid.example.com/other/..", "plain form"),
        ("https://grid.example.com/%2e%2e", "plain form"),
        ("https://grid.example.com/./", "plain form"),
        ("HTTPS://grid.example.com", "plain form"),
        ("https://grid.example.com:0443", "plain form"),
    ],
)
async def test_set_rejects_bad_base_url(client, rsa_key, base_url, expected):
    response = await set_key(client, admin(rsa_key), api_key=KEY_A, base_url=base_url)
    assert response.status == 422
    text = await response.text()
    errors = field_errors(json.loads(text))
    assert list(errors) == ["base_url"]
    assert expected in errors["base_url"]
    assert KEY_A not in text


async def test_userinfo_password_not_echoed(client, rsa_key):
    base_url = "https://user:hunter2@grid.example.com"
    response = await set_key(client, admin(rsa_key), api_key=KEY_A, base_url=base_url)
    assert "hunter2" not in await response.text()


async def test_rejected_base_url_writes_nothing(client, rsa_key, tmp_path):
    await set_key(client, admin(rsa_key), api_key=KEY_A, base_url="http://evil.test")
    assert not (tmp_path / "secrets" / "secrets.json").exists()


async def test_set_accepts_loopback_http(
    make_gateway, upstream, jwks_server, tmp_path, rsa_key
):
    # The recording upstream is http://127.0.0.1:<port>, the gateway's default.
    client = await make_gateway(config_for(upstream, jwks_server, tmp_path))
    response = await set_key(
        client, admin(rsa_key), api_key=KEY_A, base_url=upstream.base_url
    )
    assert response.status == 204


async def test_loopback_http_rejected_in_production(
    make_gateway, upstream, jwks_server, tmp_path, rsa_key
):
    config = config_for(upstream, jwks_server, tmp_path, environment="production")
    client = await make_gateway(config)
    response = await set_key(
        client, admin(rsa_key), api_key=KEY_A, base_url=upstream.base_url
    )
    assert response.status == 422
    errors = field_errors(await response.json())
    assert "environment: production" in errors["base_url"]


async def test_https_allowed_in_production(
    make_gateway, upstream, jwks_server, tmp_path, rsa_key
):
    config = config_for(upstream, jwks_server, tmp_path, environment="production")
    client = await make_gateway(config)
    response = await set_key(client, admin(rsa_key), api_key=KEY_A, base_url=ALLOWED)
    assert response.status == 204


async def test_set_rejects_unknown_field(client, rsa_key, tmp_path):
    response = await set_key(client, admin(rsa_key), api_key=KEY_A, tenant_id="globex")
    assert response.status == 422
    assert list(field_errors(await response.json())) == ["tenant_id"]
    assert not (tmp_path / "secrets" / "secrets.json").exists()


async def test_read_rejects_tenant_query(client, rsa_key):
    response = await client.get(
        ROUTE, params={"tenant_id": "globex"}, headers=member(rsa_key)
    )
    assert response.status == 422
    assert list(field_errors(await response.json())) == ["tenant_id"]


async def test_set_rejects_non_object_body(client, rsa_key):
    response = await client.post(ROUTE, data=b"[1, 2]", headers=admin(rsa_key))
    assert response.status == 400
    assert (await response.json())["detail"]["error"] == "invalid_json"


# Tenant isolation


async def test_tenants_do_not_share_keys(client, rsa_key):
    await set_key(client, admin(rsa_key, tenant_id="acme"), api_key=KEY_A)
    data = await read(client, member(rsa_key, tenant_id="globex"))
    assert data == {"configured": False, "base_url": None, "masked_key": None}


async def test_set_writes_only_callers_tenant(client, rsa_key, tmp_path):
    await set_key(client, admin(rsa_key, tenant_id="globex"), api_key=KEY_B)
    stored = json.loads((tmp_path / "secrets" / "secrets.json").read_text())
    assert list(stored) == ["tenants/globex/scaigrid_api_key"]


async def test_other_tenant_never_proxied_with_key(api_key_client, rsa_key, upstream):
    await set_key(api_key_client, admin(rsa_key, tenant_id="acme"), api_key=KEY_A)
    response = await api_key_client.get(
        EVENTS, headers=member(rsa_key, tenant_id="globex")
    )
    assert response.status == 412
    assert (await response.json())["detail"]["error"] == "missing_credentials"
    assert upstream.requests == []


# The key in use


async def test_new_key_used_by_next_request(api_key_client, rsa_key, upstream):
    await set_key(api_key_client, admin(rsa_key), api_key=KEY_A)
    response = await api_key_client.get(EVENTS, headers=member(rsa_key))
    assert response.status == 200
    assert upstream.last.headers["Authorization"] == f"Bearer {KEY_A}"


async def test_replaced_key_used_at_once(api_key_client, rsa_key, upstream):
    await set_key(api_key_client, admin(rsa_key), api_key=KEY_A)
    first = await api_key_client.get(EVENTS, headers=member(rsa_key))
    assert first.status == 200
    assert upstream.last.headers["Authorization"] == f"Bearer {KEY_A}"

    # The cache keeps KEY_A for 300 s, so only the write can drop it.
    response = await set_key(api_key_client, admin(rsa_key), api_key=KEY_B)
    assert response.status == 204
    second = await api_key_client.get(EVENTS, headers=member(rsa_key))
    assert second.status == 200
    assert upstream.last.headers["Authorization"] == f"Bearer {KEY_B}"


async def test_key_set_after_cached_miss(api_key_client, rsa_key, upstream):
    missing = await api_key_client.get(EVENTS, headers=member(rsa_key))
    assert missing.status == 412
    await set_key(api_key_client, admin(rsa_key), api_key=KEY_A)
    response = await api_key_client.get(EVENTS, headers=member(rsa_key))
    assert response.status == 200
    assert upstream.last.headers["Authorization"] == f"Bearer {KEY_A}"


async def test_stored_base_url_used(
    make_gateway, upstream, jwks_server, tmp_path, rsa_key
):
    # An allowed base URL with a path prefix shows that the stored URL is used.
    prefixed = upstream.base_url + "/tenant-grid"
    config = config_for(
        upstream, jwks_server, tmp_path, auth={"upstream_credentials": "api_key"}
    )
    config["upstream"]["allowed_base_urls"] = [prefixed]
    upstream.route(
        "GET",
        "/tenant-grid" + EVENTS_UPSTREAM,
        json_body={"data": {"events": [], "next_cursor": None}},
    )
    client = await make_gateway(config)
    await set_key(client, admin(rsa_key), api_key=KEY_A, base_url=prefixed)
    response = await client.get(EVENTS, headers=member(rsa_key))
    assert response.status == 200
    assert upstream.last.path == "/tenant-grid" + EVENTS_UPSTREAM


# Audit log


async def test_change_logs_audit_event(client, rsa_key, log_stream):
    await set_key(client, admin(rsa_key), api_key=KEY_A, base_url=ALLOWED)
    events = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    audit = [
        event for event in events if event["event"] == "tenant_credentials_changed"
    ]
    assert len(audit) == 1
    assert audit[0]["level"] == "info"
    assert audit[0]["tenant_id"] == "acme"
    assert audit[0]["sub"] == "admin-1"
    assert audit[0]["masked_key"] == f"sgk_…{KEY_A[-4:]}"
    assert audit[0]["base_url"] == ALLOWED


async def test_raw_key_never_logged(api_key_client, rsa_key, upstream, log_stream):
    await set_key(api_key_client, admin(rsa_key), api_key=KEY_A)
    await api_key_client.get(EVENTS, headers=member(rsa_key))
    await set_key(api_key_client, admin(rsa_key), api_key="sgk_" + "q" * 31 + "!")
    await api_key_client.get(ROUTE, headers=member(rsa_key))

    output = log_stream.getvalue()
    events = [json.loads(line)["event"] for line in output.splitlines()]
    # The log was captured, so the absence below means something.
    assert "tenant_credentials_changed" in events
    assert events.count("request") == 4
    assert KEY_A not in output
    assert KEY_A[4:-4] not in output
    assert "q" * 31 not in output


async def test_rejected_change_not_audited(client, rsa_key, log_stream):
    await set_key(client, member(rsa_key), api_key=KEY_A)
    events = [json.loads(line)["event"] for line in log_stream.getvalue().splitlines()]
    assert "request" in events
    assert "tenant_credentials_changed" not in events


# Without a secret store


async def test_set_without_store(
    make_gateway, upstream, jwks_server, tmp_path, rsa_key
):
    config = config_for(upstream, jwks_server, tmp_path, secrets={"backend": "none"})
    client = await make_gateway(config)
    response = await set_key(client, admin(rsa_key), api_key=KEY_A)
    assert response.status == 503
    detail = (await response.json())["detail"]
    assert detail["error"] == "secret_store_not_configured"
    assert "secrets.backend" in detail["fix"]


async def test_read_without_store(
    make_gateway, upstream, jwks_server, tmp_path, rsa_key
):
    config = config_for(upstream, jwks_server, tmp_path, secrets={"backend": "none"})
    client = await make_gateway(config)
    data = await read(client, member(rsa_key))
    assert data["configured"] is False


# Store failures


async def test_read_corrupt_store(client, rsa_key, tmp_path):
    path = tmp_path / "secrets" / "secrets.json"
    path.parent.mkdir()
    path.write_text('{"tenants/acme/scaigrid_api_key": ')
    response = await client.get(ROUTE, headers=member(rsa_key))
    assert response.status == 502
    detail = (await response.json())["detail"]
    assert detail["error"] == "secret_store_unavailable"
    assert detail["backend"] == "file"
    assert "(file)" in detail["message"]


async def test_set_corrupt_store(client, rsa_key, tmp_path):
    path = tmp_path / "secrets" / "secrets.json"
    path.parent.mkdir()
    path.write_text("[not a mapping]")
    response = await set_key(client, admin(rsa_key), api_key=KEY_A)
    assert response.status == 502
    assert (await response.json())["detail"]["error"] == "secret_store_unavailable"
    assert path.read_text() == "[not a mapping]"


# The OpenAPI document


async def test_openapi_lists_routes(client):
    document = await (await client.get("/openapi.json")).json()
    operations = document["paths"][ROUTE]
    assert set(operations) == {"get", "post"}
    assert "204" in operations["post"]["responses"]
    assert "tenant_admin or super_admin" in operations["post"]["description"]
