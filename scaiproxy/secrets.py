"""Tenant secrets: the store interface, two backends, and a per-tenant cache.

Secrets are addressed by path, for example ``tenants/acme/scaigrid_api_key``.
A backend returns ``None`` for a secret that does not exist and raises
:class:`SecretStoreError` when it cannot read or write the store. The gateway
never treats an unreachable or unreadable store as an absent secret.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import structlog
import yaml
from yarl import URL

from scaiproxy import jsonutil
from scaiproxy.config import FileSecretsConfig, ScaiVaultConfig
from scaiproxy.errors import ConfigError

log = structlog.get_logger("scaiproxy.secrets")

API_KEY_NAME = "scaigrid_api_key"
BASE_URL_NAME = "scaigrid_base_url"
_SECRET_PATH = re.compile(r"[A-Za-z0-9_.:-]+(/[A-Za-z0-9_.:-]+)*")
_TENANT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_MAX_PATH_LENGTH = 512


class SecretStoreError(Exception):
    """The secret store could not be read or written.

    ``message`` is for the operator's log: it may name files and hosts, but
    never a secret value.
    """

    def __init__(self, backend: str, message: str) -> None:
        super().__init__(f"{backend}: {message}")
        self.backend = backend
        self.message = message


class SecretStore(Protocol):
    """The interface a secret backend implements."""

    name: str

    async def get(self, path: str) -> str | None:
        """Return the secret's value, or ``None`` when it does not exist."""

    async def put(self, path: str, value: str) -> None:
        """Create or replace the secret."""

    async def close(self) -> None:
        """Release what the backend holds."""


def tenant_secret_path(tenant_id: str, name: str) -> str:
    """Build the path of a tenant secret, rejecting ids that could escape it."""
    if tenant_id in (".", "..") or not _TENANT_ID.fullmatch(tenant_id):
        raise ValueError(f"invalid tenant id {tenant_id[:140]!r}")
    return f"tenants/{tenant_id}/{name}"


def check_secret_path(path: str) -> None:
    """Raise ``ValueError`` for a path with odd characters or ``.``/``..`` parts."""
    if (
        len(path) > _MAX_PATH_LENGTH
        or not _SECRET_PATH.fullmatch(path)
        or any(part in (".", "..") for part in path.split("/"))
    ):
        raise ValueError(f"invalid secret path {path[:200]!r}")


# The file backend


# A second edit within one timestamp tick (one second on some file systems) can
# leave the size and times unchanged. So for this long after a file's last
# modification, its content is compared as well.
_RACY_WINDOW_NS = 2_000_000_000
# Keeps a wrongly configured path, such as a disk image, from being read into memory.
MAX_FILE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class _Snapshot:
    signature: tuple[int, int, int, int]
    loaded_at_ns: int
    raw: bytes
    values: dict[str, str]


class FileSecretStore:
    """Secrets in one local JSON or YAML file: a mapping of secret path to value.

    A file named ``*.json`` is read and written as JSON, any other name as YAML.
    The file is read again when it changes on disk, and written atomically: a
    temporary file with mode 0600 in the same folder, synced, then renamed over
    the old one. A missing parent folder is created with mode 0700.
    """

    name = "file"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._json = self.path.suffix.lower() == ".json"
        self._snapshot: _Snapshot | None = None
        self._lock = asyncio.Lock()
        #: The loose mode last warned about, so one mode is warned about once.
        self._warned_mode: int | None = None

    async def get(self, path: str) -> str | None:
        check_secret_path(path)
        values = await self._load()
        return values.get(path)

    async def put(self, path: str, value: str) -> None:
        check_secret_path(path)
        async with self._lock:
            raw, values = await asyncio.to_thread(self._locked_update, path, value)
            signature = self._stat()
            if signature is not None:
                self._snapshot = _Snapshot(signature, time.time_ns(), raw, values)

    def _locked_update(self, path: str, value: str) -> tuple[bytes, dict[str, str]]:
        """Read, change and write the file while holding an exclusive lock on it.

        The lock (``flock`` on ``.<name>.lock`` beside the file) is shared by
        every process, so gateway workers writing at once each keep the
        others' changes. The file is read afresh under the lock; one that
        cannot be read is never overwritten, because its other secrets would
        be lost.
        """
        folder = self.path.parent
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock = os.open(
                folder / f".{self.path.name}.lock", os.O_RDWR | os.O_CREAT, 0o600
            )
        except OSError as exc:
            raise SecretStoreError(
                self.name, f"cannot write {self.path}: {exc}"
            ) from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = self._read_file()
            except FileNotFoundError:
                current = b""
            values = dict(self._decode(current))
            values[path] = value
            raw = self._encode(values)
            self._write(raw)
            return raw, values
        finally:
            os.close(lock)  # also releases the lock

    async def close(self) -> None:
        return None

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SecretStoreError(
                self.name, f"cannot read {self.path}: {exc}"
            ) from None
        return (info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_ino)

    async def _load(self) -> dict[str, str]:
        signature = self._stat()
        if signature is None:
            self._snapshot = None
            return {}

        if signature[2] > MAX_FILE_BYTES:
            raise self._too_large()
        snapshot = self._snapshot
        now = time.time_ns()
        if snapshot is not None and snapshot.signature == signature:
            if snapshot.loaded_at_ns - signature[0] > _RACY_WINDOW_NS:
                return snapshot.values

        try:
            raw = await asyncio.to_thread(self._read_file)
        except FileNotFoundError:
            self._snapshot = None
            return {}

        if snapshot is not None and snapshot.raw == raw:
            values = snapshot.values
        else:
            values = self._decode(raw)
            self._check_mode()
        self._snapshot = _Snapshot(signature, now, raw, values)
        return values

    def _read_file(self) -> bytes:
        """Read the file, which must be a regular file of at most MAX_FILE_BYTES.

        Symbolic links are followed. Raises ``FileNotFoundError`` when the file does not exist and
        :class:`SecretStoreError` when it cannot be used.
        """
        try:
            # O_NONBLOCK: opening a FIFO that has no writer would wait forever.
            descriptor = os.open(
                self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            )
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise SecretStoreError(
                self.name, f"cannot read {self.path}: {exc}"
            ) from None
        try:
            # fstat on the open descriptor, so the path cannot be swapped between
            # the check and the read. stat() reports a FIFO or a device as 0
            # bytes, and reading one can block or never end.
            info = os.fstat(descriptor)
            if not stat.S_ISREG(info.st_mode):
                raise SecretStoreError(
                    self.name,
                    f"{self.path} is not a regular file, so check that "
                    "secrets.file.path names the secrets file",
                )
            if info.st_size > MAX_FILE_BYTES:
                raise self._too_large()
            with open(descriptor, "rb", closefd=False) as stream:
                raw = stream.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise SecretStoreError(
                self.name, f"cannot read {self.path}: {exc}"
            ) from None
        finally:
            os.close(descriptor)
        if len(raw) > MAX_FILE_BYTES:
            # The file grew after the fstat.
            raise self._too_large()
        return raw

    def _too_large(self) -> SecretStoreError:
        return SecretStoreError(
            self.name,
            f"{self.path} is larger than {MAX_FILE_BYTES} bytes, so check that "
            "secrets.file.path names the secrets file",
        )

    def _decode(self, raw: bytes) -> dict[str, str]:
        if not raw.strip():
            return {}
        try:
            if self._json:
                document = jsonutil.loads(raw)
            else:
                document = yaml.safe_load(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise SecretStoreError(
                self.name, f"{self.path} is not UTF-8 text"
            ) from None
        except jsonutil.JSONSyntaxError as exc:
            # The decoder's message gives the position, never the content.
            raise SecretStoreError(
                self.name, f"{self.path} is not valid JSON: {exc}"
            ) from None
        except RecursionError:
            # PyYAML's composer recurses once per level of nesting.
            raise SecretStoreError(
                self.name, f"{self.path} is not valid YAML: it is nested too deeply"
            ) from None
        except yaml.YAMLError as exc:
            # PyYAML's message quotes the offending line, which may be a secret.
            mark = getattr(exc, "problem_mark", None)
            where = (
                f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            )
            raise SecretStoreError(
                self.name, f"{self.path} is not valid YAML{where}"
            ) from None

        if document is None:
            return {}
        if not isinstance(document, Mapping):
            raise SecretStoreError(
                self.name,
                f"{self.path} must contain a mapping of secret path to value, "
                f"not a {type(document).__name__}",
            )
        values: dict[str, str] = {}
        for key, value in document.items():
            if value is None:
                continue
            if not isinstance(value, str):
                raise SecretStoreError(
                    self.name,
                    f"{self.path}: the value of {str(key)[:200]!r} is a "
                    f"{type(value).__name__}; every value must be a string",
                )
            values[str(key)] = value
        return values

    def _check_mode(self) -> None:
        try:
            mode = stat.S_IMODE(self.path.stat().st_mode)
        except OSError:
            return
        if not mode & 0o077:
            self._warned_mode = None
        elif mode != self._warned_mode:
            self._warned_mode = mode
            log.warning(
                "secrets_file_permissions",
                path=str(self.path),
                mode=oct(mode),
                message="the secrets file is readable by other users, so run "
                "chmod 600 on it",
            )

    def _encode(self, values: Mapping[str, str]) -> bytes:
        ordered = dict(sorted(values.items()))
        if self._json:
            return jsonutil.dumps(ordered) + b"\n"
        text = yaml.safe_dump(ordered, default_flow_style=False, allow_unicode=True)
        return text.encode("utf-8")

    def _write(self, raw: bytes) -> None:
        folder = self.path.parent
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(
                dir=folder, prefix=f".{self.path.name}.", suffix=".tmp"
            )
        except OSError as exc:
            raise SecretStoreError(
                self.name, f"cannot write {self.path}: {exc}"
            ) from None
        try:
            # mkstemp creates the file readable and writable by its owner only.
            with os.fdopen(handle, "wb") as stream:
                stream.write(raw)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, self.path)
        except BaseException as exc:
            Path(temporary).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise SecretStoreError(
                    self.name, f"cannot write {self.path}: {exc}"
                ) from None
            raise
        _sync_folder(folder)


def _sync_folder(folder: Path) -> None:
    # The rename is durable only once the folder itself is synced.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# The ScaiVault backend

_MAX_VAULT_BODY = 1024 * 1024


class ScaiVaultSecretStore:
    """Secrets in ScaiVault: ``GET`` and ``PUT /v1/secrets/{path}`` with a bearer token.

    A secret object is ``{"path", "secret_type", "version", "data": {...}}``
    with the value in ``data.value``. 404 means the secret does not exist, and
    every other failure raises :class:`SecretStoreError`.
    """

    name = "scaivault"

    def __init__(
        self,
        config: ScaiVaultConfig,
        session: Callable[[], aiohttp.ClientSession],
        token: str,
    ) -> None:
        self._base_url = config.base_url
        self._token_env = config.token_env
        self._session = session
        self._headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
        }
        self._timeout_s = config.timeout_s
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_s)

    def _url(self, path: str) -> URL:
        # The path is checked first, so quoting only has ':' left to escape.
        return URL(f"{self._base_url}/v1/secrets/{quote(path, safe='/')}", encoded=True)

    async def get(self, path: str) -> str | None:
        check_secret_path(path)
        status, body = await self._exchange("GET", path, None)
        if status == 404:
            return None
        if status != 200:
            raise self._status_error("GET", status)
        try:
            document = jsonutil.loads(body)
        except jsonutil.JSONSyntaxError:
            raise SecretStoreError(
                self.name, f"GET {path} returned a body that is not JSON"
            ) from None
        data = document.get("data") if isinstance(document, dict) else None
        value = data.get("value") if isinstance(data, dict) else None
        if not isinstance(value, str):
            raise SecretStoreError(
                self.name, f"the secret object at {path} has no string 'data.value'"
            )
        return value

    async def put(self, path: str, value: str) -> None:
        check_secret_path(path)
        secret_type = "api_key" if path.endswith("_api_key") else "generic"
        payload = jsonutil.dumps({"data": {"value": value}, "secret_type": secret_type})
        status, _ = await self._exchange("PUT", path, payload)
        if status not in (200, 201, 204):
            raise self._status_error("PUT", status)

    async def close(self) -> None:
        # The session is the gateway's shared one, closed by the app.
        return None

    async def _exchange(
        self, method: str, path: str, payload: bytes | None
    ) -> tuple[int, bytes]:
        headers = dict(self._headers)
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self._session().request(
                method,
                self._url(path),
                data=payload,
                headers=headers,
                timeout=self._timeout,
                # SECURITY: a redirect would carry the vault token elsewhere.
                allow_redirects=False,
            ) as response:
                body = await _read_limited(response, _MAX_VAULT_BODY)
                return response.status, body
        except asyncio.TimeoutError:
            raise SecretStoreError(
                self.name, f"{method} {path} timed out after {self._timeout_s:g} s"
            ) from None
        except aiohttp.ClientError as exc:
            raise SecretStoreError(
                self.name, f"{method} {path} failed: {type(exc).__name__}: {exc}"
            ) from None

    def _status_error(self, method: str, status: int) -> SecretStoreError:
        if status in (401, 403):
            return SecretStoreError(
                self.name,
                f"{method} returned HTTP {status}: the token in ${self._token_env} "
                "is wrong, expired or lacks access to tenant secrets",
            )
        return SecretStoreError(self.name, f"{method} returned HTTP {status}")


async def _read_limited(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """Read the whole body, raising once it passes ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise aiohttp.ClientPayloadError(f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# Backend factories, as returned by the scaiproxy_secret_backends hook


@dataclass
class SecretBackendContext:
    """Services a secret backend factory may use besides its own config block."""

    #: The process environment (or the mapping a test passes to ``create_app``).
    environ: Mapping[str, str]
    #: Returns the gateway's shared client session; valid once the app runs.
    session: Callable[[], aiohttp.ClientSession]


SecretBackendFactory = Callable[[Mapping[str, Any], SecretBackendContext], SecretStore]


def file_store(
    block: Mapping[str, Any], context: SecretBackendContext
) -> FileSecretStore:
    """Build the ``file`` backend from the ``secrets.file`` block."""
    config = _parse(FileSecretsConfig, block, "file")
    if not config.path:
        raise ConfigError("secrets.file.path", "required value is missing")
    return FileSecretStore(config.path)


def scaivault_store(
    block: Mapping[str, Any], context: SecretBackendContext
) -> ScaiVaultSecretStore:
    """Build the ``scaivault`` backend from the ``secrets.scaivault`` block."""
    config = _parse(ScaiVaultConfig, block, "scaivault")
    if not config.base_url:
        raise ConfigError(
            "secrets.scaivault.base_url",
            "required value is missing; set it to ScaiVault's base URL, such as "
            "https://scaivault.example.com",
        )
    token = context.environ.get(config.token_env, "").strip()
    if not token:
        raise ConfigError(
            "secrets.scaivault.token_env",
            f"environment variable {config.token_env} is not set; it must hold "
            "the ScaiVault bearer token",
        )
    if any(ch.isspace() or not ch.isprintable() for ch in token):
        raise ConfigError(
            "secrets.scaivault.token_env",
            f"the token in {config.token_env} contains spaces or control "
            "characters; store the bare token",
        )
    url = URL(config.base_url)
    if url.scheme == "http" and not is_loopback_host(url.host or ""):
        log.warning(
            "scaivault_plain_http",
            base_url=config.base_url,
            message="the ScaiVault token and tenant keys travel unencrypted, "
            "so use an https base URL",
        )
    return ScaiVaultSecretStore(config, context.session, token)


def is_loopback_host(host: str) -> bool:
    """Tell whether ``host`` is ``localhost`` or an address in 127.0.0.0/8 or ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse(model: Any, block: Mapping[str, Any], name: str) -> Any:
    from scaiproxy.config import parse_block

    return parse_block(model, block, f"secrets.{name}")


# The per-tenant cache


@dataclass(frozen=True)
class TenantSecrets:
    """A tenant's ScaiGrid key and base URL, as read from the store."""

    api_key: str | None
    base_url: str | None


_NO_SECRETS = TenantSecrets(None, None)


class TenantSecretCache:
    """Per-tenant secret reads, cached for a TTL (misses too), one lookup at a time.

    Concurrent misses for one tenant share a single lookup, so a burst of
    requests after a cache expiry costs the store one read per secret. Failed
    lookups are not cached. A write through :meth:`put` drops the tenant's entry,
    so the next read of that tenant goes to the store. Other gateway processes
    keep their entry until its TTL ends.
    """

    #: Past this many entries, expired ones are dropped, then the oldest.
    max_entries = 100_000

    def __init__(self, store: SecretStore | None, ttl_s: float) -> None:
        self.store = store
        self._ttl = ttl_s
        self._entries: dict[str, tuple[float, TenantSecrets]] = {}
        self._pending: dict[str, asyncio.Future[TenantSecrets]] = {}
        # Bumped on every write, so a lookup that started before it is not cached.
        self._generation: dict[str, int] = {}

    @property
    def backend(self) -> str:
        """The configured backend's name, ``none`` without a store."""
        return self.store.name if self.store is not None else "none"

    def cached(self, tenant_id: str) -> TenantSecrets | None:
        """Return the tenant's secrets while their cached entry is fresh, else
        ``None``, without a lookup."""
        if self.store is None:
            return _NO_SECRETS
        entry = self._entries.get(tenant_id)
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]
        return None

    async def get(self, tenant_id: str) -> TenantSecrets:
        """Return the tenant's secrets, looking them up on a cache miss.

        Raises :class:`SecretStoreError` when the store fails and ``ValueError``
        for a tenant id that cannot name a secret.
        """
        if self.store is None:
            return _NO_SECRETS
        entry = self._entries.get(tenant_id)
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]

        pending = self._pending.get(tenant_id)
        if pending is None:
            pending = asyncio.ensure_future(self._lookup(tenant_id))
            self._pending[tenant_id] = pending
            pending.add_done_callback(lambda done: self._forget(tenant_id, done))
        return await asyncio.shield(pending)

    def _forget(self, tenant_id: str, done: asyncio.Future[TenantSecrets]) -> None:
        # invalidate() may already have replaced this lookup with a newer one.
        if self._pending.get(tenant_id) is done:
            del self._pending[tenant_id]
        # Mark the exception as retrieved even when every waiter was cancelled.
        if not done.cancelled():
            done.exception()

    async def _lookup(self, tenant_id: str) -> TenantSecrets:
        assert self.store is not None
        generation = self._generation.get(tenant_id, 0)
        api_key, base_url = await asyncio.gather(
            self.store.get(tenant_secret_path(tenant_id, API_KEY_NAME)),
            self.store.get(tenant_secret_path(tenant_id, BASE_URL_NAME)),
        )
        secrets = TenantSecrets(api_key or None, base_url or None)
        if self._ttl > 0 and generation == self._generation.get(tenant_id, 0):
            self._remember(tenant_id, secrets)
        return secrets

    def _remember(self, tenant_id: str, secrets: TenantSecrets) -> None:
        now = time.monotonic()
        if len(self._entries) >= self.max_entries:
            for key in [k for k, (expiry, _) in self._entries.items() if expiry <= now]:
                del self._entries[key]
            while len(self._entries) >= self.max_entries:
                del self._entries[next(iter(self._entries))]
        self._entries.pop(tenant_id, None)
        self._entries[tenant_id] = (now + self._ttl, secrets)

    def invalidate(self, tenant_id: str) -> None:
        """Drop what is cached for one tenant, so the next read goes to the store."""
        self._entries.pop(tenant_id, None)
        self._pending.pop(tenant_id, None)
        self._generation[tenant_id] = self._generation.get(tenant_id, 0) + 1

    async def put(self, tenant_id: str, name: str, value: str) -> None:
        """Write one tenant secret, then drop the tenant's cached entry."""
        if self.store is None:
            raise SecretStoreError(
                "none", "no secret store is configured (secrets.backend: none)"
            )
        path = tenant_secret_path(tenant_id, name)
        try:
            await self.store.put(path, value)
        finally:
            # Also after a failed write, which may have reached the store.
            self.invalidate(tenant_id)
