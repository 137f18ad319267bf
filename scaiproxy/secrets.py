"""Tenant secrets: the store interface, two backends, and a per-tenant cache.

Secrets are addressed by path, for example ``tenants/acme/scaigrid_api_key``.
A backend returns ``None`` for a secret that does not exist and raises
:class:`SecretStoreError` when it cannot answer; the gateway never treats an
unreachable store as an absent secret.
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import structlog
import yaml

from scaiproxy import jsonutil
from scaiproxy.config import FileSecretsConfig, ScaiVaultConfig
from scaiproxy.errors import ConfigError

log = structlog.get_logger("scaiproxy.secrets")

API_KEY_NAME = "scaigrid_api_key"
BASE_URL_NAME = "scaigrid_base_url"
_SECRET_PATH = re.compile(r"[A-Za-z0-9_.:-]+(/[A-Za-z0-9_.:-]+)*")


class SecretStoreError(Exception):
    """The secret store could not be read or written."""

    def __init__(self, backend: str, message: str) -> None:
        super().__init__(f"{backend}: {message}")
        self.backend = backend
        self.message = message


class SecretStore(Protocol):
    """What a secret backend implements."""

    name: str

    async def get(self, path: str) -> str | None:
        """Return the secret's value, or ``None`` when it does not exist."""

    async def put(self, path: str, value: str) -> None:
        """Create or replace the secret."""

    async def close(self) -> None:
        """Release what the backend holds."""


def tenant_secret_path(tenant_id: str, name: str) -> str:
    """Build the path of a tenant secret, rejecting ids that could escape it."""
    if tenant_id in (".", "..") or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,128}", tenant_id):
        raise ValueError(f"invalid tenant id {tenant_id[:140]!r}")
    return f"tenants/{tenant_id}/{name}"


def _check_path(path: str) -> None:
    if not _SECRET_PATH.fullmatch(path) or any(
        part in (".", "..") for part in path.split("/")
    ):
        raise ValueError(f"invalid secret path {path[:200]!r}")


class FileSecretStore:
    """Secrets in one local JSON or YAML file: a mapping of path to value.

    The file is reread when its modification time or size changes, and written
    atomically (a temporary file in the same folder, then a rename) with mode 0600.
    """

    name = "file"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._signature: tuple[int, int] | None = None
        self._values: dict[str, str] = {}
        self._lock = asyncio.Lock()

    async def get(self, path: str) -> str | None:
        _check_path(path)
        return self._load().get(path)

    async def put(self, path: str, value: str) -> None:
        _check_path(path)
        async with self._lock:
            values = dict(self._load())
            values[path] = value
            await asyncio.to_thread(self._write, values)
            self._values = values
            self._signature = self._stat()

    async def close(self) -> None:
        return None

    def _stat(self) -> tuple[int, int] | None:
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SecretStoreError(self.name, f"cannot read {self.path}: {exc}") from None
        return (info.st_mtime_ns, info.st_size)

    def _load(self) -> dict[str, str]:
        signature = self._stat()
        if signature is None:
            self._values, self._signature = {}, None
            return self._values
        if signature == self._signature:
            return self._values
        try:
            text = self.path.read_text(encoding="utf-8")
            data = yaml.safe_load(text) if text.strip() else {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise SecretStoreError(
                self.name, f"cannot read {self.path}: {type(exc).__name__}"
            ) from None
        if not isinstance(data, Mapping):
            raise SecretStoreError(
                self.name, f"{self.path} must contain a mapping of secret path to value"
            )
        self._values = {str(k): str(v) for k, v in data.items() if v is not None}
        self._signature = signature
        return self._values

    def _write(self, values: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
        )
        try:
            os.fchmod(handle, 0o600)
            with os.fdopen(handle, "wb") as stream:
                stream.write(jsonutil.dumps(dict(sorted(values.items()))))
                stream.write(b"\n")
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, self.path)
        except OSError as exc:
            Path(temporary).unlink(missing_ok=True)
            raise SecretStoreError(self.name, f"cannot write {self.path}: {exc}") from None


class ScaiVaultSecretStore:
    """Secrets in ScaiVault: ``GET``/``PUT /v1/secrets/{path}`` with a bearer token.

    A secret object carries its value in ``data.value``.
    """

    name = "scaivault"

    def __init__(
        self,
        config: ScaiVaultConfig,
        session: Callable[[], aiohttp.ClientSession],
        token: str,
    ) -> None:
        self._base_url = config.base_url
        self._session = session
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_s)

    def _url(self, path: str) -> str:
        return f"{self._base_url}/v1/secrets/{quote(path, safe='/')}"

    async def get(self, path: str) -> str | None:
        _check_path(path)
        try:
            async with self._session().get(
                self._url(path), headers=self._headers, timeout=self._timeout
            ) as response:
                status = response.status
                body = await response.content.read(1024 * 1024)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise SecretStoreError(
                self.name, f"request failed: {type(exc).__name__}"
            ) from None
        if status == 404:
            return None
        if status != 200:
            raise SecretStoreError(self.name, f"GET answered HTTP {status}")
        try:
            document = jsonutil.loads(body)
        except jsonutil.JSONSyntaxError:
            raise SecretStoreError(self.name, "GET answered with a non-JSON body") from None
        data = document.get("data") if isinstance(document, dict) else None
        value = data.get("value") if isinstance(data, dict) else None
        if not isinstance(value, str):
            raise SecretStoreError(
                self.name, "the secret object has no string 'data.value'"
            )
        return value

    async def put(self, path: str, value: str) -> None:
        _check_path(path)
        payload = {"data": {"value": value}, "secret_type": "api_key"}
        try:
            async with self._session().put(
                self._url(path),
                data=jsonutil.dumps(payload),
                headers={**self._headers, "Content-Type": "application/json"},
                timeout=self._timeout,
            ) as response:
                status = response.status
                await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise SecretStoreError(
                self.name, f"request failed: {type(exc).__name__}"
            ) from None
        if status not in (200, 201, 204):
            raise SecretStoreError(self.name, f"PUT answered HTTP {status}")

    async def close(self) -> None:
        return None


@dataclass
class SecretBackendContext:
    """What a secret backend factory may use besides its own config block."""

    environ: Mapping[str, str]
    #: Returns the gateway's shared client session; valid once the app runs.
    session: Callable[[], aiohttp.ClientSession]


SecretBackendFactory = Callable[[Mapping[str, Any], SecretBackendContext], SecretStore]


def file_store(block: Mapping[str, Any], context: SecretBackendContext) -> FileSecretStore:
    config = _parse(FileSecretsConfig, block, "file")
    return FileSecretStore(config.path)


def scaivault_store(
    block: Mapping[str, Any], context: SecretBackendContext
) -> ScaiVaultSecretStore:
    config = _parse(ScaiVaultConfig, block, "scaivault")
    if not config.base_url:
        raise ConfigError("secrets.scaivault.base_url", "required value is missing")
    token = context.environ.get(config.token_env)
    if not token:
        raise ConfigError(
            "secrets.scaivault.token_env",
            f"environment variable {config.token_env} is not set; it must hold "
            "the ScaiVault bearer token",
        )
    return ScaiVaultSecretStore(config, context.session, token)


def _parse(model: Any, block: Mapping[str, Any], name: str) -> Any:
    from pydantic import ValidationError

    from scaiproxy.config import format_errors

    try:
        return model.model_validate(block)
    except ValidationError as exc:
        key, message = format_errors(exc, f"secrets.{name}")[0]
        raise ConfigError(key, message) from None


@dataclass(frozen=True)
class TenantSecrets:
    """A tenant's ScaiGrid key and base URL, as read from the store."""

    api_key: str | None
    base_url: str | None


class TenantSecretCache:
    """Per-tenant secret reads, cached for a TTL (misses too), one lookup at a time.

    Concurrent misses for one tenant share a single lookup, so a burst of requests
    after a cache expiry costs the store one read per secret.
    """

    def __init__(self, store: SecretStore | None, ttl_s: float) -> None:
        self.store = store
        self._ttl = ttl_s
        self._entries: dict[str, tuple[float, TenantSecrets]] = {}
        self._pending: dict[str, asyncio.Future[TenantSecrets]] = {}
        # Bumped on every write, so a lookup that started before it is not cached.
        self._generation: dict[str, int] = {}

    async def get(self, tenant_id: str) -> TenantSecrets:
        if self.store is None:
            return TenantSecrets(None, None)
        entry = self._entries.get(tenant_id)
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]
        pending = self._pending.get(tenant_id)
        if pending is None:
            pending = asyncio.ensure_future(self._lookup(tenant_id))
            self._pending[tenant_id] = pending
            pending.add_done_callback(lambda _: self._pending.pop(tenant_id, None))
        return await asyncio.shield(pending)

    async def _lookup(self, tenant_id: str) -> TenantSecrets:
        assert self.store is not None
        generation = self._generation.get(tenant_id, 0)
        api_key, base_url = await asyncio.gather(
            self.store.get(tenant_secret_path(tenant_id, API_KEY_NAME)),
            self.store.get(tenant_secret_path(tenant_id, BASE_URL_NAME)),
        )
        secrets = TenantSecrets(api_key or None, base_url or None)
        if self._ttl > 0 and generation == self._generation.get(tenant_id, 0):
            self._entries[tenant_id] = (time.monotonic() + self._ttl, secrets)
        return secrets

    def invalidate(self, tenant_id: str) -> None:
        """Drop what is cached for one tenant, so the next read goes to the store."""
        self._entries.pop(tenant_id, None)
        self._pending.pop(tenant_id, None)
        self._generation[tenant_id] = self._generation.get(tenant_id, 0) + 1

    async def put(self, tenant_id: str, name: str, value: str) -> None:
        if self.store is None:
            raise SecretStoreError("none", "no secret store is configured (secrets.backend: none)")
        await self.store.put(tenant_secret_path(tenant_id, name), value)
        self.invalidate(tenant_id)
