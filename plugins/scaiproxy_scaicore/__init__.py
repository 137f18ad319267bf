"""ScaiCore routes: live events, paused checkpoints and their resolution, invoke.

Events and checkpoints reach the canvas exactly as ScaiGrid sent them; the
gateway checks the page's shape and copies the objects' JSON text unchanged.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from scaiproxy import Call, ConfigError, RawJSON, RouteSpec, hookimpl
from scaiproxy.config import format_errors
from scaiproxy.pages import data_object, list_page

VIEW = "scaicore:view"
MANAGE = "scaicore:manage"
UPSTREAM = "/v1/modules/scaicore"
ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
CHECKPOINT_STATUSES = ("pending", "resolved", "failed", "expired", "cancelled")


class ScaiCoreConfig(BaseModel):
    """The ``plugins.scaicore`` block."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    invoke_timeout_s: float = Field(120.0, gt=0)
    resolve_timeout_s: float | None = Field(None, gt=0)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _no_dot_segments(value: str | None) -> str | None:
    if value in (".", ".."):
        raise ValueError("'.' and '..' are not valid ids")
    return value


class EventsQuery(_Strict):
    core_id: str | None = Field(None, pattern=ID_PATTERN, description="Only this Core's events")
    limit: int = Field(50, ge=1, le=500, description="Page size, 1 to 500")
    cursor: str | None = Field(
        None, min_length=1, max_length=2048, description="Opaque cursor of the next page"
    )

    _check_core_id = field_validator("core_id")(_no_dot_segments)


class CheckpointsQuery(EventsQuery):
    status: Literal["pending", "resolved", "failed", "expired", "cancelled"] = Field(
        "pending", description="Checkpoint status to list"
    )


class ResolveBody(_Strict):
    resolution: str = Field(
        min_length=1,
        max_length=256,
        description="An option id of the checkpoint, or 'continue' for a breakpoint",
    )
    comment: str | None = Field(None, max_length=10_000)

    @field_validator("resolution")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value


class InvokeBody(_Strict):
    input: dict[str, Any] = Field(description="The Core's input object")
    entity_id: str | None = Field(None, min_length=1, max_length=256)


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
    "properties": {
        "output": {},
        "request_id": {"type": ["string", "null"]},
        "duration_ms": {"type": ["number", "null"]},
    },
    "additionalProperties": True,
}


def _query_params(query: EventsQuery) -> dict[str, Any]:
    return query.model_dump(exclude_none=True)


async def list_events(call: Call) -> RawJSON:
    response = await call.upstream.get(f"{UPSTREAM}/events", _query_params(call.query))
    return list_page(call, response, "events")


async def list_checkpoints(call: Call) -> RawJSON:
    response = await call.upstream.get(
        f"{UPSTREAM}/checkpoints", _query_params(call.query)
    )
    return list_page(call, response, "checkpoints")


async def resolve_checkpoint(call: Call) -> RawJSON:
    checkpoint_id = call.params["checkpoint_id"]
    response = await call.upstream.post(
        f"{UPSTREAM}/checkpoints/{checkpoint_id}/resolve",
        call.body.model_dump(exclude_none=True),
    )
    return data_object(call, response, "a resolved checkpoint")


async def invoke_core(call: Call) -> RawJSON:
    core_id = call.params["core_id"]
    response = await call.upstream.post(
        f"{UPSTREAM}/cores/{core_id}/invoke", call.body.model_dump(exclude_none=True)
    )
    return data_object(call, response, "an invoke response")


@hookimpl
def scaiproxy_configure(block: dict[str, Any], settings: Any) -> ScaiCoreConfig:
    try:
        return ScaiCoreConfig.model_validate(block)
    except ValidationError as exc:
        key, message = format_errors(exc)[0]
        raise ConfigError(key, message) from None


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
