"""Choosing the upstream credential for a call ("auth precedence").

Every proxied call uses one credential, tried in this order, as the mode allows:

1. the caller's ScaiKey JWT, forwarded verbatim (``user_jwt``);
2. the tenant's ``sgk_`` key from the secret store (``tenant_key``);
3. the development key from an environment variable (``env_key``).

``auto`` tries all three, ``user_jwt`` only the first, ``api_key`` the last two.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog

from scaiproxy.auth import Principal
from scaiproxy.config import Settings
from scaiproxy.errors import (
    BAD_GATEWAY,
    MISSING_CREDENTIALS,
    SECRET_STORE_UNAVAILABLE,
    ConfigError,
    ProxyError,
)
from scaiproxy.secrets import SecretStoreError, TenantSecretCache

log = structlog.get_logger("scaiproxy.credentials")

USER_JWT = "user_jwt"
TENANT_KEY = "tenant_key"
ENV_KEY = "env_key"

ORDERS: dict[str, tuple[str, ...]] = {
    "auto": (USER_JWT, TENANT_KEY, ENV_KEY),
    "user_jwt": (USER_JWT,),
    "api_key": (TENANT_KEY, ENV_KEY),
}


def mask(secret: str) -> str:
    """Show a key as its first four and last four characters: ``sgk_…1234``."""
    if len(secret) < 12:
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
        self._upstream = settings.upstream
        self._secrets = secrets
        self._env_key = None
        env_var = settings.auth.env_api_key_var
        env_value = environ.get(env_var, "").strip()
        if env_value and ENV_KEY in self.order:
            if settings.production:
                raise ConfigError(
                    "auth.env_api_key_var",
                    f"the development key in ${env_var} is not allowed with "
                    f"environment: production; unset {env_var} or store tenant keys",
                )
            self._env_key = env_value
            log.warning(
                "development_key_enabled",
                env_var=env_var,
                masked_key=mask(env_value),
                message="requests without a user token or tenant key use this key",
            )
        self.env_var = env_var

    async def resolve(self, principal: Principal) -> Credential:
        tenant = principal.tenant_id
        secrets = await self._tenant_secrets(tenant)
        base_url = self._base_url(tenant, secrets.base_url)

        for source in self.order:
            if source == USER_JWT and principal.token:
                token = principal.token
                return Credential(USER_JWT, f"Bearer {token}", base_url, "jwt")
            if source == TENANT_KEY and secrets.api_key:
                key = secrets.api_key
                return Credential(TENANT_KEY, f"Bearer {key}", base_url, mask(key))
            if source == ENV_KEY and self._env_key:
                key = self._env_key
                return Credential(ENV_KEY, f"Bearer {key}", base_url, mask(key))

        raise ProxyError(
            412,
            MISSING_CREDENTIALS,
            f"No ScaiGrid credential is available for tenant {tenant!r} "
            f"(upstream credential mode {self.mode!r}).",
            fix=(
                "A tenant admin sets the tenant's ScaiGrid key with "
                "POST /api/v1/tenants/me/scaigrid_credentials, or sign in with "
                "ScaiKey so that your own token can be forwarded."
            ),
            tenant_id=tenant,
        )

    async def _tenant_secrets(self, tenant: str):
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
                fix="Try again shortly; operators should check the secrets settings.",
            ) from None
        except ValueError:
            raise ProxyError(
                502,
                MISSING_CREDENTIALS,
                f"The tenant id {tenant[:140]!r} cannot name a secret.",
            ) from None

    def _base_url(self, tenant: str, stored: str | None) -> str:
        if not stored:
            return self._upstream.base_url
        try:
            allowed = self._upstream.allows(stored)
        except ValueError:
            allowed = False
        if not allowed:
            log.warning("tenant_base_url_rejected", tenant_id=tenant)
            raise ProxyError(
                502,
                BAD_GATEWAY,
                f"The ScaiGrid base URL stored for tenant {tenant!r} is not on "
                "upstream.allowed_base_urls.",
                fix="An operator adds it to upstream.allowed_base_urls, or a tenant "
                "admin stores an allowed base URL.",
            )
        return stored.rstrip("/")
