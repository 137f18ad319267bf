"""Lookups: the catalogues behind the canvas's pickers, each returned whole.

ScaiQueue scopes and queues, active ScaiBunker bunkers and the model catalogue.
Every route follows ``next_cursor`` pages up to ``plugins.lookups.max_pages`` and
keeps the finished list for ``cache_ttl_s`` seconds, per upstream URL and per
credential, so a tenant or user is only ever served lists fetched with its own
credential.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from scaiproxy import Call, RawJSON, RouteSpec, hookimpl, jsonutil
from scaiproxy.config import parse_block
from scaiproxy.app import SETTINGS
from scaiproxy.pages import data_list, shape_error
from scaiproxy.upstream import bad_gateway
from scaiproxy.cache import ResponseCache, through_cache

log = structlog.get_logger("scaiproxy.lookups")

VIEW = "scaicore:view"
SCAIQUEUE = "/v1/modules/scaiqueue"
BUNKERS_PATH = "/v1/modules/scaibunker/bunkers"

ACTIVE_STATUSES = frozenset({"running", "ready"})
TERMINAL_STATUSES = frozenset({"destroyed", "failed", "terminated"})
DEFAULT_MODALITY = "chat"

CACHE = web.AppKey("lookups_cache", ResponseCache)

_PATH_CHARACTERS = re.compile(r"[A-Za-z0-9/_.~:-]+")


class LookupsConfig(BaseModel):
    """The ``plugins.lookups`` block."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models_path: str = Field(
        "/v1/models",
        description="Upstream path of the model list, relative to the base URL",
    )
    max_pages: int = Field(
        20, ge=1, le=1000, description="Pages followed per request, 1 to 1000"
    )
    cache_ttl_s: float = Field(
        30.0,
        ge=0,
        allow_inf_nan=False,
        description="Seconds a finished list is reused, or 0 to disable the cache",
    )
    cache_max_entries: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="Maximum lists kept, dropping the oldest entry first",
    )

    @field_validator("models_path")
    @classmethod
    def _check_models_path(cls, value: str) -> str:
        problem = _path_problem(value)
        if problem:
            raise ValueError(
                f"invalid path {value[:200]!r}: {problem}; use an absolute path "
                "such as /v1/models or /oai/v1/models"
            )
        return value


def _path_problem(value: str) -> str | None:
    if not value.startswith("/") or value.startswith("//"):
        return "it must start with a single '/'"
    if "?" in value or "#" in value:
        return "it must not contain a query or fragment"
    if not _PATH_CHARACTERS.fullmatch(value):
        return "it may contain only A-Z a-z 0-9 / _ . ~ : -"
    if any(segment in (".", "..") for segment in value.split("/")):
        return "it must not contain '.' or '..' segments"
    return None


# Fetching every page


async def _pages(
    call: Call, path: str, what: str
) -> AsyncIterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Yield each page's decoded body and its items, following ``next_cursor``."""
    max_pages = call.config.max_pages
    # One page is at most upstream.max_response_bytes, and so is the whole list:
    # 20 pages of 16 MiB, decoded, would take gigabytes.
    max_bytes = call.request.app[SETTINGS].upstream.max_response_bytes
    received = 0
    sent: set[str] = set()
    cursor: str | None = None
    for number in range(1, max_pages + 1):
        params = {"cursor": cursor} if cursor is not None else None
        response = await call.upstream.get(path, params)
        received += len(response.body)
        if received > max_bytes:
            raise bad_gateway(
                f"ScaiGrid's list is larger than upstream.max_response_bytes "
                f"({max_bytes} bytes) over its first {number} pages."
            )
        items, next_cursor = data_list(call, response, what)
        if not all(isinstance(item, dict) for item in items):
            raise shape_error(call, what, "an entry of 'data' is not an object")
        yield response.json(), items

        if not next_cursor:
            return
        if next_cursor in sent:
            # Following a cursor already sent would loop until the page cap.
            log.warning(
                "lookup_cursor_repeated",
                route=call.route.name,
                page=number,
                message="ScaiGrid returned a cursor it had returned before; "
                "the list ends here",
            )
            return
        sent.add(next_cursor)
        cursor = next_cursor

    log.warning(
        "lookup_page_cap_reached",
        route=call.route.name,
        max_pages=max_pages,
        message="the list is cut short; raise plugins.lookups.max_pages to get "
        "all of it",
    )


async def _all_items(call: Call, path: str, what: str) -> list[dict[str, Any]]:
    return [item async for _, items in _pages(call, path, what) for item in items]


async def _cached(call: Call, path: str, build: Any) -> RawJSON:
    """Return the list that ``build(call, path)`` makes, from the cache if fresh.

    The key uses the first page's upstream URL (see ``through_cache``).
    """

    async def encoded_list() -> RawJSON:
        return RawJSON(jsonutil.dumps(await build(call, path)))

    return await through_cache(
        call, call.request.app.get(CACHE), path, None, encoded_list
    )


# Scopes, queues and bunkers


async def _scope_list(call: Call, path: str) -> list[dict[str, Any]]:
    return await _all_items(call, path, "a scope list")


async def _queue_list(call: Call, path: str) -> list[dict[str, Any]]:
    return await _all_items(call, path, "a queue list")


def is_active_bunker(bunker: dict[str, Any]) -> bool:
    """Tell whether a bunker is running or ready, or persistent and not ended.

    ``status`` and ``lifecycle`` must each be a string, null or absent, as
    :func:`_bunker_problem` checks.
    """
    status = bunker.get("status")
    if status in ACTIVE_STATUSES:
        return True
    return bunker.get("lifecycle") == "persistent" and status not in TERMINAL_STATUSES


def _bunker_problem(bunker: dict[str, Any], number: int) -> str | None:
    """Describe why bunker ``number`` (from 1) cannot be filtered, or return None."""
    for key in ("status", "lifecycle"):
        value = bunker.get(key)
        if value is not None and not isinstance(value, str):
            return f"'{key}' of bunker {number} is {_json_type(value)}, not a string"
    return None


def _json_type(value: Any) -> str:
    """Name the JSON type of a decoded value, with its article."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string" if isinstance(value, str) else "null"


async def _bunker_list(call: Call, path: str) -> list[dict[str, Any]]:
    what = "a bunker list"
    bunkers = await _all_items(call, path, what)
    for number, bunker in enumerate(bunkers, start=1):
        problem = _bunker_problem(bunker, number)
        if problem is not None:
            # A list or an object in "status" would otherwise crash the filter.
            raise shape_error(call, what, problem)
    return [bunker for bunker in bunkers if is_active_bunker(bunker)]


async def list_scopes(call: Call) -> RawJSON:
    return await _cached(call, f"{SCAIQUEUE}/scopes", _scope_list)


async def list_queues(call: Call) -> RawJSON:
    scope_id = call.params["scope_id"]  # checked against the path id pattern
    return await _cached(call, f"{SCAIQUEUE}/scopes/{scope_id}/queues", _queue_list)


async def list_bunkers(call: Call) -> RawJSON:
    return await _cached(call, BUNKERS_PATH, _bunker_list)


# Models


def _is_openai_list(document: dict[str, Any]) -> bool:
    return document.get("object") == "list"


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def normalise_model(item: dict[str, Any], slug_key: str) -> dict[str, Any] | None:
    """Build ``{slug, display_name, modality, context_window, max_output_tokens?}``.

    Returns ``None`` when ``item[slug_key]`` is missing, not a string or empty.
    """
    slug = _text(item.get(slug_key))
    if slug is None:
        return None
    model: dict[str, Any] = {
        "slug": slug,
        "display_name": _text(item.get("display_name")) or slug,
        "modality": _text(item.get("modality")) or DEFAULT_MODALITY,
        "context_window": _count(item.get("context_window")),
    }
    max_output_tokens = _count(item.get("max_output_tokens"))
    if max_output_tokens is not None:
        model["max_output_tokens"] = max_output_tokens
    return model


async def _model_list(call: Call, path: str) -> list[dict[str, Any]]:
    models: list[dict[str, Any]] = []
    dropped = 0
    async for document, items in _pages(call, path, "a model list"):
        # OpenAI-compatible lists name a model by "id"; ScaiGrid's own by "slug".
        slug_key = "id" if _is_openai_list(document) else "slug"
        for item in items:
            model = normalise_model(item, slug_key)
            if model is None:
                dropped += 1
            else:
                models.append(model)
    if dropped:
        log.warning(
            "lookup_models_dropped",
            route=call.route.name,
            dropped=dropped,
            message="model entries without a usable slug were left out",
        )
    return models


async def list_models(call: Call) -> RawJSON:
    return await _cached(call, call.config.models_path, _model_list)


# Response schemas of the ``data`` member


def _list_of(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "type": "array",
        "items": {
            "type": "object",
            "properties": properties,
            "additionalProperties": True,
            **extra,
        },
    }


_STRING = {"type": "string"}
_OPTIONAL_STRING = {"type": ["string", "null"]}

SCOPES_SCHEMA = _list_of(
    {
        "id": _STRING,
        "slug": _STRING,
        "display_name": _STRING,
        "description": _OPTIONAL_STRING,
    }
)
QUEUES_SCHEMA = _list_of(
    {
        "id": _STRING,
        "scope_id": _STRING,
        "slug": _STRING,
        "display_name": _STRING,
        "consumer_mode": _STRING,
        "max_retries": {"type": "integer"},
    }
)
BUNKERS_SCHEMA = _list_of(
    {
        "bunker_id": _STRING,
        "image_ref": _STRING,
        "lifecycle": _STRING,
        "status": _STRING,
    }
)
MODELS_SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["slug", "display_name", "modality", "context_window"],
        "properties": {
            "slug": {"type": "string", "minLength": 1},
            "display_name": {"type": "string", "minLength": 1},
            "modality": {"type": "string", "minLength": 1},
            "context_window": {"type": ["integer", "null"], "minimum": 0},
            "max_output_tokens": {"type": "integer", "minimum": 0},
        },
        "additionalProperties": False,
    },
}


# Hooks


@hookimpl
def scaiproxy_configure(block: dict[str, Any], settings: Any) -> LookupsConfig:
    return parse_block(LookupsConfig, block)


@hookimpl
def scaiproxy_routes(config: LookupsConfig, settings: Any) -> list[RouteSpec]:
    tags = ("lookups",)
    return [
        RouteSpec(
            method="GET",
            path="/v1/scaiqueue/scopes",
            handler=list_scopes,
            name="lookups.scopes",
            permission=VIEW,
            coalesce=True,
            response=SCOPES_SCHEMA,
            summary="Every ScaiQueue scope of the tenant",
            tags=tags,
        ),
        RouteSpec(
            method="GET",
            path="/v1/scaiqueue/scopes/{scope_id}/queues",
            handler=list_queues,
            name="lookups.queues",
            permission=VIEW,
            coalesce=True,
            response=QUEUES_SCHEMA,
            summary="Every queue of one ScaiQueue scope",
            tags=tags,
        ),
        RouteSpec(
            method="GET",
            path="/v1/scaibunker/bunkers",
            handler=list_bunkers,
            name="lookups.bunkers",
            permission=VIEW,
            coalesce=True,
            response=BUNKERS_SCHEMA,
            summary="The tenant's active ScaiBunker bunkers",
            description="Bunkers that are running or ready, and persistent bunkers "
            "whose status is not destroyed, failed or terminated.",
            tags=tags,
        ),
        RouteSpec(
            method="GET",
            path="/v1/scaigrid/models",
            handler=list_models,
            name="lookups.models",
            permission=VIEW,
            coalesce=True,
            response=MODELS_SCHEMA,
            summary="The models ScaiGrid offers, in one normalised shape",
            tags=tags,
        ),
    ]


@hookimpl
async def scaiproxy_startup(app: web.Application, config: LookupsConfig) -> None:
    app[CACHE] = ResponseCache(config.cache_ttl_s, config.cache_max_entries)


@hookimpl
async def scaiproxy_shutdown(app: web.Application, config: LookupsConfig) -> None:
    cache = app.get(CACHE)
    if cache is not None:
        cache.clear()
