"""The core's own plugin: the two secret backends and ``GET /v1/me``."""

from __future__ import annotations

from typing import Any

from scaiproxy import hookimpl
from scaiproxy.routes import Call, RouteSpec
from scaiproxy.secrets import file_store, scaivault_store

_PRINCIPAL_SCHEMA = {
    "type": "object",
    "properties": {
        "sub": {"type": "string"},
        "tenant_id": {"type": "string"},
        "partner_id": {"type": ["string", "null"]},
        "roles": {"type": "array", "items": {"type": "string"}},
        "permissions": {"type": "array", "items": {"type": "string"}},
        "upstream_credentials": {"type": "string"},
    },
    "required": ["sub", "tenant_id", "roles", "permissions"],
}


@hookimpl
def scaiproxy_secret_backends() -> dict[str, Any]:
    return {"file": file_store, "scaivault": scaivault_store}


async def me(call: Call) -> dict[str, Any]:
    """Describe the caller as the gateway authenticated it, so a 403 can be explained."""
    from scaiproxy.app import RESOLVER

    described = call.principal.public()
    described["upstream_credentials"] = call.request.app[RESOLVER].mode
    return described


@hookimpl
def scaiproxy_routes(config: Any, settings: Any) -> list[RouteSpec]:
    return [
        RouteSpec(
            method="GET",
            path="/v1/me",
            handler=me,
            name="me",
            summary="The authenticated caller: tenant, roles, effective permissions",
            response=_PRINCIPAL_SCHEMA,
            tags=("core",),
        )
    ]
