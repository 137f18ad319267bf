"""Caller authentication: ScaiKey JWT verification, principals and permissions.

A bearer token passes these checks in order. First come the ``Authorization``
header's form and the JWT header (``alg`` accepted, never ``none``). Then PyJWT
verifies the signature with the key that ``kid`` names in the cached JWKS, the
required claims, ``iss`` and ``aud``. Last come ``exp``, ``nbf`` and ``iat`` with
``auth.leeway_s``, and ``tenant_id``. The time claims are checked against this
module's ``time.time()`` rather than PyJWT's clock, so the token cache and the
verification share one clock.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
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
    ConfigError,
    ProxyError,
)

log = structlog.get_logger("scaiproxy.auth")

#: Pattern of a valid tenant id; ``.`` and ``..`` are rejected separately.
TENANT_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
#: Pattern of an RFC 6750 ``b64token``, the form of a bearer token.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
MAX_TOKEN_LENGTH = 16_384
MAX_JWKS_BYTES = 1024 * 1024
#: Seconds between JWKS fetch attempts while no signing key is held, unless
#: ``auth.jwks_refresh_interval_s`` is shorter.
OUTAGE_FETCH_INTERVAL_S = 5.0

_BEARER_CHALLENGE = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
#: Asymmetric algorithms verified with JWKS keys, and the key type each needs.
_KEY_TYPES = {
    "RS256": "RSA",
    "RS384": "RSA",
    "RS512": "RSA",
    "ES256": "EC",
    "ES384": "EC",
}
_REQUIRED_CLAIMS = ["exp", "iss", "aud", "sub"]


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: user, tenant, roles and effective permissions."""

    sub: str
    tenant_id: str
    partner_id: str | None
    roles: frozenset[str]
    permissions: frozenset[str]
    token: str | None = field(default=None, repr=False)
    expires_at: float | None = None

    def has_permission(self, required: str) -> bool:
        """Check one permission: whole names match, and ``prefix:*`` or ``*``."""
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


def auth_unavailable(message: str, retry_after_s: int = 5) -> ProxyError:
    return ProxyError(
        503,
        AUTH_UNAVAILABLE,
        message,
        fix="Try again shortly; operators should check auth.jwks_url.",
        headers={"Retry-After": str(retry_after_s)},
    )


def insufficient_scope(
    required: str | list[str], kind: str = "permission", base_path: str = "/api"
) -> ProxyError:
    names = required if isinstance(required, str) else " or ".join(required)
    return ProxyError(
        403,
        INSUFFICIENT_SCOPE,
        f"This route needs the {kind} {names}, which the caller does not have.",
        fix=(
            f"Ask a tenant admin to grant it; GET {base_path}/v1/me lists what "
            "you have."
        ),
        required=required,
        headers={"WWW-Authenticate": 'Bearer error="insufficient_scope"'},
    )


def bearer_token(headers: Any) -> str:
    """Extract the bearer token, rejecting repeated or malformed headers.

    The messages never quote the header, because it may hold a credential.
    """
    values = [value.strip() for value in headers.getall("Authorization", [])]
    if not any(values):
        raise missing_token("The request has no Authorization header.")
    if len(values) > 1:
        raise invalid_token("The request has more than one Authorization header.")

    scheme, _, token = values[0].partition(" ")
    if scheme.lower() != "bearer":
        raise invalid_token(
            "The Authorization header does not use the Bearer scheme; send "
            "'Authorization: Bearer <token>'."
        )
    token = token.strip()
    if not token:
        raise invalid_token("The Authorization header has no token after 'Bearer'.")
    if len(token) > MAX_TOKEN_LENGTH or not _B64TOKEN.fullmatch(token):
        raise invalid_token(
            "The bearer token is malformed: it must be one JWT without spaces."
        )
    return token


def permissions_from_claims(
    claims: Mapping[str, Any], role_permissions: Mapping[str, Iterable[str]]
) -> tuple[frozenset[str], frozenset[str]]:
    """Collect roles and effective permissions from a token's claims.

    Roles come from ``role`` and ``roles``. Permissions are the union of
    ``permissions``, ``scope`` and ``scp`` (each a list or a space-separated
    string) and what ``role_permissions`` grants the roles.
    """
    roles = set(_names(claims.get("role")))
    roles.update(_names(claims.get("roles")))

    permissions: set[str] = set()
    for claim in ("permissions", "scope", "scp"):
        permissions.update(_names(claims.get(claim)))
    for role in roles:
        permissions.update(role_permissions.get(role, ()))
    return frozenset(roles), frozenset(permissions)


def _names(value: Any) -> list[str]:
    """Split a claim holding a space-separated string or a list of strings."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list | tuple):
        return [item for item in value if isinstance(item, str) and item]
    return []


def _is_unicode(text: str) -> bool:
    """Tell whether ``text`` encodes as UTF-8, that is, has no lone surrogate."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def valid_tenant_id(value: str) -> bool:
    # SECURITY: the tenant id becomes part of secret store paths.
    return value not in (".", "..") and TENANT_ID_PATTERN.fullmatch(value) is not None


def dev_principal(config: AuthConfig) -> Principal:
    """Build the fixed principal served with ``auth.mode: disabled``."""
    dev = config.dev_principal
    if not valid_tenant_id(dev.tenant_id):
        raise ConfigError(
            "auth.dev_principal.tenant_id",
            f"invalid tenant id {dev.tenant_id[:140]!r}: expected 1 to 128 "
            "characters from A-Z a-z 0-9 _ . : - (not '.' or '..')",
        )
    claims = {"roles": list(dev.roles), "permissions": list(dev.permissions)}
    roles, permissions = permissions_from_claims(claims, config.role_permissions)
    return Principal(
        sub=dev.sub,
        tenant_id=dev.tenant_id,
        partner_id=dev.partner_id,
        roles=roles,
        permissions=permissions,
    )


@dataclass(frozen=True)
class PublishedKey:
    """One signing key from the JWKS."""

    kid: str
    jwk: jwt.PyJWK
    #: The JWK's own ``alg`` member, when it declares one.
    algorithm: str | None


class JWKSCache:
    """Signing keys from a JWKS URL, cached and refreshed with care.

    Keys are refetched when the cache is older than ``jwks_cache_ttl_s`` and when
    a token names an unknown ``kid``. While keys are held, a fetch is attempted
    at most once per ``jwks_refresh_interval_s``, so a flood of forged tokens
    cannot hammer ScaiKey. While none is held, every token gets a 503, so
    a fetch may be attempted every ``OUTAGE_FETCH_INTERVAL_S`` (or the refresh
    interval, when shorter), and service returns within that time of ScaiKey's
    recovery. A failed fetch keeps the keys already held.
    """

    def __init__(self, config: AuthConfig, session: aiohttp.ClientSession) -> None:
        self._url = config.jwks_url
        self._ttl = config.jwks_cache_ttl_s
        self._min_interval = config.jwks_refresh_interval_s
        self._outage_interval = min(OUTAGE_FETCH_INTERVAL_S, self._min_interval)
        self._timeout = aiohttp.ClientTimeout(total=config.jwks_timeout_s)
        self._session = session
        self._keys: dict[str, PublishedKey] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._fetching: asyncio.Future[None] | None = None

    def publishes(self, kid: str) -> bool:
        """Tell whether the key ``kid`` is still published."""
        return kid in self._keys

    async def get(self, kid: str | None) -> PublishedKey:
        """Return the key a token's ``kid`` names, fetching the JWKS if needed.

        A known key is returned at once; a stale cache is then refreshed in the
        background. An unknown ``kid`` waits for the fetch, if one may run.
        """
        if self._fetching is not None and self._lookup(kid) is None:
            await asyncio.shield(self._fetching)

        now = time.monotonic()
        known = self._lookup(kid) is not None
        stale = self._fetched_at is None or now - self._fetched_at > self._ttl
        if (stale or not known) and self._may_fetch(now):
            fetching = self._start_fetch()
            if not known:
                await asyncio.shield(fetching)

        key = self._lookup(kid)
        if key is not None:
            return key
        if not self._keys:
            retry_after = self._retry_after(time.monotonic())
            if self._fetched_at is None:
                raise auth_unavailable(
                    "The token signing keys could not be fetched from ScaiKey.",
                    retry_after,
                )
            raise auth_unavailable(
                "ScaiKey's JWKS contains no usable signing key.", retry_after
            )
        if kid is None:
            raise invalid_token(
                "The token header has no 'kid', and ScaiKey publishes more than "
                "one signing key."
            )
        raise invalid_token(
            "The token's signing key (kid) is not published by ScaiKey."
        )

    def _lookup(self, kid: str | None) -> PublishedKey | None:
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    def _interval(self) -> float:
        return self._min_interval if self._keys else self._outage_interval

    def _may_fetch(self, now: float) -> bool:
        return (
            self._attempted_at is None or now - self._attempted_at >= self._interval()
        )

    def _retry_after(self, now: float) -> int:
        """Whole seconds until the next fetch may be attempted, at least 1."""
        if self._attempted_at is None:
            return 1
        remaining = self._attempted_at + self._interval() - now
        return max(1, math.ceil(remaining))

    def _start_fetch(self) -> asyncio.Future[None]:
        # get() checks the interval and calls this without an await in between,
        # so concurrent requests share one fetch.
        if self._fetching is None:
            self._attempted_at = time.monotonic()
            self._fetching = asyncio.ensure_future(self._fetch_and_store())
            self._fetching.add_done_callback(self._fetch_done)
        return self._fetching

    def _fetch_done(self, fetching: asyncio.Future[None]) -> None:
        self._fetching = None
        # Mark an exception as retrieved even when every waiter was cancelled.
        if not fetching.cancelled():
            fetching.exception()

    async def _fetch_and_store(self) -> None:
        try:
            keys = await self._fetch()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            log.warning(
                "jwks_fetch_failed",
                jwks_url=self._url,
                error=f"{type(exc).__name__}: {str(exc)[:200]}",
                cached_keys=len(self._keys),
            )
            return
        self._keys = keys
        self._fetched_at = time.monotonic()
        log.info("jwks_fetched", jwks_url=self._url, keys=len(keys))

    async def _fetch(self) -> dict[str, PublishedKey]:
        async with self._session.get(
            self._url, timeout=self._timeout, headers={"Accept": "application/json"}
        ) as response:
            if response.status != 200:
                raise ValueError(f"the JWKS URL returned HTTP {response.status}")
            # content.read(n) returns what is buffered, not the whole body.
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.content.iter_any():
                size += len(chunk)
                if size > MAX_JWKS_BYTES:
                    raise ValueError(
                        f"the JWKS document is larger than {MAX_JWKS_BYTES} bytes"
                    )
                chunks.append(chunk)
        document = jsonutil.loads(b"".join(chunks))
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise ValueError("the JWKS document has no 'keys' list")
        return _published_keys(entries)


def _published_keys(entries: list[Any]) -> dict[str, PublishedKey]:
    """Keep the RSA and EC signature keys of a JWKS; skip what cannot be used."""
    keys: dict[str, PublishedKey] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        # SECURITY: symmetric (oct) keys in a JWKS would let anyone who reads
        # the public document sign tokens.
        if entry.get("kty") not in ("RSA", "EC"):
            continue
        declared = entry.get("alg")
        if declared is not None and declared not in _KEY_TYPES:
            continue
        try:
            jwk = jwt.PyJWK(entry)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
        kid = entry.get("kid")
        kid = kid if isinstance(kid, str) else ""
        keys[kid] = PublishedKey(kid, jwk, declared)
    return keys


def _token_digest(token: str) -> bytes:
    # The cache key: the token itself is never kept as one.
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class _CacheEntry:
    principal: Principal
    #: The JWKS key that verified the token; ``None`` for the HS256 secret.
    kid: str | None


class TokenVerifier:
    """Verify ScaiKey access tokens and build principals.

    Verified tokens are cached by a SHA-256 of the token until the token's own
    ``exp``, never longer. A cache hit checks ``exp`` against the clock again and
    whether ScaiKey still publishes the signing key.
    """

    def __init__(self, config: AuthConfig, jwks: JWKSCache | None) -> None:
        self._config = config
        self._jwks = jwks
        self._jwks_algorithms = list(config.algorithms) if jwks is not None else []
        self._accepted = list(self._jwks_algorithms)
        if config.hs256_secret:
            self._accepted.append("HS256")
        self._cache: OrderedDict[bytes, _CacheEntry] = OrderedDict()
        self._cache_size = config.token_cache_size

    async def verify_header(self, headers: Any) -> Principal:
        """Verify the request's ``Authorization: Bearer`` header.

        A header of exactly ``Bearer <token>`` whose token is in the cache skips
        the parsing of :func:`bearer_token`: the token passed it when it was
        cached, and a cache key is the hash of a token that did. Such a token is
        ASCII. A header that is not goes to :func:`bearer_token`, because aiohttp
        keeps bytes that are not UTF-8 as lone surrogates and ``encode()`` raises
        on those.
        """
        values = headers.getall("Authorization", ())
        if len(values) == 1 and values[0].startswith("Bearer ") and values[0].isascii():
            principal = self._cached(_token_digest(values[0][7:]))
            if principal is not None:
                return principal
        return await self.verify(bearer_token(headers))

    def _cached(self, digest: bytes) -> Principal | None:
        """Return the cached principal of a token digest, dropping a stale entry."""
        entry = self._cache.get(digest)
        if entry is None:
            return None
        if not self._still_valid(entry):
            del self._cache[digest]
            return None
        self._cache.move_to_end(digest)
        return entry.principal

    async def verify(self, token: str) -> Principal:
        """Verify ``token`` and return its principal, or raise a 401 or 503."""
        digest = _token_digest(token)
        principal = self._cached(digest)
        if principal is not None:
            return principal

        claims, kid = await self._decode(token)
        principal = self._principal(claims, token)
        self._remember(digest, _CacheEntry(principal, kid))
        return principal

    def _still_valid(self, entry: _CacheEntry) -> bool:
        expires_at = entry.principal.expires_at
        if expires_at is None or expires_at <= time.time():
            return False
        if entry.kid is not None and self._jwks is not None:
            return self._jwks.publishes(entry.kid)
        return True

    def _remember(self, digest: bytes, entry: _CacheEntry) -> None:
        expires_at = entry.principal.expires_at
        # A token accepted within the leeway after its exp is not cached.
        if not self._cache_size or expires_at is None or expires_at <= time.time():
            return
        self._cache[digest] = entry
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def _decode(self, token: str) -> tuple[dict[str, Any], str | None]:
        header = _unverified_header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise invalid_token("The token header has no 'alg'.")
        if alg.lower() == "none":
            raise invalid_token("Unsigned tokens (alg 'none') are not accepted.")

        kid: str | None = None
        if alg == "HS256" and self._config.hs256_secret:
            key: Any = self._config.hs256_secret
        elif alg in self._jwks_algorithms and self._jwks is not None:
            published = await self._jwks.get(header.get("kid"))
            _check_key_matches(published, alg)
            key, kid = published.jwk.key, published.kid
        else:
            accepted = ", ".join(self._accepted)
            raise invalid_token(
                f"The token algorithm {alg[:20]!r} is not accepted; accepted: "
                f"{accepted}."
            )

        claims = self._decode_claims(token, key, alg)
        _check_times(claims, time.time(), self._config.leeway_s)
        return claims, kid

    def _decode_claims(self, token: str, key: Any, alg: str) -> dict[str, Any]:
        config = self._config
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=config.audience,
                issuer=list(config.issuers),
                # exp, nbf and iat are checked by _check_times, on this module's clock.
                options={
                    "require": _REQUIRED_CLAIMS,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise invalid_token("The token's signature is invalid.") from None
        except jwt.MissingRequiredClaimError as exc:
            raise invalid_token(f"The token has no '{exc.claim}' claim.") from None
        except jwt.InvalidIssuerError:
            raise invalid_token(
                "The token's issuer (iss) is not one of auth.issuers."
            ) from None
        except jwt.InvalidAudienceError:
            raise invalid_token(
                f"The token's audience (aud) does not include {config.audience!r}."
            ) from None
        except jwt.InvalidTokenError as exc:
            raise invalid_token(f"The token is invalid: {_safe(exc)}.") from None
        except jwt.PyJWTError as exc:
            raise invalid_token(
                f"The token cannot be verified with its signing key: {_safe(exc)}."
            ) from None

    def _principal(self, claims: Mapping[str, Any], token: str) -> Principal:
        tenant_id = claims.get("tenant_id")
        if tenant_id is None or tenant_id == "":
            raise invalid_token("The token has no 'tenant_id' claim.")
        if not isinstance(tenant_id, str) or not valid_tenant_id(tenant_id):
            raise invalid_token(
                "The token's 'tenant_id' claim is not a valid id: expected 1 to 128 "
                "characters from A-Z a-z 0-9 _ . : - (not '.' or '..')."
            )
        sub = claims["sub"]
        if not sub:
            raise invalid_token("The token's 'sub' claim is empty.")
        partner = claims.get("partner_id")
        roles, permissions = permissions_from_claims(
            claims, self._config.role_permissions
        )
        # A JSON string may hold a lone surrogate escape ("\ud800"), which no
        # UTF-8 response or log line can carry.
        texts = [
            ("sub", sub),
            ("partner_id", partner),
            *(("roles", role) for role in roles),
        ]
        texts.extend(("permissions", permission) for permission in permissions)
        for claim, text in texts:
            if isinstance(text, str) and not _is_unicode(text):
                raise invalid_token(
                    f"The token's {claim!r} claim is not valid Unicode text "
                    "(it contains a lone surrogate escape)."
                )
        return Principal(
            sub=sub,
            tenant_id=tenant_id,
            partner_id=partner if isinstance(partner, str) else None,
            roles=roles,
            permissions=permissions,
            token=token,
            expires_at=float(claims["exp"]),
        )


def _unverified_header(token: str) -> dict[str, Any]:
    try:
        return jwt.get_unverified_header(token)
    except jwt.DecodeError:
        raise invalid_token("The bearer token is not a well-formed JWT.") from None
    except jwt.InvalidTokenError as exc:
        raise invalid_token(f"The token header is invalid: {_safe(exc)}.") from None


def _check_key_matches(published: PublishedKey, alg: str) -> None:
    # SECURITY: the token's own alg must fit the key, or a key could be used
    # with an algorithm its owner never signs with.
    if published.jwk.key_type != _KEY_TYPES[alg]:
        raise invalid_token(
            f"The token's algorithm {alg} does not fit its signing key "
            f"({published.jwk.key_type})."
        )
    if published.algorithm is not None and published.algorithm != alg:
        raise invalid_token(
            f"The token's algorithm {alg} differs from its signing key's "
            f"algorithm {published.algorithm}."
        )


def _check_times(claims: Mapping[str, Any], now: float, leeway: float) -> None:
    """Check ``exp``, ``nbf`` and ``iat`` (seconds since the epoch) with leeway."""
    exp = _time_claim(claims, "exp")
    if exp is None:
        raise invalid_token("The token has no 'exp' claim.")
    if exp <= now - leeway:
        raise invalid_token("The token has expired (exp is in the past).")
    nbf = _time_claim(claims, "nbf")
    if nbf is not None and nbf > now + leeway:
        raise invalid_token("The token is not valid yet (nbf is in the future).")
    iat = _time_claim(claims, "iat")
    if iat is not None and iat > now + leeway:
        raise invalid_token("The token was issued in the future (iat).")


def _time_claim(claims: Mapping[str, Any], name: str) -> float | None:
    # Absent is allowed (except for exp); a JSON null is not a time.
    if name not in claims:
        return None
    value = claims[name]
    problem = invalid_token(f"The token's '{name}' claim is not a number of seconds.")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise problem
    try:
        seconds = float(value)
    except OverflowError:
        raise problem from None
    # Python's json module decodes NaN and Infinity, which never compare as past.
    if not math.isfinite(seconds):
        raise problem
    return seconds


def _safe(exc: Exception) -> str:
    # PyJWT messages name the failed check, never the token itself.
    return str(exc).rstrip(".")[:200]
