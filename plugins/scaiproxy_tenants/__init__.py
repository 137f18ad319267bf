"""Tenant routes: read and set the tenant's ScaiGrid key and base URL.

The tenant is always the caller's ``tenant_id`` claim. No path parameter,
query parameter, header or body field can name another tenant.
"""

from __future__ import annotations

import re
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator
from yarl import URL

from scaiproxy import Call, ProxyError, RouteSpec, hookimpl
from scaiproxy.config import Settings, UpstreamConfig, normalize_base_url
from scaiproxy.credentials import mask
from scaiproxy.errors import SECRET_STORE_UNAVAILABLE, validation_error
from scaiproxy.routes import NO_CONTENT, NoContent
from scaiproxy.secrets import (
    API_KEY_NAME,
    BASE_URL_NAME,
    SecretStoreError,
    is_loopback_host,
)

audit_log = structlog.get_logger("scaiproxy.audit")
log = structlog.get_logger("scaiproxy.tenants")

ADMIN_ROLES = ("tenant_admin", "super_admin")
PATH = "/v1/tenants/me/scaigrid_credentials"
SECRET_STORE_NOT_CONFIGURED = "secret_store_not_configured"

API_KEY_PREFIX = "sgk_"
API_KEY_MIN_BODY = 32
API_KEY_MAX_LENGTH = 256
BASE_URL_MAX_LENGTH = 2048
_KEY_CHARACTERS = re.compile(r"[A-Za-z0-9_-]+")


def check_api_key(value: str) -> str:
    """Check a ScaiGrid key's form. The error messages never repeat the key."""
    if not value.startswith(API_KEY_PREFIX):
        raise ValueError(
            f"must start with '{API_KEY_PREFIX}', so copy the whole key from "
            "ScaiGrid"
        )
    if len(value) > API_KEY_MAX_LENGTH:
        raise ValueError(
            f"too long: a ScaiGrid API key has at most {API_KEY_MAX_LENGTH} "
            f"characters, this one has {len(value)}"
        )
    body = value[len(API_KEY_PREFIX) :]
    if body and not _KEY_CHARACTERS.fullmatch(body):
        raise ValueError(
            f"invalid characters: after '{API_KEY_PREFIX}' only A-Z a-z 0-9 _ - "
            "are allowed (check for spaces, quotes or line breaks)"
        )
    if len(body) < API_KEY_MIN_BODY:
        raise ValueError(
            f"too short: expected '{API_KEY_PREFIX}' followed by at least "
            f"{API_KEY_MIN_BODY} characters, got {len(body)}"
        )
    return value


def check_base_url(value: str, upstream: UpstreamConfig, production: bool) -> str:
    """Check a tenant's ScaiGrid base URL and return it normalized.

    The URL must be on ``upstream.allowed_base_urls`` or equal to
    ``upstream.base_url``. Plain http is accepted only for a loopback host and
    only outside production.
    """
    if len(value) > BASE_URL_MAX_LENGTH:
        raise ValueError(f"too long: at most {BASE_URL_MAX_LENGTH} characters")
    if any(ch.isspace() or not ch.isprintable() or ch == "\\" for ch in value):
        raise ValueError("contains spaces, backslashes or control characters")
    try:
        url = URL(value)
    except ValueError:
        raise ValueError("not a valid URL") from None
    # SECURITY: the userinfo may be a password, so this message omits the URL.
    # The raw text is checked too, because yarl drops an empty userinfo.
    if "@" in _raw_authority(value) or url.user is not None:
        raise ValueError(
            "must not contain a user name or password, because ScaiGrid is "
            "authenticated with the api_key"
        )
    if "?" in value or "#" in value:
        raise ValueError("must not contain a query string or fragment")
    if url.scheme not in ("https", "http") or not url.host or not url.is_absolute():
        raise ValueError(
            "expected an https URL such as https://scaigrid.example.com, "
            f"got {value!r}"
        )
    if url.scheme == "http":
        if not is_loopback_host(url.host):
            raise ValueError(
                "plain http is allowed only for loopback hosts (127.0.0.1, ::1, "
                f"localhost), and {url.host!r} is not one, so use https"
            )
        if production:
            raise ValueError(
                "plain http is not allowed with environment: production, so use "
                "https"
            )
    normalized = normalize_base_url(value)
    if normalized != value.rstrip("/"):
        # Dot segments, %2e, an upper-case scheme or a port with leading zeros
        # would otherwise be folded into an allowed URL before the comparison.
        raise ValueError(
            f"must be written in its plain form, {normalized!r}: without dot "
            "segments, percent-encoded dots, an upper-case scheme or leading "
            "zeros in the port"
        )
    if not upstream.allows(normalized):
        allowed = ", ".join([upstream.base_url, *upstream.allowed_base_urls])
        raise ValueError(
            f"{normalized!r} is not an allowed ScaiGrid base URL. Use one of: "
            f"{allowed}, or ask an operator to add it to upstream.allowed_base_urls"
        )
    return normalized


def _raw_authority(value: str) -> str:
    _, separator, rest = value.partition("://")
    return re.split(r"[/?#]", rest, maxsplit=1)[0] if separator else ""


class _CredentialsBodyBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    api_key: str = Field(
        description=(
            f"The tenant's ScaiGrid API key: '{API_KEY_PREFIX}' followed by at "
            f"least {API_KEY_MIN_BODY} characters from A-Z a-z 0-9 _ -"
        ),
        json_schema_extra={
            "pattern": rf"^{API_KEY_PREFIX}[A-Za-z0-9_-]{{{API_KEY_MIN_BODY},}}$",
            "maxLength": API_KEY_MAX_LENGTH,
        },
    )
    base_url: str | None = Field(
        None,
        description=(
            "The tenant's ScaiGrid base URL; it must be on the gateway's allow-list. "
            "Left unchanged when absent."
        ),
    )

    @field_validator("api_key")
    @classmethod
    def _check_api_key(cls, value: str) -> str:
        return check_api_key(value)


def credentials_body(settings: Settings) -> type[BaseModel]:
    """Build the POST body model, whose base URL check needs the settings."""
    upstream = settings.upstream
    production = settings.production

    class CredentialsBody(_CredentialsBodyBase):
        @field_validator("base_url")
        @classmethod
        def _check_base_url(cls, value: str | None) -> str | None:
            if value is None:
                return None
            return check_base_url(value, upstream, production)

    return CredentialsBody


_CREDENTIALS_SCHEMA = {
    "type": "object",
    "required": ["configured", "base_url", "masked_key"],
    "properties": {
        "configured": {"type": "boolean"},
        "base_url": {"type": ["string", "null"]},
        "masked_key": {"type": ["string", "null"], "examples": ["sgk_…1234"]},
    },
}


def store_unavailable(exc: SecretStoreError, tenant_id: str, action: str) -> ProxyError:
    """Log a store failure and build the 502 that names the backend."""
    log.warning(
        "secret_store_failed",
        backend=exc.backend,
        error=exc.message,
        tenant_id=tenant_id,
        action=action,
    )
    return ProxyError(
        502,
        SECRET_STORE_UNAVAILABLE,
        f"The secret store ({exc.backend}) could not be {action} for tenant "
        f"{tenant_id!r}.",
        fix="Send the request again shortly. If it keeps failing, operators "
        "should check the secrets settings and the gateway log.",
        backend=exc.backend,
    )


def _tenant_id_error(tenant_id: str) -> ProxyError:
    return validation_error(
        [
            {
                "field": "tenant_id",
                "location": "token",
                "message": f"the tenant id {tenant_id[:140]!r} cannot name a secret; "
                "expected 1 to 128 characters from A-Z a-z 0-9 _ . : -",
            }
        ]
    )


async def read_credentials(call: Call) -> dict[str, Any]:
    """Describe the tenant's stored key (masked) and base URL."""
    from scaiproxy.app import SECRETS

    tenant_id = call.principal.tenant_id
    try:
        secrets = await call.request.app[SECRETS].get(tenant_id)
    except SecretStoreError as exc:
        raise store_unavailable(exc, tenant_id, "read") from None
    except ValueError:
        raise _tenant_id_error(tenant_id) from None
    return {
        "configured": secrets.api_key is not None,
        "base_url": shown_base_url(secrets.base_url),
        "masked_key": mask(secrets.api_key) if secrets.api_key else None,
    }


def shown_base_url(stored: str | None) -> str | None:
    """Return a stored base URL fit to show any member of the tenant.

    The gateway stores only base URLs without credentials, query or fragment,
    but an operator may write the secret directly. Those parts, which may hold
    a password or a token, are left out; a value that is not a URL shows as
    ``None``.
    """
    if stored is None:
        return None
    try:
        url = URL(stored.strip())
    except (ValueError, TypeError):
        return None
    if not url.scheme or not url.host:
        return None
    # SECURITY: the URL's user, password, query and fragment are never shown.
    return str(url.with_user(None).with_query(None).with_fragment(None))


async def set_credentials(call: Call) -> NoContent:
    """Store the tenant's ScaiGrid key, and its base URL when given."""
    from scaiproxy.app import SECRETS

    cache = call.request.app[SECRETS]
    principal = call.principal
    tenant_id = principal.tenant_id
    if cache.store is None:
        raise ProxyError(
            503,
            SECRET_STORE_NOT_CONFIGURED,
            "No secret store is configured (secrets.backend: none), so tenant "
            "credentials cannot be stored.",
            fix="An operator sets secrets.backend to file or scaivault and restarts "
            "the gateway.",
        )

    body = call.body
    try:
        # The base URL goes first. When the key write then fails, the old key
        # stays paired with the new base URL until the request is sent again.
        if body.base_url is not None:
            await cache.put(tenant_id, BASE_URL_NAME, body.base_url)
        await cache.put(tenant_id, API_KEY_NAME, body.api_key)
    except SecretStoreError as exc:
        raise store_unavailable(exc, tenant_id, "written") from None
    except ValueError:
        raise _tenant_id_error(tenant_id) from None

    audit_log.info(
        "tenant_credentials_changed",
        tenant_id=tenant_id,
        sub=principal.sub,
        masked_key=mask(body.api_key),
        base_url=body.base_url,
        backend=cache.backend,
    )
    return NO_CONTENT


@hookimpl
def scaiproxy_routes(config: Any, settings: Settings) -> list[RouteSpec]:
    tags = ("tenants",)
    roles = " or ".join(ADMIN_ROLES)
    return [
        RouteSpec(
            method="GET",
            path=PATH,
            handler=read_credentials,
            name="tenants.credentials.read",
            permission=None,
            response=_CREDENTIALS_SCHEMA,
            summary="Whether the caller's tenant has a ScaiGrid key, masked",
            description="Any authenticated member of the tenant may read this. "
            "`base_url` is the tenant's own base URL, null when the gateway's "
            "default is used.",
            tags=tags,
        ),
        RouteSpec(
            method="POST",
            path=PATH,
            handler=set_credentials,
            name="tenants.credentials.set",
            roles=ADMIN_ROLES,
            body=credentials_body(settings),
            status=204,
            summary="Set the caller's tenant's ScaiGrid key and base URL",
            description=f"Needs the role {roles}. Writes the secret store, and "
            "the tenant's next request on this gateway process uses the new key.",
            tags=tags,
        ),
    ]
