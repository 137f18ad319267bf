"""Secret store backends (file, ScaiVault) and the per-tenant secret cache."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from conftest import base_config, bearer, mint
from scaiproxy.errors import ConfigError
from scaiproxy.secrets import (
    FileSecretStore,
    SecretBackendContext,
    SecretStoreError,
    TenantSecretCache,
    scaivault_store,
)

ROUTE = "/api/v1/tenants/me/scaigrid_credentials"
EVENTS = "/api/v1/scaicore/events"
EVENTS_UPSTREAM = "/v1/modules/scaicore/events"
KEY_A = "sgk_" + "a1B2c3D4e5" * 4
KEY_B = "sgk_" + "Zz9_Yy8-Xx" * 4
KEY_PATH = "tenants/acme/scaigrid_api_key"
BASE_URL_PATH = "tenants/acme/scaigrid_base_url"
VAULT_TOKEN = "vault-token-7f3a9c"


# A real ScaiVault stand-in


@dataclass
class Vault:
    """An aiohttp server with ScaiVault's GET and PUT /v1/secrets/{path}."""

    secrets: dict[str, dict[str, Any]] = field(default_factory=dict)
    gets: Counter = field(default_factory=Counter)
    puts: list[dict[str, Any]] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)
    #: A failure mode of ``failure()`` below, or None for normal responses.
    failure: str | None = None
    delay_s: float = 0.0
    #: While set, every GET waits until the test resolves its future.
    hold: bool = False
    waiting: list[asyncio.Future] = field(default_factory=list)
    server: TestServer | None = None

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def store(self, path: str, value: str) -> None:
        self.secrets[path] = {
            "path": path,
            "secret_type": "api_key",
            "version": 1,
            "data": {"value": value},
        }

    def release(self, count: int | None = None) -> None:
        for future in self.waiting[:count]:
            if not future.done():
                future.set_result(None)


@pytest.fixture
async def vault():
    state = Vault()

    def authorized(request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        state.authorizations.append(header)
        return header == f"Bearer {VAULT_TOKEN}"

    async def failure(request: web.Request) -> web.StreamResponse | None:
        if state.delay_s:
            await asyncio.sleep(state.delay_s)
        if state.failure == "500":
            return web.json_response({"error": "internal"}, status=500)
        if state.failure == "non_json":
            return web.Response(
                text="<html>maintenance</html>", content_type="text/html"
            )
        if state.failure == "no_value":
            return web.json_response({"path": "x", "data": {"other": "y"}})
        if state.failure == "redirect":
            return web.Response(status=302, headers={"Location": "http://127.0.0.1:9/"})
        return None

    async def get_secret(request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        state.gets[path] += 1
        if not authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        # Read before holding, so a held request returns what was stored when
        # it arrived.
        secret = state.secrets.get(path)
        if state.hold:
            future = asyncio.get_running_loop().create_future()
            state.waiting.append(future)
            await future
        failed = await failure(request)
        if failed is not None:
            return failed
        if secret is None:
            return web.json_response(
                {"error": "secret_not_found", "message": f"no secret at {path}"},
                status=404,
            )
        return web.json_response(secret)

    async def put_secret(request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        if not authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        failed = await failure(request)
        if failed is not None:
            return failed
        body = await request.json()
        state.puts.append({"path": path, **body})
        version = state.secrets.get(path, {}).get("version", 0) + 1
        state.secrets[path] = {
            "path": path,
            "secret_type": body["secret_type"],
            "version": version,
            "data": body["data"],
        }
        return web.json_response(state.secrets[path])

    app = web.Application()
    app.router.add_get("/v1/secrets/{path:.+}", get_secret)
    app.router.add_put("/v1/secrets/{path:.+}", put_secret)
    state.server = TestServer(app, host="127.0.0.1")
    await state.server.start_server()
    yield state
    state.release()
    await state.server.close()


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as client_session:
        yield client_session


def vault_store(
    vault: Vault, session, timeout_s: float = 2.0, token: str = VAULT_TOKEN
):
    block = {
        "base_url": vault.base_url,
        "token_env": "VAULT_TOKEN",
        "timeout_s": timeout_s,
    }
    context = SecretBackendContext(
        environ={"VAULT_TOKEN": token}, session=lambda: session
    )
    return scaivault_store(block, context)


def vault_config(upstream, jwks_server, vault: Vault, **secrets: Any) -> dict:
    config = base_config(
        upstream.base_url,
        jwks_server.url,
        secrets={
            "backend": "scaivault",
            "cache_ttl_s": 300,
            "scaivault": {
                "base_url": vault.base_url,
                "token_env": "SCAIVAULT_TOKEN",
                "timeout_s": 0.5,
            },
            **secrets,
        },
        plugins={"enabled": ["scaicore", "tenants"]},
    )
    return config


VAULT_ENV = {"SCAIVAULT_TOKEN": VAULT_TOKEN}


def file_config(upstream, jwks_server, path: Path, **secrets: Any) -> dict:
    return base_config(
        upstream.base_url,
        jwks_server.url,
        secrets={
            "backend": "file",
            "cache_ttl_s": 0,
            "file": {"path": str(path)},
            **secrets,
        },
        plugins={"enabled": ["scaicore", "tenants"]},
    )


def caller(rsa_key, tenant_id: str = "acme") -> dict:
    return bearer(mint(rsa_key, tenant_id=tenant_id, roles=["tenant_admin"]))


def temporary_files(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if name.endswith(".tmp")]


# File backend


async def test_file_put_then_get(tmp_path):
    store = FileSecretStore(tmp_path / "secrets.json")
    await store.put(KEY_PATH, KEY_A)
    assert await store.get(KEY_PATH) == KEY_A


async def test_file_missing_is_absent(tmp_path):
    store = FileSecretStore(tmp_path / "secrets.json")
    assert await store.get(KEY_PATH) is None


async def test_file_mode_0600(tmp_path):
    path = tmp_path / "secrets.json"
    await FileSecretStore(path).put(KEY_PATH, KEY_A)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_file_folder_created_0700(tmp_path):
    path = tmp_path / "var" / "secrets.json"
    await FileSecretStore(path).put(KEY_PATH, KEY_A)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


async def test_file_mode_kept_after_rewrite(tmp_path):
    path = tmp_path / "secrets.json"
    path.write_text("{}")
    path.chmod(0o644)
    await FileSecretStore(path).put(KEY_PATH, KEY_A)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_loose_mode_warned_once_per_mode(tmp_path, log_stream):
    path = tmp_path / "secrets.json"
    store = FileSecretStore(path)
    for number, mode in enumerate((0o644, 0o644, 0o640, 0o600, 0o644)):
        # A new value each time, so that every read decodes the file again.
        path.write_text(json.dumps({KEY_PATH: KEY_A + str(number)}))
        path.chmod(mode)
        assert await store.get(KEY_PATH) == KEY_A + str(number)
    warnings = [
        json.loads(line)
        for line in log_stream.getvalue().splitlines()
        if '"secrets_file_permissions"' in line
    ]
    assert [warning["mode"] for warning in warnings] == ["0o644", "0o640", "0o644"]


async def test_file_write_leaves_no_temporary(tmp_path):
    store = FileSecretStore(tmp_path / "secrets.json")
    await store.put(KEY_PATH, KEY_A)
    await store.put(BASE_URL_PATH, "https://grid.example.com")
    assert sorted(os.listdir(tmp_path)) == [".secrets.json.lock", "secrets.json"]


def _write_many(path: str, tenant: str, count: int, start) -> None:
    """Store ``count`` keys from a separate process once ``start`` is set."""

    async def run() -> None:
        store = FileSecretStore(path)
        for index in range(count):
            await store.put(f"tenants/{tenant}-{index}/scaigrid_api_key", KEY_A)

    start.wait(30)
    asyncio.run(run())


def test_file_writes_from_processes_all_kept(tmp_path):
    """Workers of one gateway writing the same file keep each other's keys."""
    import multiprocessing

    path = str(tmp_path / "secrets.json")
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    writers = [
        context.Process(target=_write_many, args=(path, f"w{number}", 60, start))
        for number in range(4)
    ]
    for writer in writers:
        writer.start()
    start.set()
    for writer in writers:
        writer.join(60)
    assert [writer.exitcode for writer in writers] == [0, 0, 0, 0]
    stored = json.loads((tmp_path / "secrets.json").read_text())
    assert len(stored) == 240


async def test_file_write_keeps_other_secrets(tmp_path):
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps({"tenants/globex/scaigrid_api_key": KEY_B}))
    await FileSecretStore(path).put(KEY_PATH, KEY_A)
    assert json.loads(path.read_text()) == {
        KEY_PATH: KEY_A,
        "tenants/globex/scaigrid_api_key": KEY_B,
    }


async def test_file_failed_rename_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "secrets.json"
    store = FileSecretStore(path)
    await store.put(KEY_PATH, KEY_A)
    before = path.read_bytes()

    def fail_replace(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(SecretStoreError) as caught:
        await store.put(KEY_PATH, KEY_B)
    assert caught.value.backend == "file"
    assert path.read_bytes() == before
    assert temporary_files(tmp_path) == []


async def test_file_reload_after_same_size_edit(tmp_path):
    # KEY_A and KEY_B have the same length, so size alone cannot show the edit.
    path = tmp_path / "secrets.json"
    store = FileSecretStore(path)
    path.write_text(json.dumps({KEY_PATH: KEY_A}))
    assert await store.get(KEY_PATH) == KEY_A
    path.write_text(json.dumps({KEY_PATH: KEY_B}))
    assert await store.get(KEY_PATH) == KEY_B


async def test_file_reload_after_old_file_edited(tmp_path):
    path = tmp_path / "secrets.json"
    store = FileSecretStore(path)
    path.write_text(json.dumps({KEY_PATH: KEY_A}))
    an_hour_ago = time.time() - 3600
    os.utime(path, (an_hour_ago, an_hour_ago))
    assert await store.get(KEY_PATH) == KEY_A
    path.write_text(json.dumps({KEY_PATH: KEY_B}))
    assert await store.get(KEY_PATH) == KEY_B


async def test_file_reload_after_replace(tmp_path):
    path = tmp_path / "secrets.json"
    store = FileSecretStore(path)
    await store.put(KEY_PATH, KEY_A)
    replacement = tmp_path / "new.json"
    replacement.write_text(json.dumps({KEY_PATH: KEY_B}))
    os.replace(replacement, path)
    assert await store.get(KEY_PATH) == KEY_B


async def test_file_deleted_is_absent(tmp_path):
    path = tmp_path / "secrets.json"
    store = FileSecretStore(path)
    await store.put(KEY_PATH, KEY_A)
    path.unlink()
    assert await store.get(KEY_PATH) is None


async def test_file_yaml_read(tmp_path):
    path = tmp_path / "secrets.yaml"
    path.write_text(f"{KEY_PATH}: {KEY_A}\n{BASE_URL_PATH}: https://grid.example.com\n")
    store = FileSecretStore(path)
    assert await store.get(KEY_PATH) == KEY_A
    assert await store.get(BASE_URL_PATH) == "https://grid.example.com"


async def test_file_yaml_written_as_yaml(tmp_path):
    path = tmp_path / "secrets.yaml"
    await FileSecretStore(path).put(KEY_PATH, KEY_A)
    assert path.read_text() == f"{KEY_PATH}: {KEY_A}\n"


async def test_file_null_value_is_absent(tmp_path):
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps({KEY_PATH: None}))
    assert await FileSecretStore(path).get(KEY_PATH) is None


async def test_file_empty_is_empty(tmp_path):
    path = tmp_path / "secrets.json"
    path.write_text("\n")
    assert await FileSecretStore(path).get(KEY_PATH) is None


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (
            "secrets.json",
            '{"tenants/acme/scaigrid_api_key": "sgk_abc',
            "not valid JSON",
        ),
        ("secrets.json", '["sgk_abc"]', "must contain a mapping"),
        ("secrets.json", '{"tenants/acme/scaigrid_api_key": 42}', "must be a string"),
        ("secrets.json", '{"tenants/acme/x": {"value": "y"}}', "must be a string"),
        ("secrets.yaml", "tenants/acme/scaigrid_api_key: [sgk_abc\n", "not valid YAML"),
        ("secrets.yaml", "- sgk_abc\n", "must contain a mapping"),
    ],
)
async def test_file_corrupt_raises(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SecretStoreError) as caught:
        await FileSecretStore(path).get(KEY_PATH)
    assert expected in caught.value.message
    assert "sgk_abc" not in caught.value.message


async def test_file_too_large_raises(tmp_path, monkeypatch):
    monkeypatch.setattr("scaiproxy.secrets.MAX_FILE_BYTES", 100)
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps({KEY_PATH: KEY_A, BASE_URL_PATH: "https://x.test"}))
    with pytest.raises(SecretStoreError) as caught:
        await FileSecretStore(path).get(KEY_PATH)
    assert "larger than 100 bytes" in caught.value.message


async def test_file_not_utf8_raises(tmp_path):
    path = tmp_path / "secrets.json"
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(SecretStoreError):
        await FileSecretStore(path).get(KEY_PATH)


async def test_file_corrupt_not_overwritten(tmp_path):
    path = tmp_path / "secrets.json"
    path.write_text('{"tenants/globex/scaigrid_api_key": ')
    with pytest.raises(SecretStoreError):
        await FileSecretStore(path).put(KEY_PATH, KEY_A)
    assert path.read_text() == '{"tenants/globex/scaigrid_api_key": '


@pytest.mark.parametrize(
    "path", ["tenants/../etc/passwd", "/tenants/acme/x", "tenants//x", "a b", ""]
)
async def test_file_rejects_bad_path(tmp_path, path):
    with pytest.raises(ValueError):
        await FileSecretStore(tmp_path / "secrets.json").get(path)


async def test_app_file_reload_after_edit(
    make_gateway, upstream, jwks_server, tmp_path, rsa_key
):
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps({KEY_PATH: KEY_A}))
    client = await make_gateway(file_config(upstream, jwks_server, path))
    first = await (await client.get(ROUTE, headers=caller(rsa_key))).json()
    assert first["data"]["masked_key"] == f"sgk_…{KEY_A[-4:]}"

    path.write_text(json.dumps({KEY_PATH: KEY_B}))
    second = await (await client.get(ROUTE, headers=caller(rsa_key))).json()
    assert second["data"]["masked_key"] == f"sgk_…{KEY_B[-4:]}"


async def test_app_corrupt_file_is_502(
    make_gateway, upstream, jwks_server, tmp_path, rsa_key
):
    path = tmp_path / "secrets.json"
    path.write_text("{not json")
    config = file_config(upstream, jwks_server, path)
    config["auth"]["upstream_credentials"] = "api_key"
    client = await make_gateway(config)
    response = await client.get(EVENTS, headers=caller(rsa_key))
    assert response.status == 502
    detail = (await response.json())["detail"]
    assert detail["error"] == "secret_store_unavailable"
    assert "(file)" in detail["message"]
    assert upstream.requests == []


async def test_app_corrupt_file_hides_path(
    make_gateway, upstream, jwks_server, tmp_path, rsa_key
):
    path = tmp_path / "secrets.json"
    path.write_text("{not json")
    client = await make_gateway(file_config(upstream, jwks_server, path))
    response = await client.get(ROUTE, headers=caller(rsa_key))
    assert str(tmp_path) not in await response.text()


# ScaiVault backend


async def test_vault_put_then_get(vault, session):
    store = vault_store(vault, session)
    await store.put(KEY_PATH, KEY_A)
    assert await store.get(KEY_PATH) == KEY_A


async def test_vault_put_body(vault, session):
    store = vault_store(vault, session)
    await store.put(KEY_PATH, KEY_A)
    await store.put(BASE_URL_PATH, "https://grid.example.com")
    assert vault.puts == [
        {"path": KEY_PATH, "data": {"value": KEY_A}, "secret_type": "api_key"},
        {
            "path": BASE_URL_PATH,
            "data": {"value": "https://grid.example.com"},
            "secret_type": "generic",
        },
    ]


async def test_vault_sends_bearer_token(vault, session):
    await vault_store(vault, session).get(KEY_PATH)
    assert vault.authorizations == [f"Bearer {VAULT_TOKEN}"]


async def test_vault_missing_is_absent(vault, session):
    assert await vault_store(vault, session).get(KEY_PATH) is None


async def test_vault_path_with_colon(vault, session):
    path = "tenants/org:acme/scaigrid_api_key"
    vault.store(path, KEY_A)
    assert await vault_store(vault, session).get(path) == KEY_A


async def test_vault_wrong_token_raises(vault, session):
    store = vault_store(vault, session, token="wrong-token")
    with pytest.raises(SecretStoreError) as caught:
        await store.get(KEY_PATH)
    assert "HTTP 401" in caught.value.message
    assert "$VAULT_TOKEN" in caught.value.message
    assert "wrong-token" not in str(caught.value)


async def test_vault_wrong_token_put_raises(vault, session):
    with pytest.raises(SecretStoreError) as caught:
        await vault_store(vault, session, token="wrong-token").put(KEY_PATH, KEY_A)
    assert "HTTP 401" in caught.value.message


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        ("500", "HTTP 500"),
        ("non_json", "not JSON"),
        ("no_value", "no string 'data.value'"),
        ("redirect", "HTTP 302"),
    ],
)
async def test_vault_get_failure_raises(vault, session, failure, expected):
    vault.store(KEY_PATH, KEY_A)
    vault.failure = failure
    with pytest.raises(SecretStoreError) as caught:
        await vault_store(vault, session).get(KEY_PATH)
    assert caught.value.backend == "scaivault"
    assert expected in caught.value.message


async def test_vault_put_failure_raises(vault, session):
    vault.failure = "500"
    with pytest.raises(SecretStoreError) as caught:
        await vault_store(vault, session).put(KEY_PATH, KEY_A)
    assert "PUT returned HTTP 500" in caught.value.message


async def test_vault_timeout_raises(vault, session):
    vault.store(KEY_PATH, KEY_A)
    vault.delay_s = 2.0
    started = time.monotonic()
    with pytest.raises(SecretStoreError) as caught:
        await vault_store(vault, session, timeout_s=0.2).get(KEY_PATH)
    assert "timed out after 0.2 s" in caught.value.message
    assert time.monotonic() - started < 1.5


async def test_vault_unreachable_raises(session):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    block = {"base_url": f"http://127.0.0.1:{port}", "token_env": "VAULT_TOKEN"}
    context = SecretBackendContext({"VAULT_TOKEN": VAULT_TOKEN}, lambda: session)
    with pytest.raises(SecretStoreError) as caught:
        await scaivault_store(block, context).get(KEY_PATH)
    assert "failed" in caught.value.message


def test_vault_needs_base_url():
    context = SecretBackendContext({"VAULT_TOKEN": VAULT_TOKEN}, lambda: None)
    with pytest.raises(ConfigError) as caught:
        scaivault_store({"token_env": "VAULT_TOKEN"}, context)
    assert caught.value.key == "secrets.scaivault.base_url"


def test_vault_needs_token():
    context = SecretBackendContext({}, lambda: None)
    with pytest.raises(ConfigError) as caught:
        scaivault_store({"base_url": "https://vault.example.com"}, context)
    assert caught.value.key == "secrets.scaivault.token_env"
    assert "SCAIVAULT_TOKEN" in caught.value.message


def test_vault_rejects_token_with_newline():
    context = SecretBackendContext({"T": "abc\r\nX-Evil: 1"}, lambda: None)
    with pytest.raises(ConfigError) as caught:
        scaivault_store(
            {"base_url": "https://vault.example.com", "token_env": "T"}, context
        )
    assert caught.value.key == "secrets.scaivault.token_env"


async def test_app_vault_set_then_read(
    make_gateway, upstream, jwks_server, vault, rsa_key
):
    client = await make_gateway(
        vault_config(upstream, jwks_server, vault), environ=VAULT_ENV
    )
    body = {"api_key": KEY_A, "base_url": upstream.base_url}
    response = await client.post(ROUTE, json=body, headers=caller(rsa_key))
    assert response.status == 204
    assert vault.secrets[KEY_PATH]["data"] == {"value": KEY_A}
    assert vault.secrets[BASE_URL_PATH]["data"] == {"value": upstream.base_url}

    data = (await (await client.get(ROUTE, headers=caller(rsa_key))).json())["data"]
    assert data == {
        "configured": True,
        "base_url": upstream.base_url,
        "masked_key": f"sgk_…{KEY_A[-4:]}",
    }


async def test_app_vault_key_proxied(
    make_gateway, upstream, jwks_server, vault, rsa_key
):
    config = vault_config(upstream, jwks_server, vault)
    config["auth"]["upstream_credentials"] = "api_key"
    upstream.route(
        "GET", EVENTS_UPSTREAM, json_body={"data": {"events": [], "next_cursor": None}}
    )
    vault.store(KEY_PATH, KEY_A)
    client = await make_gateway(config, environ=VAULT_ENV)
    response = await client.get(EVENTS, headers=caller(rsa_key))
    assert response.status == 200
    assert upstream.last.headers["Authorization"] == f"Bearer {KEY_A}"


@pytest.mark.parametrize("failure", ["500", "non_json"])
async def test_app_vault_read_failure_is_502(
    make_gateway, upstream, jwks_server, vault, rsa_key, failure
):
    client = await make_gateway(
        vault_config(upstream, jwks_server, vault), environ=VAULT_ENV
    )
    vault.failure = failure
    response = await client.get(ROUTE, headers=caller(rsa_key))
    assert response.status == 502
    detail = (await response.json())["detail"]
    assert detail["error"] == "secret_store_unavailable"
    assert detail["backend"] == "scaivault"


async def test_app_vault_timeout_is_502(
    make_gateway, upstream, jwks_server, vault, rsa_key
):
    config = vault_config(upstream, jwks_server, vault)
    config["auth"]["upstream_credentials"] = "api_key"
    client = await make_gateway(config, environ=VAULT_ENV)
    vault.delay_s = 2.0
    response = await client.get(EVENTS, headers=caller(rsa_key))
    assert response.status == 502
    assert (await response.json())["detail"]["error"] == "secret_store_unavailable"
    assert upstream.requests == []


async def test_app_vault_write_failure_is_502(
    make_gateway, upstream, jwks_server, vault, rsa_key
):
    client = await make_gateway(
        vault_config(upstream, jwks_server, vault), environ=VAULT_ENV
    )
    vault.failure = "500"
    response = await client.post(
        ROUTE, json={"api_key": KEY_A}, headers=caller(rsa_key)
    )
    assert response.status == 502
    detail = (await response.json())["detail"]
    assert detail["error"] == "secret_store_unavailable"
    assert "written" in detail["message"]


async def test_app_vault_token_never_logged(
    make_gateway, upstream, jwks_server, vault, rsa_key, log_stream
):
    client = await make_gateway(
        vault_config(upstream, jwks_server, vault),
        environ={"SCAIVAULT_TOKEN": "wrong-9x"},
    )
    response = await client.get(ROUTE, headers=caller(rsa_key))
    assert response.status == 502
    output = log_stream.getvalue()
    assert "secret_store_failed" in output
    assert "wrong-9x" not in output


# Caching and single flight


async def test_cache_single_flight(make_gateway, upstream, jwks_server, vault, rsa_key):
    client = await make_gateway(
        vault_config(upstream, jwks_server, vault), environ=VAULT_ENV
    )
    vault.store(KEY_PATH, KEY_A)
    vault.delay_s = 0.1
    headers = caller(rsa_key)
    # One request first, so that the token check is cached and not measured.
    await client.get("/api/v1/me", headers=headers)

    responses = await asyncio.gather(
        *(client.get(ROUTE, headers=headers) for _ in range(50))
    )
    assert [response.status for response in responses] == [200] * 50
    assert vault.gets == Counter({KEY_PATH: 1, BASE_URL_PATH: 1})


async def test_cache_keeps_miss(make_gateway, upstream, jwks_server, vault, rsa_key):
    client = await make_gateway(
        vault_config(upstream, jwks_server, vault), environ=VAULT_ENV
    )
    for _ in range(3):
        response = await client.get(ROUTE, headers=caller(rsa_key))
        assert (await response.json())["data"]["configured"] is False
    assert vault.gets[KEY_PATH] == 1


async def test_cache_expires_after_ttl(
    make_gateway, upstream, jwks_server, vault, rsa_key
):
    config = vault_config(upstream, jwks_server, vault, cache_ttl_s=0.5)
    client = await make_gateway(config, environ=VAULT_ENV)
    await client.get(ROUTE, headers=caller(rsa_key))
    await client.get(ROUTE, headers=caller(rsa_key))
    assert vault.gets[KEY_PATH] == 1

    vault.store(KEY_PATH, KEY_A)
    await asyncio.sleep(0.6)
    response = await client.get(ROUTE, headers=caller(rsa_key))
    assert vault.gets[KEY_PATH] == 2
    assert (await response.json())["data"]["configured"] is True


async def test_cache_ttl_zero_reads_each_time(
    make_gateway, upstream, jwks_server, vault, rsa_key
):
    config = vault_config(upstream, jwks_server, vault, cache_ttl_s=0)
    client = await make_gateway(config, environ=VAULT_ENV)
    for _ in range(3):
        await client.get(ROUTE, headers=caller(rsa_key))
    assert vault.gets[KEY_PATH] == 3


async def test_cache_is_per_tenant(make_gateway, upstream, jwks_server, vault, rsa_key):
    client = await make_gateway(
        vault_config(upstream, jwks_server, vault), environ=VAULT_ENV
    )
    await client.get(ROUTE, headers=caller(rsa_key, tenant_id="acme"))
    await client.get(ROUTE, headers=caller(rsa_key, tenant_id="globex"))
    assert vault.gets[KEY_PATH] == 1
    assert vault.gets["tenants/globex/scaigrid_api_key"] == 1


async def test_cache_failure_not_kept(
    make_gateway, upstream, jwks_server, vault, rsa_key
):
    client = await make_gateway(
        vault_config(upstream, jwks_server, vault), environ=VAULT_ENV
    )
    vault.store(KEY_PATH, KEY_A)
    vault.failure = "500"
    failed = await client.get(ROUTE, headers=caller(rsa_key))
    assert failed.status == 502
    vault.failure = None
    response = await client.get(ROUTE, headers=caller(rsa_key))
    assert (await response.json())["data"]["configured"] is True


async def wait_for_waiting(vault: Vault, count: int) -> None:
    for _ in range(200):
        if len(vault.waiting) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(
        f"expected {count} held vault requests, got {len(vault.waiting)}"
    )


async def test_cache_lookup_before_write_not_kept(vault, session):
    cache = TenantSecretCache(vault_store(vault, session), ttl_s=300)
    vault.hold = True
    stale = asyncio.create_task(cache.get("acme"))
    await wait_for_waiting(vault, 2)

    # A write lands while the first lookup is still in flight.
    vault.store(KEY_PATH, KEY_A)
    cache.invalidate("acme")
    vault.hold = False
    vault.release()
    assert (await stale).api_key is None

    assert (await cache.get("acme")).api_key == KEY_A


async def test_cache_single_flight_after_invalidate(vault, session):
    cache = TenantSecretCache(vault_store(vault, session), ttl_s=300)
    vault.hold = True
    first = asyncio.create_task(cache.get("acme"))
    await wait_for_waiting(vault, 2)
    cache.invalidate("acme")
    second = asyncio.create_task(cache.get("acme"))
    await wait_for_waiting(vault, 4)

    vault.release(2)
    await first
    # The first lookup has ended; a new reader must join the second one.
    third = asyncio.create_task(cache.get("acme"))
    await asyncio.sleep(0.05)
    assert len(vault.waiting) == 4

    vault.release()
    await asyncio.gather(second, third)
    assert vault.gets[KEY_PATH] == 2


async def test_cache_waiter_cancel_keeps_lookup(vault, session):
    cache = TenantSecretCache(vault_store(vault, session), ttl_s=300)
    vault.store(KEY_PATH, KEY_A)
    vault.hold = True
    impatient = asyncio.create_task(cache.get("acme"))
    await wait_for_waiting(vault, 2)
    patient = asyncio.create_task(cache.get("acme"))
    await asyncio.sleep(0)
    impatient.cancel()

    vault.release()
    assert (await patient).api_key == KEY_A
    assert vault.gets[KEY_PATH] == 1


async def test_cache_put_without_store():
    cache = TenantSecretCache(None, ttl_s=30)
    with pytest.raises(SecretStoreError) as caught:
        await cache.put("acme", "scaigrid_api_key", KEY_A)
    assert caught.value.backend == "none"


async def test_cache_rejects_bad_tenant(tmp_path):
    cache = TenantSecretCache(FileSecretStore(tmp_path / "s.json"), ttl_s=30)
    with pytest.raises(ValueError):
        await cache.get("../etc")


# Files that are not regular files

#: Seconds a read of a FIFO may take before the test counts it as blocked.
FIFO_TIMEOUT_S = 5.0


def release_fifo(path: Path) -> None:
    """Open and close the FIFO's write end, so a reader blocked on it gets EOF."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return  # ENXIO: no reader is waiting on the FIFO.
    os.close(descriptor)


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "secrets.json"
    os.mkfifo(path, 0o600)
    yield path
    release_fifo(path)


async def bounded(path: Path, awaitable):
    """Await with a timeout, and release a reader the FIFO still blocks."""
    try:
        return await asyncio.wait_for(awaitable, FIFO_TIMEOUT_S)
    finally:
        release_fifo(path)


async def test_file_fifo_get_rejected(fifo):
    with pytest.raises(SecretStoreError) as caught:
        await bounded(fifo, FileSecretStore(fifo).get(KEY_PATH))
    assert caught.value.message.startswith(f"{fifo} is not a regular file")


async def test_file_fifo_put_rejected(fifo):
    with pytest.raises(SecretStoreError) as caught:
        await bounded(fifo, FileSecretStore(fifo).put(KEY_PATH, KEY_A))
    assert caught.value.message.startswith(f"{fifo} is not a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert temporary_files(fifo.parent) == []


async def test_file_symlink_to_fifo_rejected(fifo):
    link = fifo.parent / "link.json"
    link.symlink_to(fifo)
    with pytest.raises(SecretStoreError) as caught:
        await bounded(fifo, FileSecretStore(link).get(KEY_PATH))
    assert "is not a regular file" in caught.value.message


async def test_file_device_rejected():
    with pytest.raises(SecretStoreError) as caught:
        await FileSecretStore(os.devnull).get(KEY_PATH)
    assert caught.value.message.startswith(f"{os.devnull} is not a regular file")


async def test_file_folder_rejected(tmp_path):
    folder = tmp_path / "secrets.json"
    folder.mkdir()
    with pytest.raises(SecretStoreError) as caught:
        await FileSecretStore(folder).get(KEY_PATH)
    assert "is not a regular file" in caught.value.message


async def test_file_symlink_to_file_read(tmp_path):
    target = tmp_path / "real.json"
    target.write_text(json.dumps({KEY_PATH: KEY_A}))
    link = tmp_path / "secrets.json"
    link.symlink_to(target)
    assert await FileSecretStore(link).get(KEY_PATH) == KEY_A


async def test_file_deep_yaml_raises(tmp_path):
    path = tmp_path / "secrets.yaml"
    path.write_text("a: " + "[" * 2000 + "]" * 2000 + "\n")
    with pytest.raises(SecretStoreError) as caught:
        await FileSecretStore(path).get(KEY_PATH)
    assert "nested too deeply" in caught.value.message


def failed_lines(log_stream) -> list[dict]:
    lines = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    return [line for line in lines if line.get("event") == "secret_store_failed"]


async def test_app_fifo_read_is_502(
    make_gateway, upstream, jwks_server, rsa_key, fifo, log_stream
):
    config = file_config(upstream, jwks_server, fifo)
    config["auth"]["upstream_credentials"] = "api_key"
    client = await make_gateway(config)

    response = await bounded(fifo, client.get(EVENTS, headers=caller(rsa_key)))
    detail = (await response.json())["detail"]

    assert response.status == 502
    assert detail["error"] == "secret_store_unavailable"
    assert upstream.requests == []
    [line] = failed_lines(log_stream)
    assert line["error"].startswith(f"{fifo} is not a regular file")


async def test_app_fifo_write_is_502(
    make_gateway, upstream, jwks_server, rsa_key, fifo, log_stream
):
    client = await make_gateway(file_config(upstream, jwks_server, fifo))

    response = await bounded(
        fifo, client.post(ROUTE, json={"api_key": KEY_A}, headers=caller(rsa_key))
    )
    detail = (await response.json())["detail"]

    assert response.status == 502
    assert detail["error"] == "secret_store_unavailable"
    assert "written" in detail["message"]
    assert str(fifo) not in detail["message"]
    [line] = failed_lines(log_stream)
    assert line["error"].startswith(f"{fifo} is not a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
