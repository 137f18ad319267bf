"""Test controls under ``/_sim``: faults, API keys and the request log.

These routes are not part of ScaiGrid and need no credentials, so the simulator
must only listen on loopback.
"""

from __future__ import annotations

import re
from itertools import islice
from typing import Any

from aiohttp import web

from scaiproxy.simulator.errors import SimError, invalid_field
from scaiproxy.simulator.middleware import (
    SIMULATOR_KEY,
    json_response,
    mask_key,
    read_json_object,
)
from scaiproxy.simulator.options import MODELS_SHAPES, validate_faults

_FAULT_FIELDS = ("latency_ms", "error_rate", "rate_limit_per_minute", "models_shape")
_DEFAULT_REQUESTS_LIMIT = 50


def _faults(request: web.Request) -> dict[str, Any]:
    options = request.app[SIMULATOR_KEY].options
    return {name: getattr(options, name) for name in _FAULT_FIELDS}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


async def get_faults(request: web.Request) -> web.Response:
    return json_response({"data": _faults(request)})


async def set_faults(request: web.Request) -> web.Response:
    """Change any of the fault settings; fields left out keep their value."""
    body = await read_json_object(request, "invalid_json")
    unknown = sorted(set(body) - set(_FAULT_FIELDS))
    if unknown:
        raise invalid_field(
            unknown[0],
            f"unknown fault setting; expected one of {', '.join(_FAULT_FIELDS)}",
        )

    updated = _faults(request)
    updated.update(body)
    if not _is_number(updated["latency_ms"]):
        raise invalid_field("latency_ms", "expected a number of milliseconds")
    if not _is_number(updated["error_rate"]):
        raise invalid_field("error_rate", "expected a number from 0 to 1")
    limit = updated["rate_limit_per_minute"]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
        raise invalid_field("rate_limit_per_minute", "expected an integer or null")
    if updated["models_shape"] not in MODELS_SHAPES:
        raise invalid_field(
            "models_shape", f"expected one of {', '.join(MODELS_SHAPES)}"
        )
    try:
        validate_faults(**updated)
    except ValueError as exc:
        raise SimError(422, "validation_error", str(exc)) from None

    options = request.app[SIMULATOR_KEY].options
    for name, value in updated.items():
        setattr(options, name, value)
    return json_response({"data": _faults(request)})


async def add_key(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR_KEY]
    body = await read_json_object(request, "invalid_json")
    api_key = body.get("api_key")
    tenant_id = body.get("tenant_id")
    if not isinstance(tenant_id, str) or not tenant_id:
        raise invalid_field("tenant_id", "expected a non-empty string")
    if not isinstance(api_key, str):
        raise invalid_field("api_key", "expected a string")
    try:
        sim.add_api_key(api_key, tenant_id)
    except ValueError as exc:
        raise invalid_field("api_key", str(exc)) from None
    return json_response(
        {"data": {"tenant_id": tenant_id, "api_key": mask_key(api_key)}}, status=201
    )


async def list_requests(request: web.Request) -> web.Response:
    """Return the last ``limit`` recorded requests, oldest first.

    Requests to ScaiGrid, ScaiKey and ScaiVault are recorded; ``/_sim`` ones are not.
    """
    sim = request.app[SIMULATOR_KEY]
    raw = request.query.get("limit", str(_DEFAULT_REQUESTS_LIMIT))
    if (
        not re.fullmatch(r"[0-9]{1,6}", raw)
        or not 1 <= int(raw) <= sim.recorded_requests.maxlen
    ):
        raise invalid_field(
            "limit", f"expected an integer from 1 to {sim.recorded_requests.maxlen}"
        )
    limit = int(raw)
    skip = max(0, len(sim.recorded_requests) - limit)
    return json_response({"data": list(islice(sim.recorded_requests, skip, None))})


def add_control_routes(app: web.Application) -> None:
    app.router.add_get("/_sim/faults", get_faults)
    app.router.add_post("/_sim/faults", set_faults)
    app.router.add_post("/_sim/keys", add_key)
    app.router.add_get("/_sim/requests", list_requests)
