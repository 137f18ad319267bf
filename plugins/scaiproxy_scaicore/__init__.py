"""ScaiCore routes: live events, paused checkpoints and their resolution, invoke.

Events and checkpoints reach the canvas exactly as ScaiGrid sent them: the
gateway checks the page's shape and copies the objects' JSON text unchanged.
Request bodies travel the same way in the other direction, so the ``input`` of
an invocation reaches ScaiGrid as the client wrote it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal

from aiohttp import web
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

from scaiproxy import Call, RawJSON, RouteSpec, hookimpl, jsonutil
from scaiproxy.cache import ResponseCache, through_cache
from scaiproxy.config import parse_block
from scaiproxy.pages import data_object, list_page, shape_error
from scaiproxy.routes import check_path_param

EVENTS_CACHE = web.AppKey("scaicore_events_cache", ResponseCache)
CHECKPOINTS_CACHE = web.AppKey("scaicore_checkpoints_cache", ResponseCache)
VIEW = "scaicore:view"
MANAGE = "scaicore:manage"
UPSTREAM = "/v1/modules/scaicore"
ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
CHECKPOINT_STATUSES = ("pending", "resolved", "failed", "expired", "cancelled")
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_CURSOR_LENGTH = 2048

_DIGITS = re.compile(r"[0-9]{1,10}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ScaiCoreConfig(BaseModel):
    """The ``plugins.scaicore`` block."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    invoke_timeout_s: float = Field(
        120.0, gt=0, description="Total upstream timeout of invoke, in seconds"
    )
    events_cache_ttl_s: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="Seconds an events page is reused for the same credential "
        "and query, or 0 (the default) for none",
    )
    checkpoints_cache_ttl_s: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="Seconds a checkpoints page is reused, or 0 for none",
    )
    cache_max_entries: int = Field(1000, ge=1, le=1_000_000, strict=True)
    resolve_timeout_s: float | None = Field(
        None,
        gt=0,
        description="Total upstream timeout of resolve, in seconds; "
        "unset means upstream.timeout_s",
    )


class _Query(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Body(BaseModel):
    # Strict: a JSON number is never taken for a string, nor a list for an object.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _check_id(value: Any, info: ValidationInfo) -> Any:
    if isinstance(value, str):
        message = check_path_param(info.field_name or "id", value)
        if message:
            raise ValueError(message)
    return value


def _parse_limit(value: Any) -> Any:
    # Only plain ASCII digits: pydantic alone would take " 5", "+5" and "5_0".
    if not isinstance(value, str):
        return value
    if not _DIGITS.fullmatch(value) or not 1 <= int(value) <= MAX_LIMIT:
        raise ValueError(
            f"expected an integer from 1 to {MAX_LIMIT} in decimal digits, "
            f"got {value[:40]!r}"
        )
    return int(value)


def _check_cursor(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if not value or len(value) > MAX_CURSOR_LENGTH:
        raise ValueError(
            f"expected the next_cursor of the previous page, 1 to "
            f"{MAX_CURSOR_LENGTH} characters; got {len(value)} characters "
            "(leave cursor out for the first page)"
        )
    if "\ufffd" in value:
        # What the query parser makes of percent-escapes that are not UTF-8,
        # such as %FF: forwarding it would change the cursor.
        raise ValueError(
            "is not valid UTF-8 once percent-decoded; send the next_cursor of "
            "the previous page unchanged, percent-encoded"
        )
    if _CONTROL.search(value):
        raise ValueError(
            "contains a control character; send the next_cursor of the previous "
            "page unchanged, percent-encoded"
        )
    # NOTE: assumes ScaiGrid's cursors never contain a space (the simulator's are
    # base64), so a space can only be a "+" that the client left unencoded.
    if " " in value:
        raise ValueError(
            "contains a space; percent-encode the cursor so that '+' is sent as "
            "%2B (a bare '+' in a query string is read as a space)"
        )
    return value


class EventsQuery(_Query):
    core_id: str | None = Field(
        None, pattern=ID_PATTERN, description="Only this Core's events"
    )
    limit: int = Field(
        DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="Page size, 1 to 500"
    )
    cursor: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_CURSOR_LENGTH,
        description="The next_cursor of the previous page",
        # Documents what _check_cursor rejects: control characters and spaces.
        json_schema_extra={"pattern": r"^[^\x00-\x20\x7f]+$"},
    )

    _check_core_id = field_validator("core_id", mode="before")(_check_id)
    _check_limit = field_validator("limit", mode="before")(_parse_limit)
    _check_cursor = field_validator("cursor", mode="before")(_check_cursor)


class CheckpointsQuery(EventsQuery):
    core_id: str | None = Field(
        None, pattern=ID_PATTERN, description="Only this Core's checkpoints"
    )
    status: Literal["pending", "resolved", "failed", "expired", "cancelled"] = Field(
        "pending", description="Checkpoint status to list; always sent upstream"
    )


class ResolveBody(_Body):
    resolution: str = Field(
        min_length=1,
        max_length=256,
        description="An option id of the checkpoint, or 'continue' for a breakpoint",
    )
    comment: str | None = Field(
        None, max_length=10_000, description="Free text kept with the resolution"
    )

    @field_validator("resolution")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(
                "must not be blank; send an option id of the checkpoint, or "
                "'continue' for a debug breakpoint"
            )
        return value


class InvokeBody(_Body):
    input: dict[str, Any] = Field(description="The Core's input object")
    entity_id: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="The entity to run as, for entity-mode Cores",
    )


_PAGE_ITEM = {"type": "object", "additionalProperties": True}


def _page_schema(key: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": [key, "next_cursor"],
        "properties": {
            key: {"type": "array", "items": _PAGE_ITEM},
            "next_cursor": {"type": ["string", "null"]},
        },
    }


_INVOKE_SCHEMA = {
    "type": "object",
    "required": ["output"],
    "properties": {
        "output": {},
        "request_id": {"type": ["string", "null"]},
        "duration_ms": {"type": ["number", "null"]},
    },
    "additionalProperties": True,
}


@functools.lru_cache(maxsize=256)
def _query_params(query: EventsQuery) -> Mapping[str, Any]:
    # Defaults (limit=50, status=pending) are sent too, so ScaiGrid's own
    # defaults never decide what the canvas lists. The query models are frozen,
    # so a poll's query is hashable and its parameters are built once.
    return MappingProxyType(query.model_dump(exclude_none=True))


async def _forwarded_body(call: Call) -> bytes:
    """Rebuild the validated body from the raw text of its members.

    The body already passed validation, so every member is known and valid JSON.
    Copying each member's text keeps integers beyond 64 bits, float spellings
    such as ``1.0`` or ``1e400``, escapes and nested key order as the client sent
    them. Members come in the model's field order, and null members are left out.
    """
    text = jsonutil.decode_text(await call.request.read())
    members = jsonutil.object_spans(text)
    parts = []
    for name in type(call.body).model_fields:
        entry = members.get(name)
        if entry is None or entry[0] is None:
            continue
        _, begin, end = entry
        parts.append(jsonutil.dumps(name) + b":" + text[begin:end].encode())
    return b"{" + b",".join(parts) + b"}"


async def _page(call: Call, cache_key: web.AppKey, path: str, key: str) -> RawJSON:
    """Fetch one list page, through the route's cache when it is enabled."""
    params = _query_params(call.query)

    async def fetch() -> RawJSON:
        return list_page(call, await call.upstream.get(path, params), key)

    return await through_cache(
        call, call.request.app.get(cache_key), path, params, fetch
    )


async def list_events(call: Call) -> RawJSON:
    return await _page(call, EVENTS_CACHE, f"{UPSTREAM}/events", "events")


async def list_checkpoints(call: Call) -> RawJSON:
    return await _page(call, CHECKPOINTS_CACHE, f"{UPSTREAM}/checkpoints", "checkpoints")


async def resolve_checkpoint(call: Call) -> RawJSON:
    checkpoint_id = call.params["checkpoint_id"]
    response = await call.upstream.request(
        "POST",
        f"{UPSTREAM}/checkpoints/{checkpoint_id}/resolve",
        body=await _forwarded_body(call),
    )
    return data_object(call, response, "a resolved checkpoint")


async def invoke_core(call: Call) -> RawJSON:
    core_id = call.params["core_id"]
    response = await call.upstream.request(
        "POST",
        f"{UPSTREAM}/cores/{core_id}/invoke",
        body=await _forwarded_body(call),
    )
    result = data_object(call, response, "an invoke response")
    _check_invoke_response(call, result)
    return result


def _check_invoke_response(call: Call, result: RawJSON) -> None:
    subject = "an invoke response"
    members = jsonutil.object_spans(result.encoded.decode("utf-8"))
    if "output" not in members:
        raise shape_error(call, subject, "no 'output' member")
    request_id = members.get("request_id", (None,))[0]
    if request_id is not None and not isinstance(request_id, str):
        raise shape_error(call, subject, "'request_id' is not a string or null")
    duration = members.get("duration_ms", (None,))[0]
    if duration is not None and (
        isinstance(duration, bool) or not isinstance(duration, int | float)
    ):
        raise shape_error(call, subject, "'duration_ms' is not a number or null")


@hookimpl
def scaiproxy_configure(block: dict[str, Any], settings: Any) -> ScaiCoreConfig:
    return parse_block(ScaiCoreConfig, block)


@hookimpl
async def scaiproxy_startup(app: web.Application, config: ScaiCoreConfig) -> None:
    app[EVENTS_CACHE] = ResponseCache(config.events_cache_ttl_s, config.cache_max_entries)
    app[CHECKPOINTS_CACHE] = ResponseCache(
        config.checkpoints_cache_ttl_s, config.cache_max_entries
    )


@hookimpl
def scaiproxy_routes(config: ScaiCoreConfig, settings: Any) -> list[RouteSpec]:
    tags = ("scaicore",)
    return [
        RouteSpec(
            method="GET",
            path="/v1/scaicore/events",
            handler=list_events,
            name="scaicore.events",
            permission=VIEW,
            coalesce=True,
            query=EventsQuery,
            response=_page_schema("events"),
            summary="One page of ScaiCore runtime and flow events",
            tags=tags,
        ),
        RouteSpec(
            method="GET",
            path="/v1/scaicore/checkpoints",
            handler=list_checkpoints,
            name="scaicore.checkpoints",
            permission=VIEW,
            coalesce=True,
            query=CheckpointsQuery,
            response=_page_schema("checkpoints"),
            summary="One page of checkpoints (paused executions)",
            tags=tags,
        ),
        RouteSpec(
            method="POST",
            path="/v1/scaicore/checkpoints/{checkpoint_id}/resolve",
            handler=resolve_checkpoint,
            name="scaicore.resolve",
            permission=MANAGE,
            body=ResolveBody,
            timeout_s=config.resolve_timeout_s,
            response={"type": "object", "additionalProperties": True},
            summary="Resolve a paused checkpoint, resuming its execution",
            tags=tags,
        ),
        RouteSpec(
            method="POST",
            path="/v1/scaicore/cores/{core_id}/invoke",
            handler=invoke_core,
            name="scaicore.invoke",
            permission=MANAGE,
            body=InvokeBody,
            timeout_s=config.invoke_timeout_s,
            response=_INVOKE_SCHEMA,
            summary="Invoke a deployed Core",
            tags=tags,
        ),
    ]
