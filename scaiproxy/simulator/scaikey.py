"""ScaiKey stand-in: one RS256 signing key, its JWKS, and token minting."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from scaiproxy.simulator.options import SimOptions

DEFAULT_ROLES = ("tenant_admin",)
DEFAULT_PERMISSIONS = ("scaicore:view", "scaicore:manage")

# Verified tokens are cached so that a gateway forwarding the same JWT on every
# request does not cost an RSA verification each time.
_TOKEN_CACHE_SIZE = 4096


@dataclass(frozen=True)
class VerifiedToken:
    """Claims of a token that passed verification."""

    tenant_id: str
    sub: str | None
    exp: float
    claims: dict[str, Any]


class ScaiKeyStandIn:
    """Signs and verifies ScaiKey-style access tokens with a key made at start-up.

    The key pair is new for every instance, so tokens from one simulator never
    verify against another.
    """

    def __init__(self, options: SimOptions) -> None:
        self._options = options
        self._private_key = rsa.generate_private_key(
            public_exponent=65537, key_size=2048
        )
        self.public_key = self._private_key.public_key()

        jwk = json.loads(RSAAlgorithm.to_jwk(self.public_key))
        self.kid = _jwk_thumbprint(jwk)
        self.jwks: dict[str, Any] = {
            "keys": [{**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}]
        }
        self._verified: dict[str, VerifiedToken] = {}

    def mint(
        self,
        tenant_id: str,
        sub: str = "user-1",
        roles: Iterable[str] = DEFAULT_ROLES,
        permissions: Iterable[str] = DEFAULT_PERMISSIONS,
        ttl_s: int = 3600,
        **claims: Any,
    ) -> str:
        """Sign an RS256 access token; ``claims`` add to or replace the defaults.

        A negative ``ttl_s`` yields a token that is already expired.
        """
        now = int(time.time())
        permission_list = list(permissions)
        payload: dict[str, Any] = {
            "iss": self._options.issuer,
            "aud": self._options.audience,
            "sub": sub,
            "tenant_id": tenant_id,
            "roles": list(roles),
            "permissions": permission_list,
            "scope": " ".join(permission_list),
            "iat": now,
            "nbf": now,
            "exp": now + ttl_s,
            "jti": uuid.uuid4().hex,
        }
        payload.update(claims)
        return jwt.encode(
            payload, self._private_key, algorithm="RS256", headers={"kid": self.kid}
        )

    def verify(self, token: str) -> VerifiedToken:
        """Check signature, kid, ``iss``, ``aud``, ``exp``, ``nbf`` and ``tenant_id``.

        Raises jwt.InvalidTokenError with a message that names the failed check.
        Issuer and audience are read from the options when a token is first seen,
        so changing them later does not affect tokens already cached.
        """
        cached = self._verified.get(token)
        if cached is not None:
            if cached.exp > time.time():
                return cached
            del self._verified[token]

        header = jwt.get_unverified_header(token)
        if header.get("kid") != self.kid:
            raise jwt.InvalidTokenError(f"unknown signing key id {header.get('kid')!r}")
        claims = jwt.decode(
            token,
            self.public_key,
            algorithms=["RS256"],
            audience=self._options.audience,
            issuer=self._options.issuer,
            options={"require": ["exp", "iat"]},
        )
        tenant_id = claims.get("tenant_id")
        if not isinstance(tenant_id, str) or not tenant_id:
            raise jwt.InvalidTokenError("the tenant_id claim is missing or empty")

        verified = VerifiedToken(
            tenant_id=tenant_id,
            sub=claims.get("sub"),
            exp=float(claims["exp"]),
            claims=claims,
        )
        if len(self._verified) >= _TOKEN_CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = verified
        return verified


def _jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """Compute the RFC 7638 thumbprint of an RSA JWK, used as its ``kid``."""
    members = {"e": jwk["e"], "kty": jwk["kty"], "n": jwk["n"]}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
