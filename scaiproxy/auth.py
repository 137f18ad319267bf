"""Caller authentication: ScaiKey JWT verification, principals and permissions."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import structlog

from scaiproxy import jsonutil
from scaiproxy.config import AuthConfig
from scaiproxy.errors import (
    AUTH_UNAVAILABLE,
    INSUFFICIENT_SCOPE,
    INVALID_TOKEN,
    MISSING_TOKEN,
    ProxyError,
)

log = structlog.get_logger("scaiproxy.auth")

_BEARER_CHALLENGE = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
_TENANT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_ASYMMETRIC = {"RS256", "RS384", "RS512", "ES256", "ES384", "PS256"}


@dataclass(frozen=True)
class Principal:
    """The authenticated caller, as the gateway sees it."""

    sub: str
    tenant_id: str
    partner_id: str | None
    roles: frozenset[str]
    permissions: frozenset[str]
    token: str | None = field(default=None, repr=False)
    expires_at: float | None = None

    def has_permission(self, required: str) -> bool:
        """Check one permission; only whole tokens or ``prefix:*`` wildcards match."""
        if required in self.permissions or "*" in self.permissions:
            return True
        prefix, _, _ = required.rpartition(":")
        while prefix:
            if f"{prefix}:*" in self.permissions:
                return True
            prefix, _, _ = prefix.rpartition(":")
        return False

    def public(self) -> dict[str, Any]:
        """Describe the principal without its token, for ``GET /v1/me``."""
        return {
            "sub": self.sub,
            "tenant_id": self.tenant_id,
            "partner_id": self.partner_id,
            "roles": sorted(self.roles),
            "permissions": sorted(self.permissions),
        }


def invalid_token(message: str) -> ProxyError:
    return ProxyError(
        401,
        INVALID_TOKEN,
        message,
        fix="Sign in with ScaiKey again and send the new access token.",
        headers=_BEARER_CHALLENGE,
    )


def missing_token(message: str) -> ProxyError:
    return ProxyError(
        401,
        MISSING_TOKEN,
        message,
        fix="Send 'Authorization: Bearer <ScaiKey access token>'.",
        headers={"WWW-Authenticate": "Bearer"},
    )


def insufficient_scope(required: str | list[str], kind: str = "permission") -> ProxyError:
    wanted = required if isinstance(required, str) else " or ".join(required)
    return ProxyError(
        403,
        INSUFFICIENT_SCOPE,
        f"This route needs the {kind} {wanted}, which the caller does not have.",
        fix="Ask a tenant admin to grant it; GET /api/v1/me lists what you have.",
        required=required,
        headers={"WWW-Authenticate": 'Bearer error="insufficient_scope"'},
    )


def bearer_token(headers: Any) -> str:
    """Extract the bearer token, rejecting repeated or malformed headers."""
    values = headers.getall("Authorization", [])
    if not values:
        raise missing_token("The request has no Authorization header.")
    if len(values) > 1:
        raise invalid_token("The request has more than one Authorization header.")
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise missing_token(
            "The Authorization header is not of the form 'Bearer <token>'."
        )
    if " " in token or len(token) > 16_384:
        raise invalid_token("The bearer token is malformed.")
    return token


def permissions_from_claims(
    claims: Mapping[str, Any], role_permissions: Mapping[str, Iterable[str]]
) -> tuple[frozenset[str], frozenset[str]]:
    """Collect roles and effective permissions from a token's claims."""
    roles: set[str] = set()
    role = claims.get("role")
    if isinstance(role, str) and role:
        roles.add(role)
    roles.update(_strings(claims.get("roles")))

    permissions: set[str] = set(_strings(claims.get("permissions")))
    scope = claims.get("scope")
    if isinstance(scope, str):
        permissions.update(scope.split())
    scp = claims.get("scp")
    if isinstance(scp, str):
        permissions.update(scp.split())
    else:
        permissions.update(_strings(scp))
    for name in roles:
        permissions.update(role_permissions.get(name, ()))
    return frozenset(roles), frozenset(permissions)


def _strings(value: Any) -> list[str]:
    if isinstance(value, list | tuple):
        return [item for item in value if isinstance(item, str) and item]
    return []


def dev_principal(config: AuthConfig) -> Principal:
    """Build the fixed principal served with ``auth.mode: disabled``."""
    dev = config.dev_principal
    claims = {"roles": list(dev.roles), "permissions": list(dev.permissions)}
    roles, permissions = permissions_from_claims(claims, config.role_permissions)
    return Principal(
        sub=dev.sub,
        tenant_id=dev.tenant_id,
        partner_id=dev.partner_id,
        roles=roles,
        permissions=permissions,
    )


class JWKSCache:
    """Signing keys from a JWKS URL, cached and refreshed with care.

    Keys are refetched when the cache is older than ``jwks_cache_ttl_s`` and when
    a token names an unknown ``kid``, but never more often than once per
    ``jwks_refresh_interval_s``, so a flood of forged tokens cannot hammer
    ScaiKey. A failed refresh keeps the keys already held.
    """

    def __init__(self, config: AuthConfig, session: aiohttp.ClientSession) -> None:
        self._url = config.jwks_url
        self._ttl = config.jwks_cache_ttl_s
        self._min_interval = config.jwks_refresh_interval_s
        self._timeout = aiohttp.ClientTimeout(total=config.jwks_timeout_s)
        self._session = session
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._lock = asyncio.Lock()

    async def get(self, kid: str | None) -> jwt.PyJWK:
        now = time.monotonic()
        stale = self._fetched_at is None or now - self._fetched_at > self._ttl
        if stale or (kid not in self._keys and self._may_refresh(now)):
            await self._refresh()
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        key = self._keys.get(kid) if kid is not None else None
        if key is not None:
            return key
        if not self._keys:
            raise ProxyError(
                503,
                AUTH_UNAVAILABLE,
                "The token signing keys could not be fetched from ScaiKey.",
                fix="Try again shortly; operators should check auth.jwks_url.",
                headers={"Retry-After": "5"},
            )
        raise invalid_token("The token's signing key (kid) is not known to ScaiKey.")

    def _may_refresh(self, now: float) -> bool:
        return self._attempted_at is None or now - self._attempted_at >= self._min_interval

    async def _refresh(self) -> None:
        async with self._lock:
            now = time.monotonic()
            if self._attempted_at is not None and now - self._attempted_at < min(
                self._min_interval, self._ttl
            ):
                return
            self._attempted_at = now
            try:
                keys = await self._fetch()
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                log.warning(
                    "jwks_fetch_failed",
                    jwks_url=self._url,
                    error=f"{type(exc).__name__}: {exc}",
                    cached_keys=len(self._keys),
                )
                return
            self._keys = keys
            self._fetched_at = time.monotonic()
            log.info("jwks_fetched", jwks_url=self._url, keys=len(keys))

    async def _fetch(self) -> dict[str, jwt.PyJWK]:
        async with self._session.get(
            self._url, timeout=self._timeout, headers={"Accept": "application/json"}
        ) as response:
            if response.status != 200:
                raise ValueError(f"JWKS answered HTTP {response.status}")
            body = await response.content.read(1024 * 1024 + 1)
        if len(body) > 1024 * 1024:
            raise ValueError("JWKS document is larger than 1 MiB")
        document = jsonutil.loads(body)
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise ValueError("JWKS document has no 'keys' list")
        keys: dict[str, jwt.PyJWK] = {}
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry)
            except (jwt.PyJWKError, jwt.InvalidKeyError):
                continue
            keys[str(entry.get("kid", ""))] = key
        return keys


class TokenVerifier:
    """Verify ScaiKey access tokens and build principals.

    Verified tokens are cached by a SHA-256 of the token until the token's own
    ``exp``, never longer; a cache hit still checks ``exp`` against the clock.
    """

    def __init__(self, config: AuthConfig, jwks: JWKSCache | None) -> None:
        self._config = config
        self._jwks = jwks
        self._algorithms = list(config.algorithms)
        self._cache: OrderedDict[bytes, Principal] = OrderedDict()
        self._cache_size = config.token_cache_size

    async def verify(self, token: str) -> Principal:
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            if cached.expires_at is not None and cached.expires_at > time.time():
                self._cache.move_to_end(digest)
                return cached
            del self._cache[digest]

        claims = await self._decode(token)
        principal = self._principal(claims, token)
        if self._cache_size:
            self._cache[digest] = principal
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return principal

    async def _decode(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise invalid_token("The bearer token is not a well-formed JWT.") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise invalid_token("Unsigned tokens (alg 'none') are not accepted.")

        if alg == "HS256" and self._config.hs256_secret:
            key: Any = self._config.hs256_secret
            algorithms = ["HS256"]
        elif alg in self._algorithms and alg in _ASYMMETRIC and self._jwks:
            kid = header.get("kid")
            jwk = await self._jwks.get(kid if isinstance(kid, str) else None)
            family = "EC" if alg.startswith("ES") else "RSA"
            if jwk.key_type != family:
                raise invalid_token(
                    f"The token's algorithm {alg} does not match its signing key."
                )
            key = jwk.key
            algorithms = [alg]
        else:
            allowed = ", ".join(self._algorithms)
            raise invalid_token(
                f"The token algorithm {alg!r} is not accepted; allowed: {allowed}."
            )

        try:
            return jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=self._config.audience,
                issuer=list(self._config.issuers),
                leeway=self._config.leeway_s,
                options={"require": ["exp", "iss", "aud"], "verify_iat": True},
            )
        except jwt.ExpiredSignatureError:
            raise invalid_token("The token has expired.") from None
        except jwt.ImmatureSignatureError:
            raise invalid_token("The token is not valid yet (nbf or iat in the future).") from None
        except jwt.InvalidIssuerError:
            raise invalid_token("The token's issuer (iss) is not accepted.") from None
        except jwt.InvalidAudienceError:
            raise invalid_token("The token's audience (aud) is not this gateway.") from None
        except jwt.MissingRequiredClaimError as exc:
            raise invalid_token(f"The token has no '{exc.claim}' claim.") from None
        except jwt.InvalidSignatureError:
            raise invalid_token("The token's signature is invalid.") from None
        except jwt.InvalidTokenError as exc:
            raise invalid_token(f"The token is invalid: {_safe(exc)}.") from None

    def _principal(self, claims: Mapping[str, Any], token: str) -> Principal:
        tenant_id = claims.get("tenant_id")
        if not isinstance(tenant_id, str) or not tenant_id:
            raise invalid_token("The token has no 'tenant_id' claim.")
        if tenant_id in (".", "..") or not _TENANT_ID.fullmatch(tenant_id):
            # SECURITY: the tenant id becomes part of secret store paths.
            raise invalid_token("The token's 'tenant_id' claim is not a valid id.")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise invalid_token("The token has no 'sub' claim.")
        partner = claims.get("partner_id")
        roles, permissions = permissions_from_claims(
            claims, self._config.role_permissions
        )
        exp = claims.get("exp")
        return Principal(
            sub=sub,
            tenant_id=tenant_id,
            partner_id=partner if isinstance(partner, str) else None,
            roles=roles,
            permissions=permissions,
            token=token,
            expires_at=float(exp) if isinstance(exp, int | float) else None,
        )


def _safe(exc: Exception) -> str:
    # PyJWT messages name the failed check, never the token itself.
    return str(exc).rstrip(".")[:200]
