"""Choosing the upstream credential for a call ("auth precedence").

Every proxied call uses one credential, tried in this order, as the mode allows:

1. the caller's ScaiKey JWT, forwarded verbatim (``user_jwt``);
2. the tenant's ``sgk_`` key from the secret store (``tenant_key``);
3. the development key from an environment variable (``env_key``).

``auto`` tries all three, ``user_jwt`` only the first, ``api_key`` the last two.
The mode comes from ``auth.upstream_credentials``, which the environment variable
``SCAIFLOW_DEPLOY_AUTH`` overrides (see :func:`scaiproxy.config.settings_from_mapping`).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog

from scaiproxy.auth import Principal
from scaiproxy.config import DEPLOY_AUTH_ENV_VAR, Settings, normalize_base_url
from scaiproxy.errors import (
    BAD_GATEWAY,
    MISSING_CREDENTIALS,
    SECRET_STORE_UNAVAILABLE,
    ConfigError,
    ProxyError,
)
from scaiproxy.secrets import SecretStoreError, TenantSecretCache, TenantSecrets

log = structlog.get_logger("scaiproxy.credentials")

USER_JWT = "user_jwt"
TENANT_KEY = "tenant_key"
ENV_KEY = "env_key"

ORDERS: dict[str, tuple[str, ...]] = {
    "auto": (USER_JWT, TENANT_KEY, ENV_KEY),
    "user_jwt": (USER_JWT,),
    "api_key": (TENANT_KEY, ENV_KEY),
}

#: Credentials kept for reuse, one per token or key and base URL.
MAX_CREDENTIALS = 1024

# SECURITY: a key is sent as a header value, so CR, LF and spaces must not pass.
_KEY_CHARACTERS = re.compile(r"[\x21-\x7e]{1,4096}")


def credentials_route(base_path: str) -> str:
    """Return the route through which a tenant admin stores the tenant's key."""
    return f"POST {base_path}/v1/tenants/me/scaigrid_credentials"


#: Keys shorter than this are masked whole: four plus four characters of a
#: short key would show too much of it. A valid sgk_ key has at least 36.
MIN_PARTLY_SHOWN = 24


def mask(secret: str) -> str:
    """Show a key as its first four and last four characters: ``sgk_…1234``.

    A key shorter than :data:`MIN_PARTLY_SHOWN` characters shows as ``…``.
    """
    if len(secret) < MIN_PARTLY_SHOWN:
        return "…"
    return f"{secret[:4]}…{secret[-4:]}"


@dataclass(frozen=True)
class Credential:
    """The credential and base URL chosen for one upstream call."""

    source: str
    authorization: str = field(repr=False)
    base_url: str
    masked: str

    @property
    def is_user_token(self) -> bool:
        return self.source == USER_JWT

    @property
    def secret(self) -> str:
        """The token or key itself, without the ``Bearer`` scheme."""
        return self.authorization.partition(" ")[2]

    @functools.cached_property
    def digest(self) -> bytes:
        """The SHA-256 of the Authorization value, to key shared work by credential."""
        return hashlib.sha256(self.authorization.encode()).digest()


class CredentialResolver:
    """Pick the credential for a principal, following the configured order."""

    def __init__(
        self,
        settings: Settings,
        secrets: TenantSecretCache,
        environ: Mapping[str, str],
    ) -> None:
        self.mode = settings.auth.upstream_credentials
        self.order = ORDERS[self.mode]
        self.env_var = settings.auth.env_api_key_var
        self._upstream = settings.upstream
        self._secrets = secrets
        self._credentials_route = credentials_route(settings.server.base_path)
        if settings.auth.mode == "disabled" and self.mode == "user_jwt":
            raise ConfigError(
                "auth.upstream_credentials",
                "'user_jwt' forwards the caller's verified token, but auth.mode: "
                "disabled verifies none, so every call would fail; use auto or "
                f"api_key (the value may come from {DEPLOY_AUTH_ENV_VAR})",
            )
        self._env_key = self._development_key(settings, environ)
        self._credentials: OrderedDict[tuple[str, str, str], Credential] = OrderedDict()

    def _development_key(
        self, settings: Settings, environ: Mapping[str, str]
    ) -> str | None:
        value = environ.get(self.env_var, "").strip()
        if not value or ENV_KEY not in self.order:
            return None
        if settings.production:
            raise ConfigError(
                "auth.env_api_key_var",
                f"the development key in ${self.env_var} is not allowed with "
                f"environment: production; unset {self.env_var} and store tenant "
                "keys in the secret store",
            )
        if not _KEY_CHARACTERS.fullmatch(value):
            raise ConfigError(
                "auth.env_api_key_var",
                f"the key in ${self.env_var} contains spaces, control or non-ASCII "
                "characters; set the bare sgk_ key",
            )
        log.warning(
            "development_key_enabled",
            env_var=self.env_var,
            masked_key=mask(value),
            message="calls without a user token or tenant key use this key; "
            "never use it outside development",
        )
        return value

    async def resolve(self, principal: Principal) -> Credential:
        """Choose the credential and base URL, or raise a 412 or 502."""
        secrets = self._secrets.cached(principal.tenant_id)
        if secrets is None:
            secrets = await self._tenant_secrets(principal.tenant_id)
        return self._choose(principal, secrets)

    def resolve_cached(self, principal: Principal) -> Credential | None:
        """Choose the credential as :meth:`resolve` does when the tenant's
        secrets are cached, without awaiting; ``None`` when they are not."""
        secrets = self._secrets.cached(principal.tenant_id)
        return None if secrets is None else self._choose(principal, secrets)

    def _choose(self, principal: Principal, secrets: TenantSecrets) -> Credential:
        tenant = principal.tenant_id
        base_url = self._base_url(tenant, secrets.base_url)

        for source in self.order:
            if source == USER_JWT and principal.token:
                return self._credential(USER_JWT, principal.token, base_url)
            if source == TENANT_KEY and secrets.api_key:
                key = self._checked_tenant_key(tenant, secrets.api_key)
                return self._credential(TENANT_KEY, key, base_url)
            if source == ENV_KEY and self._env_key:
                return self._credential(ENV_KEY, self._env_key, base_url)

        raise ProxyError(
            412,
            MISSING_CREDENTIALS,
            f"No ScaiGrid credential is available for tenant {tenant!r} "
            f"(upstream credential mode {self.mode!r}).",
            fix=self._missing_fix(),
            tenant_id=tenant,
        )

    def _credential(self, source: str, secret: str, base_url: str) -> Credential:
        """Return the credential for ``secret``, reusing the one made last time.

        Reuse keeps each credential's digest computed once rather than on
        every request. The last ``MAX_CREDENTIALS`` are kept.
        """
        key = (source, secret, base_url)
        credential = self._credentials.get(key)
        if credential is not None:
            self._credentials.move_to_end(key)
            return credential
        masked = "jwt" if source == USER_JWT else mask(secret)
        credential = Credential(source, f"Bearer {secret}", base_url, masked)
        self._credentials[key] = credential
        while len(self._credentials) > MAX_CREDENTIALS:
            self._credentials.popitem(last=False)
        return credential

    def _missing_fix(self) -> str:
        store_key = (
            f"A tenant admin sets the tenant's ScaiGrid key with "
            f"{self._credentials_route}"
        )
        if self.mode == "api_key":
            return f"{store_key}."
        if self.mode == "user_jwt":
            return "Sign in with ScaiKey so that your own token can be forwarded."
        return f"{store_key}, or sign in with ScaiKey so that your token is forwarded."

    async def _tenant_secrets(self, tenant: str) -> TenantSecrets:
        try:
            return await self._secrets.get(tenant)
        except SecretStoreError as exc:
            log.warning(
                "secret_store_failed",
                backend=exc.backend,
                error=exc.message,
                tenant_id=tenant,
            )
            raise ProxyError(
                502,
                SECRET_STORE_UNAVAILABLE,
                f"The secret store ({exc.backend}) could not be read for tenant "
                f"{tenant!r}.",
                fix="Try again shortly; operators should check the secrets "
                f"settings (secrets.{exc.backend}).",
                backend=exc.backend,
            ) from None
        except ValueError:
            # Principals carry checked tenant ids, so this is a gateway bug.
            log.error("tenant_id_rejected_by_store", tenant_id=tenant[:140])
            raise ProxyError(
                502,
                BAD_GATEWAY,
                f"The tenant id {tenant[:140]!r} cannot name a secret.",
            ) from None

    def _checked_tenant_key(self, tenant: str, key: str) -> str:
        if _KEY_CHARACTERS.fullmatch(key):
            return key
        log.warning("tenant_key_malformed", tenant_id=tenant)
        raise ProxyError(
            412,
            MISSING_CREDENTIALS,
            f"The ScaiGrid key stored for tenant {tenant!r} contains spaces, "
            "control or non-ASCII characters.",
            fix=f"A tenant admin stores the key again with {self._credentials_route}.",
            tenant_id=tenant,
        )

    def _base_url(self, tenant: str, stored: str | None) -> str:
        if not stored:
            return self._upstream.base_url
        try:
            url = normalize_base_url(stored.strip())
        except ValueError:
            url = None
        if url is None or not self._upstream.allows(url):
            log.warning("tenant_base_url_rejected", tenant_id=tenant)
            raise ProxyError(
                502,
                BAD_GATEWAY,
                f"The ScaiGrid base URL stored for tenant {tenant!r} is not on "
                "upstream.allowed_base_urls.",
                fix="An operator adds it to upstream.allowed_base_urls, or a tenant "
                "admin stores an allowed base URL.",
            )
        return url
