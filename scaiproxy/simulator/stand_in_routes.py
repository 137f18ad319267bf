"""Routes of the ScaiKey and ScaiVault stand-ins.

ScaiKey publishes the JWKS and, for development only, mints tokens for any
tenant without a login. ScaiVault stores secrets by path behind one bearer token.
Neither body is enveloped the ScaiGrid way.
"""

from __future__ import annotations

import hmac
import re
from typing import Any

from aiohttp import web

from scaiproxy.simulator.errors import SimError
from scaiproxy.simulator.middleware import (
    SIMULATOR_KEY,
    json_response,
    read_json_object,
)

#: Maximum lifetime of a token from the development token route: one week.
MAX_DEV_TOKEN_TTL_S = 7 * 24 * 3600

_PATH_SEGMENT = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_MAX_SECRET_PATH = 512


# --- ScaiKey ---------------------------------------------------------------------


async def get_jwks(request: web.Request) -> web.Response:
    jwks = request.app[SIMULATOR_KEY].scaikey.jwks
    return json_response(jwks, headers={"Cache-Control": "public, max-age=300"})


def _invalid_token_request(message: str) -> SimError:
    return SimError(400, "invalid_request", message)


def _string_list(body: dict[str, Any], name: str) -> list[str] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _invalid_token_request(f"{name} must be a list of strings.")
    return value


async def mint_dev_token(request: web.Request) -> web.Response:
    """Mint an access token for any tenant; development only, with no login."""
    sim = request.app[SIMULATOR_KEY]
    body = await read_json_object(request, "invalid_request")

    tenant_id = body.get("tenant_id")
    if not isinstance(tenant_id, str) or not tenant_id:
        raise _invalid_token_request("tenant_id is required and must be a string.")
    sub = body.get("sub", "user-1")
    if not isinstance(sub, str) or not sub:
        raise _invalid_token_request("sub must be a non-empty string.")
    ttl_s = body.get("ttl_s", 3600)
    if (
        isinstance(ttl_s, bool)
        or not isinstance(ttl_s, int)
        or not 1 <= ttl_s <= MAX_DEV_TOKEN_TTL_S
    ):
        raise _invalid_token_request(
            f"ttl_s must be an integer from 1 to {MAX_DEV_TOKEN_TTL_S} seconds."
        )

    # A request that names roles or permissions gets exactly those, so a
    # tenant_viewer token does not also carry the default scaicore:manage.
    # Only a request that names neither gets the defaults.
    options: dict[str, Any] = {}
    roles = _string_list(body, "roles")
    permissions = _string_list(body, "permissions")
    if roles is not None or permissions is not None:
        options["roles"] = roles or []
        options["permissions"] = permissions or []

    token = sim.mint_token(tenant_id, sub=sub, ttl_s=ttl_s, **options)
    return json_response(
        {"access_token": token, "token_type": "Bearer", "expires_in": ttl_s},
        headers={"Cache-Control": "no-store"},
    )


# --- ScaiVault -------------------------------------------------------------------


def _check_vault_token(request: web.Request) -> None:
    expected = request.app[SIMULATOR_KEY].options.vault_token
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    # SECURITY: constant-time comparison, so timing does not reveal the token.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), expected.encode()
    ):
        raise SimError(
            401,
            "unauthorized",
            "Missing or invalid vault token: send Authorization: Bearer <token>.",
            headers={"WWW-Authenticate": 'Bearer realm="scaivault"'},
        )


def _secret_path(request: web.Request) -> str:
    """Return the decoded secret path, or raise 400 for traversal or odd characters."""
    path = request.match_info["path"]
    segments = path.split("/")
    for segment in segments:
        # SECURITY: "." and ".." would let a path escape its prefix.
        if segment in (".", "..") or not _PATH_SEGMENT.fullmatch(segment):
            raise SimError(
                400,
                "invalid_path",
                f"Invalid secret path {path!r}: use segments of letters, digits, "
                "'_', '.' and '-', separated by single slashes, without '.' or '..'.",
            )
    if len(path) > _MAX_SECRET_PATH:
        raise SimError(
            400,
            "invalid_path",
            f"Secret path is longer than {_MAX_SECRET_PATH} characters.",
        )
    return path


async def get_secret(request: web.Request) -> web.Response:
    _check_vault_token(request)
    path = _secret_path(request)
    secret = request.app[SIMULATOR_KEY].state.secrets.get(path)
    if secret is None:
        raise SimError(404, "secret_not_found", f"No secret at {path!r}.")
    return json_response(secret)


async def put_secret(request: web.Request) -> web.Response:
    _check_vault_token(request)
    path = _secret_path(request)
    sim = request.app[SIMULATOR_KEY]
    body = await read_json_object(request, "invalid_request")

    data = body.get("data")
    if not isinstance(data, dict):
        raise SimError(
            422, "invalid_request", "data is required and must be an object."
        )
    secret_type = body.get("secret_type", "generic")
    if not isinstance(secret_type, str) or not secret_type:
        raise SimError(
            422, "invalid_request", "secret_type must be a non-empty string."
        )

    secret = sim.put_secret(path, data, secret_type)
    return json_response(secret)


def add_stand_in_routes(app: web.Application) -> None:
    app.router.add_get("/scaikey/api/v1/platform/.well-known/jwks.json", get_jwks)
    app.router.add_post("/scaikey/dev/token", mint_dev_token)
    app.router.add_get("/scaivault/v1/secrets/{path:.+}", get_secret)
    app.router.add_put("/scaivault/v1/secrets/{path:.+}", put_secret)
