"""ScaiGrid routes: ScaiCore, ScaiQueue, ScaiBunker and the model catalogue.

Every handler runs after the middleware has authenticated the request, and reads
and writes only the caller's tenant.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from scaiproxy.simulator import catalog, cursors, errors
from scaiproxy.simulator.encoding import dumps
from scaiproxy.simulator.errors import SimError, invalid_field
from scaiproxy.simulator.middleware import (
    PRINCIPAL_KEY,
    REQUEST_ID_KEY,
    SIMULATOR_KEY,
    json_response,
    read_json_object,
)
from scaiproxy.simulator.state import CHECKPOINT_STATUSES, TenantState

MAX_PAGE_LIMIT = 500
DEFAULT_EVENTS_LIMIT = 50
DEFAULT_CHECKPOINTS_LIMIT = 50
# Small default pages, so that clients listing scopes or models must follow cursors.
DEFAULT_SCOPES_LIMIT = 3
DEFAULT_MODELS_ITEMS_LIMIT = 4
MAX_CATALOG_LIMIT = 100

_DIGITS = re.compile(r"[0-9]{1,6}")

# The model lists never change, so their encoded bodies are built once.
_NATIVE_MODELS_BODY = dumps({"data": list(catalog.NATIVE_MODELS)})
_OPENAI_MODELS_BODY = dumps(catalog.openai_models())


def _tenant(request: web.Request) -> TenantState:
    sim = request.app[SIMULATOR_KEY]
    return sim.state.tenant(request[PRINCIPAL_KEY].tenant_id)


def _raw_json(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json")


def _limit(request: web.Request, default: int, maximum: int) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    if not _DIGITS.fullmatch(raw) or not 1 <= int(raw) <= maximum:
        raise invalid_field(
            "limit", f"expected an integer from 1 to {maximum}, got {raw!r}"
        )
    return int(raw)


def _cursor(request: web.Request, kind: str) -> int:
    """Return the position in the ``cursor`` parameter, 0 when there is none."""
    raw = request.query.get("cursor")
    if not raw:
        return 0
    try:
        return cursors.decode_cursor(kind, raw)
    except cursors.InvalidCursor as exc:
        raise SimError(
            400,
            errors.INVALID_CURSOR,
            f"Invalid cursor {raw!r}: {exc}. Send a next_cursor from an earlier "
            "page, percent-encoded, or no cursor to start from the beginning.",
            details=[{"field": "cursor", "message": str(exc)}],
        ) from None


def _optional_filter(request: web.Request, name: str) -> str | None:
    return request.query.get(name) or None


# --- ScaiCore --------------------------------------------------------------------


async def list_cores(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    return json_response({"data": [core.describe() for core in tenant.cores.values()]})


async def get_core(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    core_id = request.match_info["core_id"]
    core = tenant.cores.get(core_id)
    if core is None:
        raise SimError(404, errors.CORE_NOT_FOUND, f"Core {core_id!r} not found.")
    return json_response({"data": core.describe()})


async def invoke_core(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR_KEY]
    principal = request[PRINCIPAL_KEY]
    body = await read_json_object(request, errors.INVALID_JSON)

    input_value = body.get("input")
    if not isinstance(input_value, dict):
        raise invalid_field("input", "expected a JSON object")
    entity_id = body.get("entity_id")
    if entity_id is not None and (not isinstance(entity_id, str) or not entity_id):
        raise invalid_field("entity_id", "expected a non-empty string")

    result = sim.runtime.invoke(
        principal.tenant_id,
        request.match_info["core_id"],
        input_value,
        entity_id=entity_id,
        request_id=request[REQUEST_ID_KEY],
    )
    return json_response({"data": result})


async def list_events(request: web.Request) -> web.Response:
    """Return events oldest first, after the cursor's sequence number.

    ``next_cursor`` points just after the last event returned, so a client that
    keeps polling with it receives every event once, new ones included. It is null on
    an empty page: nothing follows the cursor yet, and the client should poll again
    with the cursor it already has.
    """
    tenant = _tenant(request)
    limit = _limit(request, DEFAULT_EVENTS_LIMIT, MAX_PAGE_LIMIT)
    position = _cursor(request, cursors.EVENTS)
    core_id = _optional_filter(request, "core_id")

    page = tenant.events_after(position, core_id, limit)
    next_cursor = cursors.encode_cursor(cursors.EVENTS, page[-1].seq) if page else None
    # Events are encoded once when recorded; a page only joins their bytes.
    body = b"".join(
        (
            b'{"data":{"events":[',
            b",".join(stored.encoded for stored in page),
            b'],"next_cursor":',
            dumps(next_cursor),
            b"}}",
        )
    )
    return _raw_json(body)


async def list_checkpoints(request: web.Request) -> web.Response:
    """Return checkpoints in creation order; the last page has no ``next_cursor``."""
    tenant = _tenant(request)
    limit = _limit(request, DEFAULT_CHECKPOINTS_LIMIT, MAX_PAGE_LIMIT)
    position = _cursor(request, cursors.CHECKPOINTS)
    core_id = _optional_filter(request, "core_id")
    status = request.query.get("status") or "pending"
    if status not in CHECKPOINT_STATUSES:
        raise invalid_field(
            "status",
            f"expected one of {', '.join(CHECKPOINT_STATUSES)}, got {status!r}",
        )

    page, more = tenant.checkpoints_after(position, core_id, status, limit)
    next_cursor = (
        cursors.encode_cursor(cursors.CHECKPOINTS, page[-1].seq) if more else None
    )
    data = {"checkpoints": [record.body for record in page], "next_cursor": next_cursor}
    return json_response({"data": data})


async def get_checkpoint(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    checkpoint_id = request.match_info["checkpoint_id"]
    record = tenant.checkpoints.get(checkpoint_id)
    if record is None:
        raise SimError(
            404, errors.CHECKPOINT_NOT_FOUND, f"Checkpoint {checkpoint_id!r} not found."
        )
    return json_response({"data": record.body})


async def resolve_checkpoint(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR_KEY]
    principal = request[PRINCIPAL_KEY]
    body = await read_json_object(request, errors.INVALID_JSON)

    resolution = body.get("resolution")
    if not isinstance(resolution, str) or not resolution:
        raise invalid_field("resolution", "expected a non-empty string")
    comment = body.get("comment")
    if comment is not None and not isinstance(comment, str):
        raise invalid_field("comment", "expected a string or null")

    checkpoint = sim.runtime.resolve(
        principal.tenant_id,
        request.match_info["checkpoint_id"],
        resolution,
        comment,
        resolved_by=principal.subject,
    )
    return json_response({"data": checkpoint})


# --- ScaiQueue, ScaiBunker, models -----------------------------------------------


def _offset_page(
    request: web.Request,
    items: list[dict[str, Any]],
    kind: str,
    default_limit: int,
) -> tuple[list[dict[str, Any]], str | None]:
    """Slice a fixed list at an offset cursor; the last page's cursor is None."""
    limit = _limit(request, default_limit, MAX_CATALOG_LIMIT)
    offset = _cursor(request, kind)
    end = offset + limit
    next_cursor = cursors.encode_cursor(kind, end) if end < len(items) else None
    return items[offset:end], next_cursor


async def list_scopes(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    page, next_cursor = _offset_page(
        request, tenant.scopes, cursors.SCOPES, DEFAULT_SCOPES_LIMIT
    )
    return json_response(
        {"data": page, "has_more": next_cursor is not None, "next_cursor": next_cursor}
    )


async def list_queues(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    scope_id = request.match_info["scope_id"]
    queues = tenant.queues.get(scope_id)
    if queues is None:
        raise SimError(404, errors.SCOPE_NOT_FOUND, f"Scope {scope_id!r} not found.")
    return json_response({"data": queues, "has_more": False, "next_cursor": None})


async def list_bunkers(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    return json_response({"status": "ok", "data": tenant.bunkers})


async def list_models(request: web.Request) -> web.Response:
    shape = request.app[SIMULATOR_KEY].options.models_shape
    if shape == "openai":
        return _raw_json(_OPENAI_MODELS_BODY)
    if shape == "items":
        page, next_cursor = _offset_page(
            request,
            list(catalog.NATIVE_MODELS),
            cursors.MODELS,
            DEFAULT_MODELS_ITEMS_LIMIT,
        )
        return json_response({"data": {"items": page, "next_cursor": next_cursor}})
    return _raw_json(_NATIVE_MODELS_BODY)


async def list_openai_models(request: web.Request) -> web.Response:
    return _raw_json(_OPENAI_MODELS_BODY)


def add_scaigrid_routes(app: web.Application) -> None:
    scaicore = "/v1/modules/scaicore"
    app.router.add_get(f"{scaicore}/cores", list_cores)
    app.router.add_get(f"{scaicore}/cores/{{core_id}}", get_core)
    app.router.add_post(f"{scaicore}/cores/{{core_id}}/invoke", invoke_core)
    app.router.add_get(f"{scaicore}/events", list_events)
    app.router.add_get(f"{scaicore}/checkpoints", list_checkpoints)
    app.router.add_get(f"{scaicore}/checkpoints/{{checkpoint_id}}", get_checkpoint)
    app.router.add_post(
        f"{scaicore}/checkpoints/{{checkpoint_id}}/resolve", resolve_checkpoint
    )
    app.router.add_get("/v1/modules/scaiqueue/scopes", list_scopes)
    app.router.add_get("/v1/modules/scaiqueue/scopes/{scope_id}/queues", list_queues)
    app.router.add_get("/v1/modules/scaibunker/bunkers", list_bunkers)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/oai/v1/models", list_openai_models)
