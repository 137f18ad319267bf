"""Caller authentication: bearer header, ScaiKey JWT checks, JWKS, permissions.

Tokens are signed with real RSA and EC keys and verified against a real JWKS
server. ``clock`` replaces the ``time`` module inside ``scaiproxy.auth``, so the
token cache and the JWKS refresh limits can be tested without waiting.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import time as real_time
import uuid
from typing import Any

import aiohttp
import jwt
import pytest
from conftest import (
    AUDIENCE,
    ISSUER,
    base_config,
    bearer,
    make_ec_key,
    make_rsa_key,
    mint,
)
from cryptography.hazmat.primitives import serialization
from multidict import CIMultiDict

import scaiproxy.auth
from scaiproxy.auth import JWKSCache, Principal, TokenVerifier, permissions_from_claims
from scaiproxy.config import DEFAULT_ROLE_PERMISSIONS, settings_from_mapping
from scaiproxy.errors import ConfigError, ProxyError

EVENTS = "/v1/modules/scaicore/events"
EMPTY_PAGE = {"data": {"events": [], "next_cursor": None}}
INVOKE = "/v1/modules/scaicore/cores/core-1/invoke"
INVOKE_ANSWER = {
    "data": {"output": {"ok": True}, "request_id": "r-1", "duration_ms": 3}
}
HS_SECRET = "dev-only-shared-secret-of-32-bytes!!"


class FakeClock:
    """Replacement for the ``time`` module in ``scaiproxy.auth``; see ``advance``."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return real_time.time() + self.offset

    def monotonic(self) -> float:
        return real_time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(scaiproxy.auth, "time", fake)
    return fake


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(real_time.time())
    payload = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-1",
        "tenant_id": "acme",
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "permissions": ["scaicore:view"],
    }
    payload.update(overrides)
    return payload


def craft(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    """Build a JWT by hand: unsigned, or HMAC-SHA256 with ``secret``."""
    signing_input = (
        f"{b64url(json.dumps(header).encode())}."
        f"{b64url(json.dumps(payload).encode())}"
    )
    signature = b""
    if secret is not None:
        signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def get_me(client, headers: Any = None) -> tuple[int, dict[str, Any], Any]:
    response = await client.get("/api/v1/me", headers=headers)
    return response.status, await response.json(), response


async def expect_invalid(client, token: str) -> str:
    """Send ``token`` and check the 401 response; returns ``detail.message``."""
    status, body, response = await get_me(client, bearer(token))
    assert status == 401, body
    assert body["detail"]["error"] == "invalid_token"
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert token not in json.dumps(body)
    return body["detail"]["message"]


# The Authorization header


async def test_no_header_is_missing_token(gateway):
    status, body, response = await get_me(gateway)
    assert status == 401
    assert body["detail"]["error"] == "missing_token"
    assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_basic_scheme_rejected(gateway):
    status, body, response = await get_me(
        gateway, {"Authorization": "Basic dXNlcjpwYXNzd29yZA=="}
    )
    assert status == 401
    assert body["detail"]["error"] == "invalid_token"
    assert "Bearer scheme" in body["detail"]["message"]
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert "dXNlcjpwYXNzd29yZA" not in json.dumps(body)


async def test_bearer_without_token(gateway):
    status, body, _ = await get_me(gateway, {"Authorization": "Bearer "})
    assert status == 401
    assert body["detail"]["error"] == "invalid_token"


async def test_second_authorization_header(gateway, rsa_key):
    token = mint(rsa_key)
    headers = [("Authorization", f"Bearer {token}"), ("Authorization", "Bearer x.y.z")]
    status, body, _ = await get_me(gateway, headers)
    assert status == 401
    assert "more than one Authorization" in body["detail"]["message"]


async def test_token_with_inner_space(gateway):
    status, body, _ = await get_me(gateway, {"Authorization": "Bearer abc def"})
    assert status == 401
    assert "malformed" in body["detail"]["message"]


async def test_not_a_jwt(gateway):
    message = await expect_invalid(gateway, "not-a-jwt")
    assert "well-formed JWT" in message


async def test_header_not_json(gateway):
    message = await expect_invalid(gateway, "bm90anNvbg.e30.c2ln")
    assert "well-formed JWT" in message


async def test_kid_not_a_string(gateway):
    token = craft({"alg": "HS256", "kid": 7}, claims(), b"k" * 32)
    message = await expect_invalid(gateway, token)
    assert "header" in message


# Valid tokens


async def test_rs256_token_accepted(gateway, rsa_key):
    status, body, _ = await get_me(gateway, bearer(mint(rsa_key, sub="alice")))
    assert status == 200
    assert body["data"]["sub"] == "alice"
    assert body["data"]["tenant_id"] == "acme"


async def test_es256_token_accepted(gateway, ec_key):
    status, body, _ = await get_me(gateway, bearer(mint(ec_key, sub="bob")))
    assert status == 200
    assert body["data"]["sub"] == "bob"


async def test_audience_list_accepted(gateway, rsa_key):
    token = mint(rsa_key, aud=["other-client", AUDIENCE])
    status, _, _ = await get_me(gateway, bearer(token))
    assert status == 200


async def test_second_issuer_accepted(make_gateway, upstream, jwks_server, rsa_key):
    config = base_config(upstream.base_url, jwks_server.url)
    config["auth"]["issuers"] = ["https://scaikey.test/other", ISSUER]
    client = await make_gateway(config)
    status, _, _ = await get_me(client, bearer(mint(rsa_key)))
    assert status == 200


async def test_exp_within_leeway_accepted(gateway, rsa_key):
    token = mint(rsa_key, exp=int(real_time.time()) - 10)
    status, _, _ = await get_me(gateway, bearer(token))
    assert status == 200


# Claim checks


async def test_expired_token(gateway, rsa_key):
    message = await expect_invalid(gateway, mint(rsa_key, ttl_s=-3600))
    assert "expired" in message


async def test_nbf_in_future(gateway, rsa_key):
    token = mint(rsa_key, nbf=int(real_time.time()) + 3600)
    message = await expect_invalid(gateway, token)
    assert "nbf" in message


async def test_iat_in_future(gateway, rsa_key):
    token = mint(rsa_key, iat=int(real_time.time()) + 3600)
    message = await expect_invalid(gateway, token)
    assert "iat" in message


async def test_wrong_issuer(gateway, rsa_key):
    message = await expect_invalid(gateway, mint(rsa_key, iss="https://evil.test"))
    assert "issuer (iss)" in message


async def test_wrong_audience(gateway, rsa_key):
    message = await expect_invalid(gateway, mint(rsa_key, aud="other-client"))
    assert "audience (aud)" in message


@pytest.mark.parametrize("claim", ["exp", "iss", "aud", "sub"])
async def test_missing_required_claim(gateway, rsa_key, claim):
    message = await expect_invalid(gateway, mint(rsa_key, **{claim: None}))
    assert f"no '{claim}' claim" in message


@pytest.mark.parametrize("value", ["soon", True, 1e400])
async def test_exp_not_a_number(gateway, rsa_key, value):
    message = await expect_invalid(gateway, mint(rsa_key, exp=value))
    assert "'exp'" in message


async def test_no_tenant_id(gateway, rsa_key):
    message = await expect_invalid(gateway, mint(rsa_key, tenant_id=None))
    assert "no 'tenant_id' claim" in message


@pytest.mark.parametrize(
    "tenant_id", ["..", ".", "acme/evil", "acme evil", "a" * 129, "ac\u00e9me", 42]
)
async def test_bad_tenant_id(gateway, rsa_key, tenant_id):
    message = await expect_invalid(gateway, mint(rsa_key, tenant_id=tenant_id))
    assert "'tenant_id' claim is not a valid id" in message


async def test_tampered_payload(gateway, rsa_key):
    header, _, signature = mint(rsa_key).split(".")
    payload = b64url(json.dumps(claims(tenant_id="other")).encode())
    message = await expect_invalid(gateway, f"{header}.{payload}.{signature}")
    assert "signature is invalid" in message


async def test_signed_by_unpublished_key(gateway):
    impostor = make_rsa_key("rsa-1")
    message = await expect_invalid(gateway, mint(impostor))
    assert "signature is invalid" in message


# Algorithms


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
async def test_alg_none_rejected(gateway, alg):
    token = craft({"alg": alg, "typ": "JWT", "kid": "rsa-1"}, claims(), None)
    message = await expect_invalid(gateway, token)
    assert "alg 'none'" in message


async def test_hs256_with_public_key_rejected(gateway, rsa_key):
    public_pem = rsa_key.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token = craft({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims(), public_pem)
    message = await expect_invalid(gateway, token)
    assert "'HS256' is not accepted" in message


async def test_hs256_with_public_key_and_dev_secret(
    make_gateway, upstream, jwks_server, rsa_key
):
    config = base_config(upstream.base_url, jwks_server.url)
    config["auth"]["hs256_secret"] = HS_SECRET
    client = await make_gateway(config)
    public_pem = rsa_key.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token = craft({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims(), public_pem)
    message = await expect_invalid(client, token)
    assert "signature is invalid" in message


async def test_algorithm_not_listed(gateway, rsa_key):
    token = jwt.encode(
        claims(), rsa_key.private_key, algorithm="RS512", headers={"kid": "rsa-1"}
    )
    message = await expect_invalid(gateway, token)
    assert "'RS512' is not accepted; accepted: RS256, ES256" in message


async def test_algorithm_differs_from_jwk_alg(
    make_gateway, upstream, jwks_server, rsa_key
):
    config = base_config(upstream.base_url, jwks_server.url)
    config["auth"]["algorithms"] = ["RS256", "RS384"]
    client = await make_gateway(config)
    token = jwt.encode(
        claims(), rsa_key.private_key, algorithm="RS384", headers={"kid": "rsa-1"}
    )
    message = await expect_invalid(client, token)
    assert "differs from its signing key's algorithm RS256" in message


async def test_es256_token_naming_rsa_key(gateway, ec_key):
    token = jwt.encode(
        claims(), ec_key.private_key, algorithm="ES256", headers={"kid": "rsa-1"}
    )
    message = await expect_invalid(gateway, token)
    assert "does not fit its signing key (RSA)" in message


# Development shared secret


def hs256_config(upstream_url: str, **auth: Any) -> dict[str, Any]:
    config = base_config(upstream_url, "")
    config["auth"] = {
        "mode": "scaikey",
        "hs256_secret": HS_SECRET,
        "issuers": [ISSUER],
        "audience": AUDIENCE,
        **auth,
    }
    return config


async def test_hs256_secret_accepted_in_development(make_gateway, upstream):
    client = await make_gateway(hs256_config(upstream.base_url))
    token = jwt.encode(claims(sub="dev"), HS_SECRET, algorithm="HS256")
    status, body, _ = await get_me(client, bearer(token))
    assert status == 200
    assert body["data"]["sub"] == "dev"


async def test_hs256_wrong_secret(make_gateway, upstream):
    client = await make_gateway(hs256_config(upstream.base_url))
    token = jwt.encode(
        claims(), "another-secret-of-32-bytes-or-more", algorithm="HS256"
    )
    message = await expect_invalid(client, token)
    assert "signature is invalid" in message


async def test_hs256_only_rejects_rs256(make_gateway, upstream, rsa_key):
    client = await make_gateway(hs256_config(upstream.base_url))
    message = await expect_invalid(client, mint(rsa_key))
    assert "accepted: HS256" in message


def test_hs256_secret_refused_in_production():
    config = hs256_config("http://127.0.0.1:9")
    config["environment"] = "production"
    config["auth"]["jwks_url"] = "https://scaikey.test/jwks.json"
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(config, environ={})
    assert caught.value.key == "auth.hs256_secret"


# JWKS fetching, rotation and outages


async def test_unknown_kid_flood_fetches_twice_at_most(gateway, jwks_server):
    stranger = make_rsa_key()

    async def send_unknown_kid() -> int:
        token = jwt.encode(
            claims(), stranger.private_key, "RS256", headers={"kid": uuid.uuid4().hex}
        )
        return (await get_me(gateway, bearer(token)))[0]

    concurrent = await asyncio.gather(*(send_unknown_kid() for _ in range(50)))
    sequential = [await send_unknown_kid() for _ in range(50)]
    assert set(concurrent) == {401}
    assert set(sequential) == {401}
    assert jwks_server.fetches <= 2


async def test_first_tokens_share_one_fetch(gateway, jwks_server, rsa_key):
    tokens = [mint(rsa_key) for _ in range(20)]
    answers = await asyncio.gather(*(get_me(gateway, bearer(t)) for t in tokens))
    assert [status for status, _, _ in answers] == [200] * 20
    assert jwks_server.fetches == 1


async def test_stale_keys_refetched_once(jwks_server, clock):
    config = base_config("http://127.0.0.1:9", jwks_server.url)
    config["auth"]["jwks_refresh_interval_s"] = 0
    settings = settings_from_mapping(config, environ={})
    async with aiohttp.ClientSession() as session:
        cache = JWKSCache(settings.auth, session)
        await cache.get("rsa-1")
        clock.advance(301)
        keys = await asyncio.gather(*(cache.get("rsa-1") for _ in range(20)))
        for _ in range(200):
            if jwks_server.fetches >= 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
    assert {key.kid for key in keys} == {"rsa-1"}
    assert jwks_server.fetches == 2


async def test_unknown_kid_message(gateway):
    message = await expect_invalid(gateway, mint(make_rsa_key("rsa-unknown")))
    assert "kid" in message


async def test_unknown_kid_refetch_waits_for_interval(
    gateway, jwks_server, rsa_key, clock
):
    assert (await get_me(gateway, bearer(mint(rsa_key))))[0] == 200
    rotated = make_rsa_key("rsa-2")
    jwks_server.keys = [rotated]
    clock.advance(5)
    status, _, _ = await get_me(gateway, bearer(mint(rotated)))
    assert status == 401
    assert jwks_server.fetches == 1


async def test_rotated_key_accepted(gateway, jwks_server, rsa_key, clock):
    old_token = mint(rsa_key)
    assert (await get_me(gateway, bearer(old_token)))[0] == 200
    rotated = make_ec_key("ec-2")
    jwks_server.keys = [rotated]
    clock.advance(31)

    status, body, _ = await get_me(gateway, bearer(mint(rotated, sub="after")))
    assert status == 200, body
    assert body["data"]["sub"] == "after"
    assert jwks_server.fetches == 2


async def test_cached_token_dropped_with_its_key(gateway, jwks_server, rsa_key, clock):
    old_token = mint(rsa_key)
    assert (await get_me(gateway, bearer(old_token)))[0] == 200
    rotated = make_rsa_key("rsa-2")
    jwks_server.keys = [rotated]
    clock.advance(31)
    assert (await get_me(gateway, bearer(mint(rotated))))[0] == 200

    message = await expect_invalid(gateway, old_token)
    assert "kid" in message


async def test_jwks_outage_keeps_cached_keys(gateway, jwks_server, rsa_key, clock):
    assert (await get_me(gateway, bearer(mint(rsa_key))))[0] == 200
    jwks_server.fail = True
    clock.advance(301)
    status, _, _ = await get_me(gateway, bearer(mint(rsa_key)))
    assert status == 200
    # The stale cache is refreshed in the background.
    for _ in range(200):
        if jwks_server.fetches == 2:
            break
        await asyncio.sleep(0.01)
    assert jwks_server.fetches == 2
    assert (await get_me(gateway, bearer(mint(rsa_key))))[0] == 200


async def test_jwks_down_without_keys_is_503(gateway, jwks_server, rsa_key):
    jwks_server.fail = True
    status, body, response = await get_me(gateway, bearer(mint(rsa_key)))
    assert status == 503
    assert body["detail"]["error"] == "auth_unavailable"
    assert response.headers["Retry-After"] == "5"


async def test_jwks_unreachable_is_503(make_gateway, upstream, rsa_key):
    jwks_url = f"http://127.0.0.1:{closed_port()}/.well-known/jwks.json"
    client = await make_gateway(base_config(upstream.base_url, jwks_url))
    status, body, _ = await get_me(client, bearer(mint(rsa_key)))
    assert status == 503
    assert body["detail"]["error"] == "auth_unavailable"


async def test_jwks_recovers_after_interval(gateway, jwks_server, rsa_key, clock):
    jwks_server.fail = True
    assert (await get_me(gateway, bearer(mint(rsa_key))))[0] == 503
    jwks_server.fail = False
    clock.advance(31)
    status, _, _ = await get_me(gateway, bearer(mint(rsa_key)))
    assert status == 200


async def test_jwks_outage_recovers_in_5s(gateway, jwks_server, rsa_key, clock):
    jwks_server.fail = True
    assert (await get_me(gateway, bearer(mint(rsa_key))))[0] == 503
    jwks_server.fail = False
    clock.advance(5)
    status, _, _ = await get_me(gateway, bearer(mint(rsa_key)))
    assert status == 200


async def test_jwks_outage_fetch_rate(gateway, jwks_server, rsa_key, clock):
    jwks_server.fail = True
    for _ in range(10):
        assert (await get_me(gateway, bearer(mint(rsa_key))))[0] == 503
    assert jwks_server.fetches == 1
    clock.advance(4)
    _, _, response = await get_me(gateway, bearer(mint(rsa_key)))
    assert response.headers["Retry-After"] == "1"
    assert jwks_server.fetches == 1
    clock.advance(1)
    await get_me(gateway, bearer(mint(rsa_key)))
    assert jwks_server.fetches == 2


async def test_jwks_outage_retry_after_follows_interval(
    make_gateway, upstream, jwks_server, rsa_key, clock
):
    config = base_config(upstream.base_url, jwks_server.url)
    config["auth"]["jwks_refresh_interval_s"] = 2
    client = await make_gateway(config)
    jwks_server.fail = True
    _, _, response = await get_me(client, bearer(mint(rsa_key)))
    assert response.headers["Retry-After"] == "2"
    jwks_server.fail = False
    clock.advance(2)
    assert (await get_me(client, bearer(mint(rsa_key))))[0] == 200


async def test_empty_jwks_refetched_in_5s(gateway, jwks_server, rsa_key, clock):
    jwks_server.keys = []
    status, body, response = await get_me(gateway, bearer(mint(rsa_key)))
    assert status == 503
    assert "no usable signing key" in body["detail"]["message"]
    assert response.headers["Retry-After"] == "5"
    jwks_server.keys = [rsa_key]
    clock.advance(5)
    assert (await get_me(gateway, bearer(mint(rsa_key))))[0] == 200


async def test_held_keys_keep_refresh_interval(gateway, jwks_server, rsa_key, clock):
    assert (await get_me(gateway, bearer(mint(rsa_key))))[0] == 200
    stranger = make_rsa_key("rsa-unknown")
    for seconds in (5, 10, 14):
        clock.advance(seconds)
        assert (await get_me(gateway, bearer(mint(stranger))))[0] == 401
    assert jwks_server.fetches == 1
    clock.advance(1)
    assert (await get_me(gateway, bearer(mint(stranger))))[0] == 401
    assert jwks_server.fetches == 2


async def test_jwks_skips_symmetric_keys(jwks_server, rsa_key):
    class SymmetricKey:
        def jwk(self) -> dict[str, Any]:
            return {"kty": "oct", "kid": "oct-1", "k": b64url(b"k" * 32)}

    jwks_server.keys = [SymmetricKey(), rsa_key]
    settings = settings_from_mapping(
        base_config("http://127.0.0.1:9", jwks_server.url), environ={}
    )
    async with aiohttp.ClientSession() as session:
        cache = JWKSCache(settings.auth, session)
        assert (await cache.get("rsa-1")).kid == "rsa-1"
        with pytest.raises(ProxyError) as caught:
            await cache.get("oct-1")
    assert caught.value.error == "invalid_token"


# The verified-token cache


async def verifier_for(session, jwks_url: str) -> TokenVerifier:
    settings = settings_from_mapping(
        base_config("http://127.0.0.1:9", jwks_url), environ={}
    )
    return TokenVerifier(settings.auth, JWKSCache(settings.auth, session))


async def test_cache_returns_same_principal(jwks_server, rsa_key):
    token = mint(rsa_key)
    async with aiohttp.ClientSession() as session:
        verifier = await verifier_for(session, jwks_server.url)
        first = await verifier.verify(token)
        second = await verifier.verify(token)
    assert second is first


async def test_header_cache_hit_keeps_every_header_check(jwks_server, rsa_key):
    token = mint(rsa_key)
    async with aiohttp.ClientSession() as session:
        verifier = await verifier_for(session, jwks_server.url)
        first = await verifier.verify_header(CIMultiDict(Authorization=f"Bearer {token}"))
        fetches = jwks_server.fetches
        # Served from the cache, without another JWKS fetch, in any accepted form.
        for value in (f"Bearer {token}", f"bearer {token}", f"Bearer   {token}"):
            principal = await verifier.verify_header(CIMultiDict(Authorization=value))
            assert principal is first
        assert jwks_server.fetches == fetches
        # A cached token does not make a malformed header acceptable.
        twice = CIMultiDict([("Authorization", f"Bearer {token}")] * 2)
        for headers in (twice, CIMultiDict(Authorization=f"Basic {token}")):
            with pytest.raises(ProxyError) as caught:
                await verifier.verify_header(headers)
            assert caught.value.status == 401


async def test_header_with_surrogates_rejected(jwks_server, rsa_key):
    """aiohttp keeps header bytes that are not UTF-8 as lone surrogates."""
    token = mint(rsa_key)
    async with aiohttp.ClientSession() as session:
        verifier = await verifier_for(session, jwks_server.url)
        await verifier.verify_header(CIMultiDict(Authorization=f"Bearer {token}"))
        for value in ("Bearer \udcff\udcfe", f"Bearer {token}\udcff"):
            with pytest.raises(ProxyError) as caught:
                await verifier.verify_header(CIMultiDict(Authorization=value))
            assert caught.value.status == 401
            assert caught.value.error == "invalid_token"


async def test_cache_hit_checks_exp(gateway, rsa_key, clock):
    token = mint(rsa_key, ttl_s=60)
    assert (await get_me(gateway, bearer(token)))[0] == 200
    # Past exp and past the 30 s leeway.
    clock.advance(91)
    message = await expect_invalid(gateway, token)
    assert "expired" in message


async def test_cache_never_outlives_exp(jwks_server, rsa_key, clock):
    token = mint(rsa_key, ttl_s=60)
    async with aiohttp.ClientSession() as session:
        verifier = await verifier_for(session, jwks_server.url)
        first = await verifier.verify(token)
        clock.advance(70)
        # Past exp but inside the 30 s leeway: verified again, not served cached.
        second = await verifier.verify(token)
    assert second is not first


# Permissions and roles


@pytest.fixture
def scaicore_upstream(upstream):
    upstream.route("GET", EVENTS, json_body=EMPTY_PAGE)
    upstream.route("POST", INVOKE, json_body=INVOKE_ANSWER)
    return upstream


async def get_events(client, token: str):
    response = await client.get("/api/v1/scaicore/events", headers=bearer(token))
    return response.status, await response.json()


async def invoke(client, token: str):
    response = await client.post(
        "/api/v1/scaicore/cores/core-1/invoke",
        json={"input": {}},
        headers=bearer(token),
    )
    return response.status, await response.json()


@pytest.mark.parametrize(
    "grant",
    [
        {"permissions": ["scaicore:view"]},
        {"scope": "openid scaicore:view profile"},
        {"scp": ["scaicore:view"]},
        {"scp": "email scaicore:view"},
    ],
    ids=["permissions", "scope", "scp-list", "scp-string"],
)
async def test_permission_claim_forms(gateway, scaicore_upstream, rsa_key, grant):
    token = mint(rsa_key, **{"permissions": None, **grant})
    status, body = await get_events(gateway, token)
    assert status == 200, body
    assert len(scaicore_upstream.requests) == 1


@pytest.mark.parametrize(
    "grant",
    [
        {"permissions": ["scaicore:viewer"]},
        {"permissions": ["scaicore"]},
        {"scope": "xscaicore:view"},
        {"scope": "scaicore:view2 scaicore:vie"},
        {"scp": "scaicore:views"},
        {"scp": ["scaicore:view scaicore:manage"]},
    ],
)
async def test_permission_substrings_refused(
    gateway, scaicore_upstream, rsa_key, grant
):
    token = mint(rsa_key, **{"permissions": None, **grant})
    status, body = await get_events(gateway, token)
    assert status == 403
    assert body["detail"]["error"] == "insufficient_scope"
    assert body["detail"]["required"] == "scaicore:view"
    assert scaicore_upstream.requests == []


async def test_manage_needed_for_invoke(gateway, scaicore_upstream, rsa_key):
    status, body = await invoke(gateway, mint(rsa_key, permissions=["scaicore:view"]))
    assert status == 403
    assert body["detail"]["required"] == "scaicore:manage"
    assert "scaicore:manage" in body["detail"]["message"]


@pytest.mark.parametrize("role", ["super_admin", "partner_admin", "tenant_admin"])
async def test_admin_roles_may_invoke(gateway, scaicore_upstream, rsa_key, role):
    status, body = await invoke(gateway, mint(rsa_key, permissions=None, role=role))
    assert status == 200, body


async def test_viewer_role_may_view(gateway, scaicore_upstream, rsa_key):
    token = mint(rsa_key, permissions=None, roles=["tenant_viewer"])
    assert (await get_events(gateway, token))[0] == 200


async def test_viewer_role_may_not_invoke(gateway, scaicore_upstream, rsa_key):
    token = mint(rsa_key, permissions=None, roles=["tenant_viewer"])
    assert (await invoke(gateway, token))[0] == 403


async def test_user_role_grants_nothing(gateway, scaicore_upstream, rsa_key):
    token = mint(rsa_key, permissions=None, role="tenant_user")
    assert (await get_events(gateway, token))[0] == 403


async def test_role_and_roles_combined(gateway, rsa_key):
    token = mint(rsa_key, permissions=None, role="tenant_user", roles=["tenant_viewer"])
    _, body, _ = await get_me(gateway, bearer(token))
    assert body["data"]["roles"] == ["tenant_user", "tenant_viewer"]
    assert body["data"]["permissions"] == ["scaicore:view"]


async def test_configured_role_table(
    make_gateway, scaicore_upstream, jwks_server, rsa_key
):
    config = base_config(scaicore_upstream.base_url, jwks_server.url)
    config["auth"]["role_permissions"] = {"operator": ["scaicore:*"], "auditor": []}
    client = await make_gateway(config)

    operator = mint(rsa_key, permissions=None, role="operator")
    assert (await invoke(client, operator))[0] == 200
    auditor = mint(rsa_key, permissions=None, role="auditor")
    assert (await get_events(client, auditor))[0] == 403
    # A configured table replaces the defaults.
    admin = mint(rsa_key, permissions=None, role="tenant_admin")
    assert (await get_events(client, admin))[0] == 403


async def test_invalid_role_permission_rejected(upstream, jwks_server):
    config = base_config(upstream.base_url, jwks_server.url)
    config["auth"]["role_permissions"] = {"operator": ["scaicore view"]}
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(config, environ={})
    assert caught.value.key == "auth.role_permissions.operator"


def test_wildcard_matches_whole_segments():
    principal = Principal(
        "u", "acme", None, frozenset(), frozenset({"scaicore:*", "scaiqueue:read"})
    )
    assert principal.has_permission("scaicore:manage")
    assert not principal.has_permission("scaicorex:view")
    assert not principal.has_permission("scaiqueue:write")


def test_default_role_table():
    _, admin = permissions_from_claims(
        {"role": "tenant_admin"}, DEFAULT_ROLE_PERMISSIONS
    )
    _, viewer = permissions_from_claims(
        {"role": "tenant_viewer"}, DEFAULT_ROLE_PERMISSIONS
    )
    _, user = permissions_from_claims({"role": "tenant_user"}, DEFAULT_ROLE_PERMISSIONS)
    assert admin == {"scaicore:*"}
    assert viewer == {"scaicore:view"}
    assert user == frozenset()


# GET /api/v1/me


async def test_me_describes_principal(gateway, rsa_key):
    token = mint(
        rsa_key,
        sub="carol",
        partner_id="partner-9",
        role="tenant_viewer",
        permissions=["scaiqueue:read"],
        scope="openid",
    )
    status, body, _ = await get_me(gateway, bearer(token))
    assert status == 200
    assert body["data"] == {
        "sub": "carol",
        "tenant_id": "acme",
        "partner_id": "partner-9",
        "roles": ["tenant_viewer"],
        "permissions": ["openid", "scaicore:view", "scaiqueue:read"],
        "upstream_credentials": "auto",
    }


async def test_me_shows_deploy_auth_mode(make_gateway, upstream, jwks_server, rsa_key):
    config = base_config(upstream.base_url, jwks_server.url)
    client = await make_gateway(config, environ={"SCAIFLOW_DEPLOY_AUTH": "api_key"})
    _, body, _ = await get_me(client, bearer(mint(rsa_key)))
    assert body["data"]["upstream_credentials"] == "api_key"


# auth.mode: disabled


def disabled_config(upstream_url: str, **dev: Any) -> dict[str, Any]:
    config = base_config(upstream_url, "")
    config["auth"] = {
        "mode": "disabled",
        "dev_principal": {"sub": "dev-1", "tenant_id": "dev-tenant", **dev},
    }
    return config


async def test_disabled_serves_dev_principal(make_gateway, upstream):
    client = await make_gateway(disabled_config(upstream.base_url))
    status, body, _ = await get_me(client)
    assert status == 200
    assert body["data"]["sub"] == "dev-1"
    assert body["data"]["tenant_id"] == "dev-tenant"
    assert body["data"]["roles"] == ["tenant_admin"]
    assert body["data"]["permissions"] == ["scaicore:*"]


async def test_disabled_ignores_bearer(make_gateway, upstream, rsa_key):
    client = await make_gateway(disabled_config(upstream.base_url))
    token = mint(rsa_key, sub="someone-else", tenant_id="other")
    _, body, _ = await get_me(client, bearer(token))
    assert body["data"]["sub"] == "dev-1"


async def test_disabled_logs_warning(make_gateway, upstream, log_stream):
    await make_gateway(disabled_config(upstream.base_url))
    events = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    warnings = [e for e in events if e.get("event") == "authentication_disabled"]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"


def test_disabled_refused_in_production():
    config = disabled_config("http://127.0.0.1:9")
    config["environment"] = "production"
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(config, environ={})
    assert caught.value.key == "auth.mode"


async def test_disabled_bad_dev_tenant(make_gateway, upstream):
    with pytest.raises(ConfigError) as caught:
        await make_gateway(disabled_config(upstream.base_url, tenant_id="../etc"))
    assert caught.value.key == "auth.dev_principal.tenant_id"


# Config keys


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("upstream_credentials", "sometimes"),
        ("algorithms", ["HS256"]),
        ("algorithms", ["none"]),
        ("mode", "open"),
        ("leeway_s", -1),
    ],
)
def test_bad_auth_value_rejected(key, value):
    config = base_config("http://127.0.0.1:9", "http://127.0.0.1:9/jwks")
    config["auth"][key] = value
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(config, environ={})
    assert caught.value.key.startswith(f"auth.{key}")


def test_auth_defaults():
    settings = settings_from_mapping(
        base_config("http://127.0.0.1:9", "http://127.0.0.1:9/jwks"), environ={}
    )
    auth = settings.auth
    assert auth.algorithms == ("RS256", "ES256")
    assert auth.env_api_key_var == "SCAIGRID_API_KEY"
    assert dict(auth.role_permissions) == {
        role: tuple(grants) for role, grants in DEFAULT_ROLE_PERMISSIONS.items()
    }


# Claims that no response or log line can carry


@pytest.mark.parametrize(
    "claims, named",
    [
        ({"sub": "\ud800"}, "'sub'"),
        ({"partner_id": "p-\udfff"}, "'partner_id'"),
        ({"roles": ["viewer\ud800"]}, "'roles'"),
        ({"permissions": ["scaicore:view", "x\ud800"]}, "'permissions'"),
    ],
    ids=["sub", "partner_id", "roles", "permissions"],
)
async def test_lone_surrogate_claim_rejected(gateway, rsa_key, claims, named):
    message = await expect_invalid(gateway, mint(rsa_key, **claims))
    assert named in message
    assert "Unicode" in message


@pytest.mark.parametrize("sub", [123, ["a"], {"id": "a"}, True])
async def test_sub_not_string_rejected(gateway, rsa_key, sub):
    # PyJWT checks the type of sub itself.
    message = await expect_invalid(gateway, mint(rsa_key, sub=sub))
    assert "must be a string" in message


async def test_non_ascii_sub_accepted(gateway, rsa_key):
    status, body, _ = await get_me(gateway, bearer(mint(rsa_key, sub="jürgen-ü")))
    assert status == 200
    assert body["data"]["sub"] == "jürgen-ü"


@pytest.mark.parametrize("name", ["iat", "nbf", "exp"])
async def test_null_time_claim_rejected(gateway, rsa_key, name):
    token = jwt.encode(
        claims(**{name: None}),
        rsa_key.private_key,
        algorithm="RS256",
        headers={"kid": rsa_key.kid},
    )
    message = await expect_invalid(gateway, token)
    assert f"'{name}'" in message
