"""The lookups plugin through the whole app, against the recording upstream."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pytest
from aiohttp import web
from conftest import base_config, bearer, mint

from scaiproxy.app import create_app
from scaiproxy.config import LoggingConfig, settings_from_mapping
from scaiproxy.credentials import Credential
from scaiproxy.errors import ConfigError
from scaiproxy.logs import configure_logging
from scaiproxy_lookups import is_active_bunker, normalise_model
from scaiproxy.cache import ResponseCache

SCOPES = "/v1/modules/scaiqueue/scopes"
BUNKERS = "/v1/modules/scaibunker/bunkers"
MODELS = "/v1/models"

SCOPE = {
    "id": "scope_1",
    "slug": "support",
    "display_name": "Support",
    "description": "Inbound tickets",
}
QUEUE = {
    "id": "queue_1",
    "scope_id": "scope_1",
    "slug": "support-inbound",
    "display_name": "Support – inbound",
    "consumer_mode": "competing",
    "max_retries": 3,
}


def lookups_config(upstream, jwks_server, **block: Any) -> dict[str, Any]:
    plugins: dict[str, Any] = {"enabled": ["scaicore", "lookups"]}
    if block:
        plugins["lookups"] = block
    return base_config(upstream.base_url, jwks_server.url, plugins=plugins)


@pytest.fixture
async def gateway(make_gateway, upstream, jwks_server):
    """The gateway with the ScaiCore and lookups plugins; the cache is off."""
    return await make_gateway(lookups_config(upstream, jwks_server, cache_ttl_s=0))


@pytest.fixture
def token(rsa_key) -> str:
    return mint(rsa_key, permissions=["scaicore:view"])


@pytest.fixture
def log_warnings():
    """Send the gateway's JSON log lines to a buffer and return a WARNING reader.

    ``configure_logging`` is the set-up the CLI uses. Loggers cached by an earlier
    call write through the stdlib root logger too, so they reach the buffer.
    """
    buffer = io.StringIO()
    root = logging.getLogger()
    level = root.level
    configure_logging(LoggingConfig(level="info", format="json"), stream=buffer)

    def read(event: str) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
        return [
            line
            for line in lines
            if line.get("level") == "warning" and line.get("event") == event
        ]

    yield read
    for handler in list(root.handlers):
        if getattr(handler, "_scaiproxy", False):
            root.removeHandler(handler)
    root.setLevel(level)


def paged(pages: dict[str | None, dict[str, Any]]):
    """Build an upstream handler that returns the page of each ``cursor`` value."""

    async def handler(request: web.Request) -> web.Response:
        page = pages.get(request.query.get("cursor"))
        if page is None:
            return web.json_response({"error": {"code": "bad_cursor"}}, status=400)
        return web.json_response(page)

    return handler


async def data_of(response) -> Any:
    assert response.status == 200, await response.text()
    return (await response.json())["data"]


# Scopes and queues


async def test_scopes_upstream_request(gateway, upstream, token):
    upstream.route("GET", SCOPES, json_body={"data": [SCOPE]})
    headers = {**bearer(token), "X-Request-ID": "req-scopes-1"}

    response = await gateway.get("/api/v1/scaiqueue/scopes", headers=headers)

    assert await data_of(response) == [SCOPE]
    assert len(upstream.requests) == 1
    assert upstream.last.method == "GET"
    assert upstream.last.path == SCOPES
    assert upstream.last.raw_query == ""
    assert upstream.last.headers["Authorization"] == f"Bearer {token}"
    assert upstream.last.headers["X-Request-ID"] == "req-scopes-1"
    assert response.headers["X-Request-ID"] == "req-scopes-1"


async def test_scopes_extras_pass_through(gateway, upstream, token):
    scope = {
        "display_name": "Recherche & Entwicklung, 実験",
        "id": "scope_2",
        "queue_count": 123456789012345678901234567890,
        "labels": {"team": None, "tags": ["a", {"b": [None]}]},
        "slug": "research",
        "description": None,
    }
    upstream.route("GET", SCOPES, json_body={"status": "ok", "data": [scope]})

    response = await gateway.get("/api/v1/scaiqueue/scopes", headers=bearer(token))
    text = await response.text()

    assert response.status == 200
    assert json.loads(text)["data"] == [scope]
    assert "123456789012345678901234567890" in text
    # Key order is kept as ScaiGrid sent it.
    assert list(json.loads(text)["data"][0]) == list(scope)


async def test_queues_upstream_request(gateway, upstream, token):
    queue = {**QUEUE, "dead_letter": True}
    upstream.route("GET", f"{SCOPES}/scope_1/queues", json_body={"data": [queue]})
    headers = {**bearer(token), "X-Request-ID": "req-queues-1"}

    response = await gateway.get(
        "/api/v1/scaiqueue/scopes/scope_1/queues", headers=headers
    )

    assert await data_of(response) == [queue]
    assert upstream.last.path == f"{SCOPES}/scope_1/queues"
    assert upstream.last.raw_query == ""
    assert upstream.last.headers["Authorization"] == f"Bearer {token}"
    assert upstream.last.headers["X-Request-ID"] == "req-queues-1"


async def test_queues_invalid_scope_id(gateway, upstream, token):
    response = await gateway.get(
        "/api/v1/scaiqueue/scopes/bad%20id%21/queues", headers=bearer(token)
    )
    body = await response.json()

    assert response.status == 422
    assert body["detail"]["error"] == "validation_error"
    assert body["detail"]["errors"][0]["field"] == "scope_id"
    assert upstream.requests == []


async def test_lookups_need_view_permission(gateway, upstream, rsa_key):
    token = mint(rsa_key, permissions=[])

    response = await gateway.get("/api/v1/scaiqueue/scopes", headers=bearer(token))
    body = await response.json()

    assert response.status == 403
    assert body["detail"]["error"] == "insufficient_scope"
    assert upstream.requests == []


async def test_lookups_unknown_query_parameter(gateway, upstream, token):
    response = await gateway.get(
        "/api/v1/scaibunker/bunkers", params={"cursor": "x"}, headers=bearer(token)
    )

    assert response.status == 422
    assert upstream.requests == []


async def test_scopes_empty_list(gateway, upstream, token):
    upstream.route(
        "GET", SCOPES, json_body={"data": [], "has_more": False, "next_cursor": None}
    )

    response = await gateway.get("/api/v1/scaiqueue/scopes", headers=bearer(token))

    assert await data_of(response) == []
    assert len(upstream.requests) == 1


# Bunkers

STATUSES = (
    "running",
    "ready",
    "starting",
    "stopped",
    "destroyed",
    "failed",
    "terminated",
)
KEPT = {
    ("ephemeral", "running"),
    ("ephemeral", "ready"),
    ("persistent", "running"),
    ("persistent", "ready"),
    ("persistent", "starting"),
    ("persistent", "stopped"),
    ("persistent", None),
}


def bunker(lifecycle: str, status: str | None) -> dict[str, Any]:
    entry = {
        "bunker_id": f"bnk_{lifecycle}_{status}",
        "image_ref": "registry.test/python:3.12",
        "lifecycle": lifecycle,
        "resources": {"cpu": 2, "memory_mb": 2048},
    }
    if status is not None:
        entry["status"] = status
    return entry


async def test_bunkers_keep_active_only(gateway, upstream, token):
    bunkers = [
        bunker(lifecycle, status)
        for lifecycle in ("ephemeral", "persistent")
        for status in (*STATUSES, None)
    ]
    upstream.route("GET", BUNKERS, json_body={"status": "ok", "data": bunkers})

    response = await gateway.get("/api/v1/scaibunker/bunkers", headers=bearer(token))
    data = await data_of(response)

    kept = {(entry["lifecycle"], entry.get("status")) for entry in data}
    assert kept == KEPT
    assert len(data) == len(KEPT)
    assert upstream.last.path == BUNKERS
    assert upstream.last.headers["Authorization"] == f"Bearer {token}"


async def test_bunkers_extras_pass_through(gateway, upstream, token):
    entry = {**bunker("ephemeral", "running"), "name": "Übung", "ports": [8080]}
    upstream.route("GET", BUNKERS, json_body={"data": [entry]})

    response = await gateway.get("/api/v1/scaibunker/bunkers", headers=bearer(token))

    assert await data_of(response) == [entry]


@pytest.mark.parametrize(
    ("entry", "active"),
    [
        ({"status": "running", "lifecycle": "ephemeral"}, True),
        ({"status": "ready"}, True),
        ({"status": "stopped", "lifecycle": "persistent"}, True),
        ({"status": "failed", "lifecycle": "persistent"}, False),
        ({"status": "stopped", "lifecycle": "ephemeral"}, False),
        ({"lifecycle": "ephemeral"}, False),
        ({}, False),
    ],
)
def test_active_bunker_rule(entry, active):
    assert is_active_bunker(entry) is active


# Models

GPT_4O = {
    "slug": "openai/gpt-4o",
    "display_name": "GPT-4o",
    "modality": "chat",
    "context_window": 128000,
    "max_output_tokens": 16384,
}


async def test_models_native_list(gateway, upstream, token):
    embedding = {
        "slug": "openai/text-embedding-3-small",
        "display_name": "Text Embedding 3 Small",
        "modality": "embedding",
        "context_window": 8191,
        "pricing": {"input": 0.02},
    }
    upstream.route("GET", MODELS, json_body={"data": [GPT_4O, embedding]})
    headers = {**bearer(token), "X-Request-ID": "req-models-1"}

    response = await gateway.get("/api/v1/scaigrid/models", headers=headers)

    assert await data_of(response) == [
        GPT_4O,
        {
            "slug": "openai/text-embedding-3-small",
            "display_name": "Text Embedding 3 Small",
            "modality": "embedding",
            "context_window": 8191,
        },
    ]
    assert upstream.last.path == MODELS
    assert upstream.last.raw_query == ""
    assert upstream.last.headers["Authorization"] == f"Bearer {token}"
    assert upstream.last.headers["X-Request-ID"] == "req-models-1"


async def test_models_native_items(gateway, upstream, token):
    llama = {"slug": "meta/llama-3.1-70b", "context_window": 131072}
    upstream.route(
        "GET",
        MODELS,
        json_body={"data": {"items": [GPT_4O, llama], "next_cursor": None}},
    )

    response = await gateway.get("/api/v1/scaigrid/models", headers=bearer(token))

    assert await data_of(response) == [
        GPT_4O,
        {
            "slug": "meta/llama-3.1-70b",
            "display_name": "meta/llama-3.1-70b",
            "modality": "chat",
            "context_window": 131072,
        },
    ]


async def test_models_openai_list(gateway, upstream, token):
    upstream.route(
        "GET",
        MODELS,
        json_body={
            "object": "list",
            "data": [
                {
                    "id": "openai/gpt-4o",
                    "object": "model",
                    "created": 1715558400,
                    "owned_by": "openai",
                    "display_name": "GPT-4o",
                    "context_window": 128000,
                    "max_output_tokens": 16384,
                },
                {"id": "mistral/mistral-large", "object": "model", "owned_by": "x"},
            ],
        },
    )

    response = await gateway.get("/api/v1/scaigrid/models", headers=bearer(token))

    assert await data_of(response) == [
        GPT_4O,
        {
            "slug": "mistral/mistral-large",
            "display_name": "mistral/mistral-large",
            "modality": "chat",
            "context_window": None,
        },
    ]


async def test_models_drop_unusable_slugs(gateway, upstream, token, log_warnings):
    entries = [
        GPT_4O,
        {"display_name": "No slug"},
        {"slug": "", "display_name": "Empty slug"},
        {"slug": 42, "display_name": "Number slug"},
        {"slug": None},
    ]
    upstream.route("GET", MODELS, json_body={"data": entries})

    response = await gateway.get("/api/v1/scaigrid/models", headers=bearer(token))

    assert await data_of(response) == [GPT_4O]
    events = log_warnings("lookup_models_dropped")
    assert len(events) == 1
    assert events[0]["dropped"] == 4
    assert events[0]["route"] == "lookups.models"
    assert "No slug" not in json.dumps(events[0])
    assert token not in json.dumps(events[0])


async def test_models_kept_without_warning(gateway, upstream, token, log_warnings):
    upstream.route("GET", MODELS, json_body={"data": [GPT_4O]})

    response = await gateway.get("/api/v1/scaigrid/models", headers=bearer(token))

    assert response.status == 200
    assert log_warnings("lookup_models_dropped") == []


async def test_models_openai_entry_without_id(gateway, upstream, token, log_warnings):
    upstream.route(
        "GET",
        MODELS,
        json_body={
            "object": "list",
            "data": [{"object": "model", "slug": "x/y"}, {"id": "a/b"}],
        },
    )

    response = await gateway.get("/api/v1/scaigrid/models", headers=bearer(token))

    assert [model["slug"] for model in await data_of(response)] == ["a/b"]
    assert log_warnings("lookup_models_dropped")[0]["dropped"] == 1


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ({"slug": "a", "context_window": "128000"}, None),
        ({"slug": "a", "context_window": True}, None),
        ({"slug": "a", "context_window": -1}, None),
        ({"slug": "a", "context_window": 4096}, 4096),
    ],
)
def test_model_context_window_values(item, expected):
    assert normalise_model(item, "slug")["context_window"] == expected


def test_model_max_output_tokens_null_left_out():
    model = normalise_model({"slug": "a", "max_output_tokens": None}, "slug")

    assert "max_output_tokens" not in model


def test_model_blank_names_fall_back():
    model = normalise_model({"slug": "a/b", "display_name": "", "modality": 3}, "slug")

    assert model["display_name"] == "a/b"
    assert model["modality"] == "chat"


async def test_models_configured_path(make_gateway, upstream, jwks_server, token):
    config = lookups_config(upstream, jwks_server, models_path="/oai/v1/models")
    client = await make_gateway(config)
    upstream.route(
        "GET", "/oai/v1/models", json_body={"object": "list", "data": [{"id": "m"}]}
    )

    response = await client.get("/api/v1/scaigrid/models", headers=bearer(token))

    assert [model["slug"] for model in await data_of(response)] == ["m"]
    assert upstream.last.path == "/oai/v1/models"


# Pagination


async def test_scopes_three_pages(gateway, upstream, token):
    scopes = [{**SCOPE, "id": f"scope_{n}"} for n in range(5)]
    upstream.route(
        "GET",
        SCOPES,
        paged(
            {
                None: {"data": scopes[:2], "has_more": True, "next_cursor": "page-2"},
                "page-2": {
                    "data": scopes[2:4],
                    "has_more": True,
                    "next_cursor": "a+b/c==",
                },
                "a+b/c==": {"data": scopes[4:], "has_more": False, "next_cursor": None},
            }
        ),
    )

    response = await gateway.get("/api/v1/scaiqueue/scopes", headers=bearer(token))

    assert await data_of(response) == scopes
    assert [request.query for request in upstream.requests] == [
        {},
        {"cursor": ["page-2"]},
        {"cursor": ["a+b/c=="]},
    ]
    assert upstream.requests[2].raw_query == "cursor=a%2Bb/c%3D%3D"


async def test_models_items_pages(gateway, upstream, token):
    second = {"slug": "b/second"}
    upstream.route(
        "GET",
        MODELS,
        paged(
            {
                None: {"data": {"items": [GPT_4O], "next_cursor": "c2"}},
                "c2": {"data": {"items": [second], "next_cursor": None}},
            }
        ),
    )

    response = await gateway.get("/api/v1/scaigrid/models", headers=bearer(token))

    assert [model["slug"] for model in await data_of(response)] == [
        "openai/gpt-4o",
        "b/second",
    ]
    assert [request.query for request in upstream.requests] == [{}, {"cursor": ["c2"]}]


async def test_has_more_false_stops(gateway, upstream, token):
    upstream.route(
        "GET",
        BUNKERS,
        json_body={
            "data": [bunker("ephemeral", "running")],
            "has_more": False,
            "next_cursor": "ignored",
        },
    )

    response = await gateway.get("/api/v1/scaibunker/bunkers", headers=bearer(token))

    assert len(await data_of(response)) == 1
    assert len(upstream.requests) == 1


async def test_page_cap_cuts_list(
    make_gateway, upstream, jwks_server, token, log_warnings
):
    client = await make_gateway(
        lookups_config(upstream, jwks_server, max_pages=3, cache_ttl_s=0)
    )

    async def endless(request: web.Request) -> web.Response:
        number = int(request.query.get("cursor", "0"))
        page = {"data": [{**SCOPE, "id": f"scope_{number}"}]}
        return web.json_response({**page, "next_cursor": str(number + 1)})

    upstream.route("GET", SCOPES, endless)

    response = await client.get("/api/v1/scaiqueue/scopes", headers=bearer(token))

    data = await data_of(response)
    assert [scope["id"] for scope in data] == ["scope_0", "scope_1", "scope_2"]
    assert len(upstream.requests) == 3
    events = log_warnings("lookup_page_cap_reached")
    assert len(events) == 1
    assert events[0]["max_pages"] == 3
    assert events[0]["route"] == "lookups.scopes"


async def test_no_cap_warning_on_last_page(
    make_gateway, upstream, jwks_server, token, log_warnings
):
    client = await make_gateway(lookups_config(upstream, jwks_server, max_pages=2))
    upstream.route(
        "GET",
        SCOPES,
        paged(
            {
                None: {"data": [SCOPE], "next_cursor": "c2"},
                "c2": {"data": [SCOPE], "next_cursor": None},
            }
        ),
    )

    response = await client.get("/api/v1/scaiqueue/scopes", headers=bearer(token))

    assert len(await data_of(response)) == 2
    assert log_warnings("lookup_page_cap_reached") == []


async def test_cursor_loop_stops(gateway, upstream, token, log_warnings):
    upstream.route(
        "GET",
        SCOPES,
        paged(
            {
                None: {"data": [SCOPE], "next_cursor": "c2"},
                "c2": {"data": [QUEUE], "next_cursor": "c3"},
                "c3": {"data": [SCOPE], "next_cursor": "c2"},
            }
        ),
    )

    response = await gateway.get("/api/v1/scaiqueue/scopes", headers=bearer(token))

    assert await data_of(response) == [SCOPE, QUEUE, SCOPE]
    assert len(upstream.requests) == 3
    events = log_warnings("lookup_cursor_repeated")
    assert len(events) == 1
    assert events[0]["page"] == 3
    # The cursor is opaque upstream data: no field of the event carries it.
    assert "c2" not in [str(value) for value in events[0].values()]
    assert "cursor" not in events[0]


# Upstream errors


async def test_upstream_404_is_upstream_error(gateway, upstream, token):
    upstream.route(
        "GET",
        f"{SCOPES}/scope_9/queues",
        status=404,
        json_body={
            "status": "error",
            "error": {"code": "scope_not_found", "message": "Scope not found."},
            "meta": {"request_id": "up-1"},
        },
    )

    response = await gateway.get(
        "/api/v1/scaiqueue/scopes/scope_9/queues", headers=bearer(token)
    )
    detail = (await response.json())["detail"]

    assert response.status == 404
    assert detail["error"] == "upstream_error"
    assert detail["upstream_code"] == "scope_not_found"
    assert detail["upstream_request_id"] == "up-1"


async def test_upstream_429_keeps_retry_after(gateway, upstream, token):
    upstream.route(
        "GET",
        BUNKERS,
        status=429,
        json_body={
            "status": "error",
            "error": {"code": "rate_limited", "message": "Slow down."},
        },
        headers={"Retry-After": "7", "X-Scaigrid-Ratelimit-Remaining": "0"},
    )

    response = await gateway.get("/api/v1/scaibunker/bunkers", headers=bearer(token))

    assert response.status == 429
    assert response.headers["Retry-After"] == "7"
    assert response.headers["X-Scaigrid-Ratelimit-Remaining"] == "0"


async def test_upstream_500_is_bad_gateway(gateway, upstream, token):
    upstream.route("GET", MODELS, status=500, json_body={"error": "boom"})

    response = await gateway.get("/api/v1/scaigrid/models", headers=bearer(token))
    detail = (await response.json())["detail"]

    assert response.status == 502
    assert detail["error"] == "bad_gateway"
    assert detail["upstream_status"] == 500


async def test_upstream_html_is_bad_gateway(gateway, upstream, token):
    async def html(request: web.Request) -> web.Response:
        return web.Response(
            text="<html><body>Login</body></html>", content_type="text/html"
        )

    upstream.route("GET", SCOPES, html)

    response = await gateway.get("/api/v1/scaiqueue/scopes", headers=bearer(token))
    body = await response.json()

    assert response.status == 502
    assert body["detail"]["error"] == "bad_gateway"
    assert "<html>" not in json.dumps(body)


@pytest.mark.parametrize(
    "document",
    [
        {"data": "not a list"},
        {"data": {"entries": []}},
        {"items": []},
        [SCOPE],
        {"data": [SCOPE, "not an object"]},
        {"data": [SCOPE], "next_cursor": 5},
    ],
    ids=["data-string", "no-items", "no-data", "top-level-list", "item", "cursor"],
)
async def test_wrong_shape_is_bad_gateway(gateway, upstream, token, document):
    upstream.route("GET", SCOPES, json_body=document)

    response = await gateway.get("/api/v1/scaiqueue/scopes", headers=bearer(token))
    body = await response.json()

    assert response.status == 502
    assert body["detail"]["error"] == "bad_gateway"


async def test_model_not_an_object_is_bad_gateway(gateway, upstream, token):
    upstream.route("GET", MODELS, json_body={"object": "list", "data": ["gpt-4o"]})

    response = await gateway.get("/api/v1/scaigrid/models", headers=bearer(token))

    assert response.status == 502


async def test_error_on_later_page(gateway, upstream, token):
    upstream.route(
        "GET", SCOPES, paged({None: {"data": [SCOPE], "next_cursor": "gone"}})
    )

    response = await gateway.get("/api/v1/scaiqueue/scopes", headers=bearer(token))

    assert response.status == 400
    assert (await response.json())["detail"]["error"] == "upstream_error"
    assert len(upstream.requests) == 2


# Cache


@pytest.fixture
async def cached_gateway(make_gateway, upstream, jwks_server):
    return await make_gateway(lookups_config(upstream, jwks_server, cache_ttl_s=60))


async def cache_hits(client, route: str) -> float:
    text = await (await client.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith(f'scaiproxy_cache_hits_total{{route="{route}"}}'):
            return float(line.split()[-1])
    return 0.0


async def test_cache_serves_second_call(cached_gateway, upstream, token):
    upstream.route("GET", SCOPES, json_body={"data": [SCOPE]})

    first = await cached_gateway.get("/api/v1/scaiqueue/scopes", headers=bearer(token))
    second = await cached_gateway.get("/api/v1/scaiqueue/scopes", headers=bearer(token))

    assert await data_of(first) == [SCOPE]
    assert await data_of(second) == [SCOPE]
    assert len(upstream.requests) == 1
    assert await cache_hits(cached_gateway, "lookups.scopes") == 1.0


async def test_cache_is_per_tenant(cached_gateway, upstream, rsa_key):
    async def by_caller(request: web.Request) -> web.Response:
        caller = request.headers["Authorization"][-8:]
        return web.json_response({"data": [{"id": caller}]})

    upstream.route("GET", SCOPES, by_caller)
    acme = mint(rsa_key, tenant_id="acme", permissions=["scaicore:view"])
    globex = mint(rsa_key, tenant_id="globex", permissions=["scaicore:view"])

    first = await cached_gateway.get("/api/v1/scaiqueue/scopes", headers=bearer(acme))
    other = await cached_gateway.get("/api/v1/scaiqueue/scopes", headers=bearer(globex))

    assert await data_of(first) == [{"id": acme[-8:]}]
    assert await data_of(other) == [{"id": globex[-8:]}]
    assert len(upstream.requests) == 2
    assert upstream.last.headers["Authorization"] == f"Bearer {globex}"


async def test_cache_is_per_tenant_key(
    make_gateway, upstream, jwks_server, rsa_key, tmp_path
):
    acme_key = "sgk_" + "a" * 40
    globex_key = "sgk_" + "g" * 40
    secrets = tmp_path / "secrets.json"
    secrets.write_text(
        json.dumps(
            {
                "tenants/acme/scaigrid_api_key": acme_key,
                "tenants/globex/scaigrid_api_key": globex_key,
            }
        )
    )
    config = lookups_config(upstream, jwks_server, cache_ttl_s=60)
    config["auth"]["upstream_credentials"] = "api_key"
    config["secrets"] = {"backend": "file", "file": {"path": str(secrets)}}
    client = await make_gateway(config)
    upstream.route("GET", BUNKERS, json_body={"data": [bunker("persistent", "ready")]})

    for tenant in ("acme", "globex", "acme", "globex"):
        token = mint(rsa_key, tenant_id=tenant, permissions=["scaicore:view"])
        response = await client.get("/api/v1/scaibunker/bunkers", headers=bearer(token))
        assert response.status == 200

    assert [request.headers["Authorization"] for request in upstream.requests] == [
        f"Bearer {acme_key}",
        f"Bearer {globex_key}",
    ]
    assert await cache_hits(client, "lookups.bunkers") == 2.0


async def test_cache_ttl_zero_disables(gateway, upstream, token):
    upstream.route("GET", SCOPES, json_body={"data": [SCOPE]})

    for _ in range(2):
        response = await gateway.get("/api/v1/scaiqueue/scopes", headers=bearer(token))
        assert response.status == 200

    assert len(upstream.requests) == 2
    assert await cache_hits(gateway, "lookups.scopes") == 0.0


async def test_cache_skips_errors(cached_gateway, upstream, token):
    upstream.route("GET", MODELS, status=503, json_body={"error": "busy"})
    failed = await cached_gateway.get("/api/v1/scaigrid/models", headers=bearer(token))
    upstream.route("GET", MODELS, json_body={"data": [GPT_4O]})

    response = await cached_gateway.get(
        "/api/v1/scaigrid/models", headers=bearer(token)
    )

    assert failed.status == 502
    assert await data_of(response) == [GPT_4O]
    assert len(upstream.requests) == 2


async def test_cache_is_per_route_url(cached_gateway, upstream, token):
    upstream.route("GET", f"{SCOPES}/s1/queues", json_body={"data": [QUEUE]})
    upstream.route("GET", f"{SCOPES}/s2/queues", json_body={"data": []})

    scope_1 = await cached_gateway.get(
        "/api/v1/scaiqueue/scopes/s1/queues", headers=bearer(token)
    )
    scope_2 = await cached_gateway.get(
        "/api/v1/scaiqueue/scopes/s2/queues", headers=bearer(token)
    )

    assert await data_of(scope_1) == [QUEUE]
    assert await data_of(scope_2) == []


def credential(authorization: str) -> Credential:
    return Credential("tenant_key", authorization, "http://up", "…")


def test_cache_keys_differ_by_credential():
    cache = ResponseCache(30, 10)
    first = cache.key("route", "http://up/x", "acme", credential("Bearer one"))
    second = cache.key("route", "http://up/x", "acme", credential("Bearer two"))
    cache.put(first, b"[1]")

    assert first != second
    assert cache.get(second) is None
    assert cache.get(first) == b"[1]"


def test_cache_expires():
    now = [100.0]
    cache = ResponseCache(30, 10, clock=lambda: now[0])
    key = cache.key("lookups.scopes", "http://up/v1/x", "acme", credential("Bearer t"))
    cache.put(key, b"[]")

    now[0] = 129.9
    assert cache.get(key) == b"[]"
    now[0] = 130.0
    assert cache.get(key) is None


def test_cache_drops_oldest():
    cache = ResponseCache(30, 2)
    keys = [
        cache.key("route", f"http://up/{n}", "acme", credential("Bearer t")) for n in range(3)
    ]
    for key in keys:
        cache.put(key, b"[]")

    assert len(cache) == 2
    assert cache.get(keys[0]) is None
    assert cache.get(keys[2]) == b"[]"


def test_cache_keys_differ_by_tenant():
    cache = ResponseCache(30, 10)
    shared_key = credential("Bearer sgk_one_development_key_for_all")
    first = cache.key("route", "http://up/x", "acme", shared_key)
    second = cache.key("route", "http://up/x", "globex", shared_key)
    assert first != second


def test_cache_key_hides_credential():
    key = ResponseCache.key(
        "route", "http://up/x", "acme", credential("Bearer sgk_secret_value_1234")
    )

    assert b"sgk_secret" not in key[3]
    assert "sgk_secret" not in repr(key)


# Config and OpenAPI


def build_app(upstream, jwks_server, **block: Any) -> None:
    config = lookups_config(upstream, jwks_server, **block)
    settings = settings_from_mapping(config, environ={})
    create_app(settings, environ={})


@pytest.mark.parametrize(
    "value",
    [
        "v1/models",
        "//evil.test/v1/models",
        "/v1/../admin",
        "/v1/./models",
        "/v1/models?limit=5",
        "/v1/models#top",
        "/v1/models\r\nX-Injected: 1",
        "/v1/mod els",
        "",
    ],
)
def test_bad_models_path(upstream, jwks_server, value):
    with pytest.raises(ConfigError) as raised:
        build_app(upstream, jwks_server, models_path=value)

    assert raised.value.key == "plugins.lookups.models_path"


@pytest.mark.parametrize("value", [0, 1001, "many", 2.5])
def test_bad_max_pages(upstream, jwks_server, value):
    with pytest.raises(ConfigError) as raised:
        build_app(upstream, jwks_server, max_pages=value)

    assert raised.value.key == "plugins.lookups.max_pages"


@pytest.mark.parametrize("value", [-1, "soon", float("inf")])
def test_bad_cache_ttl(upstream, jwks_server, value):
    with pytest.raises(ConfigError) as raised:
        build_app(upstream, jwks_server, cache_ttl_s=value)

    assert raised.value.key == "plugins.lookups.cache_ttl_s"


def test_unknown_config_key(upstream, jwks_server):
    with pytest.raises(ConfigError) as raised:
        build_app(upstream, jwks_server, page_size=50)

    assert raised.value.key == "plugins.lookups.page_size"


def test_good_config_accepted(upstream, jwks_server):
    build_app(
        upstream,
        jwks_server,
        models_path="/oai/v1/models",
        max_pages=1000,
        cache_ttl_s=0,
        cache_max_entries=5,
    )


async def test_openapi_lists_routes(gateway):
    document = await (await gateway.get("/openapi.json")).json()
    paths = document["paths"]

    for path in (
        "/api/v1/scaiqueue/scopes",
        "/api/v1/scaiqueue/scopes/{scope_id}/queues",
        "/api/v1/scaibunker/bunkers",
        "/api/v1/scaigrid/models",
    ):
        assert paths[path]["get"]["tags"] == ["lookups"]
        assert "scaicore:view" in paths[path]["get"]["description"]


# Bunker fields of the wrong type

BUNKER_LIST = "/api/v1/scaibunker/bunkers"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"status": ["running"], "lifecycle": "persistent"},
            "'status' of bunker 2 is an array",
        ),
        ({"status": {"state": "running"}}, "'status' of bunker 2 is an object"),
        ({"status": 1, "lifecycle": "persistent"}, "'status' of bunker 2 is a number"),
        ({"status": True}, "'status' of bunker 2 is a boolean"),
        (
            {"status": "stopped", "lifecycle": ["persistent"]},
            "'lifecycle' of bunker 2 is an array",
        ),
        (
            {"status": "running", "lifecycle": 7.5},
            "'lifecycle' of bunker 2 is a number",
        ),
    ],
    ids=[
        "status-array",
        "status-object",
        "status-number",
        "status-bool",
        "lifecycle-array",
        "lifecycle-number",
    ],
)
async def test_bunker_field_type_is_bad_gateway(
    gateway, upstream, token, fields, expected
):
    entries = [bunker("ephemeral", "running"), {"bunker_id": "bnk_bad", **fields}]
    upstream.route("GET", BUNKERS, json_body={"data": entries})

    response = await gateway.get(BUNKER_LIST, headers=bearer(token))
    detail = (await response.json())["detail"]

    assert response.status == 502
    assert detail["error"] == "bad_gateway"
    assert expected in detail["message"]


async def test_bunker_field_type_logged(gateway, upstream, token, log_warnings):
    upstream.route("GET", BUNKERS, json_body={"data": [{"status": ["running"]}]})

    response = await gateway.get(BUNKER_LIST, headers=bearer(token))

    assert response.status == 502
    [line] = log_warnings("upstream_bad_shape")
    assert line["problem"] == "'status' of bunker 1 is an array, not a string"


async def test_bunker_field_type_on_later_page(gateway, upstream, token):
    pages = {
        None: {"data": [bunker("persistent", "running")], "next_cursor": "p2"},
        "p2": {"data": [bunker("persistent", "running"), {"lifecycle": {}}]},
    }
    upstream.route("GET", BUNKERS, paged(pages))

    response = await gateway.get(BUNKER_LIST, headers=bearer(token))
    detail = (await response.json())["detail"]

    assert response.status == 502
    assert "'lifecycle' of bunker 3 is an object" in detail["message"]


async def test_bunker_null_fields_filtered(gateway, upstream, token):
    entries = [
        {"bunker_id": "bnk_1", "lifecycle": "persistent", "status": None},
        {"bunker_id": "bnk_2", "lifecycle": None, "status": "running"},
        {"bunker_id": "bnk_3", "lifecycle": None, "status": None},
    ]
    upstream.route("GET", BUNKERS, json_body={"data": entries})

    response = await gateway.get(BUNKER_LIST, headers=bearer(token))
    data = await data_of(response)

    assert [entry["bunker_id"] for entry in data] == ["bnk_1", "bnk_2"]


@pytest.mark.parametrize(
    "body, cause",
    [
        (b'{"data": [{"id": "m", "price": NaN}]}', "NaN is not allowed"),
        (b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ],
    ids=["nan", "deep"],
)
async def test_models_page_not_json_names_cause(gateway, upstream, token, body, cause):
    async def page(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    upstream.route("GET", MODELS, page)

    response = await gateway.get("/api/v1/scaigrid/models", headers=bearer(token))
    detail = (await response.json())["detail"]

    assert response.status == 502
    assert detail["error"] == "bad_gateway"
    assert cause in detail["message"]


async def test_list_over_byte_limit_across_pages(
    make_gateway, upstream, jwks_server, token
):
    config = lookups_config(upstream, jwks_server, cache_ttl_s=0)
    config["upstream"]["max_response_bytes"] = 1000
    gateway = await make_gateway(config)

    async def page(request: web.Request) -> web.Response:
        number = int(request.query.get("cursor", "0"))
        body = json.dumps(
            {"data": [{"id": f"model-{number}"}], "next_cursor": str(number + 1)}
        )
        # 400 bytes a page: the third page takes the list over 1000 bytes.
        return web.Response(
            body=body.ljust(400).encode(), content_type="application/json"
        )

    upstream.route("GET", MODELS, page)

    response = await gateway.get("/api/v1/scaigrid/models", headers=bearer(token))
    detail = (await response.json())["detail"]

    assert response.status == 502
    assert detail["error"] == "bad_gateway"
    assert "upstream.max_response_bytes (1000 bytes)" in detail["message"]
    assert len(upstream.requests) == 3


async def test_number_beyond_double_is_bad_gateway(gateway, upstream, token):
    """1e400 is valid JSON but infinity once decoded, which JSON cannot express."""

    async def page(request: web.Request) -> web.Response:
        body = (
            b'{"data":[{"id":"a","slug":"a","big":12345678901234567890123,"f":1e400}]}'
        )
        return web.Response(body=body, content_type="application/json")

    upstream.route("GET", SCOPES, page)

    response = await gateway.get("/api/v1/scaiqueue/scopes", headers=bearer(token))
    body = await response.json()

    assert response.status == 502
    assert body["detail"]["error"] == "bad_gateway"
    assert "responded with the number 1e400, which is beyond" in body["detail"][
        "message"
    ]
    assert "A retry gets the same answer" in body["detail"]["fix"]


async def test_float_values_kept(gateway, upstream, token):
    """Numbers that fit a double keep their value, and the response stays JSON."""

    async def page(request: web.Request) -> web.Response:
        body = (
            b'{"data":[{"id":"a","slug":"a","f":-2.5e-3,"n":12345678901234567890123}]}'
        )
        return web.Response(body=body, content_type="application/json")

    upstream.route("GET", SCOPES, page)

    response = await gateway.get("/api/v1/scaiqueue/scopes", headers=bearer(token))
    text = await response.text()

    assert response.status == 200
    assert json.loads(text)["data"][0]["f"] == -0.0025
    assert '"n":12345678901234567890123' in text


async def test_development_key_cache_kept_per_tenant(
    make_gateway, upstream, jwks_server, rsa_key
):
    """Tenants on the one development key send identical calls, and still
    never get a list cached for another tenant."""
    upstream.route("GET", SCOPES, json_body={"data": []})
    raw = base_config(
        upstream.base_url,
        jwks_server.url,
        auth={"upstream_credentials": "api_key"},
        plugins={"enabled": ["scaicore", "lookups"]},
    )
    client = await make_gateway(raw, environ={"SCAIGRID_API_KEY": "sgk_" + "c" * 40})
    for tenant in ("acme", "globex"):
        token = mint(rsa_key, tenant_id=tenant, permissions=["scaicore:view"])
        response = await client.get("/api/v1/scaiqueue/scopes", headers=bearer(token))
        assert response.status == 200
    assert len(upstream.requests) == 2
