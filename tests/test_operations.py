"""Operational routes: /healthz, /readyz, /metrics and the OpenAPI document."""

from __future__ import annotations

from typing import Any, Literal

import pytest
from conftest import base_config, bearer, mint
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, Field

from scaiproxy import RouteSpec, hookimpl
from scaiproxy.app import ROUTES
from scaiproxy.routes import NO_CONTENT, Call

EVENTS = "/api/v1/scaicore/events"
EVENTS_UP = "/v1/modules/scaicore/events"
PAGE = {"data": {"events": [], "next_cursor": None}}
TENANT = "tenant-7c1e9a"


class Address(BaseModel):
    street: str
    city: str


class SignupBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="Display name")
    address: Address
    plan: Literal["free", "team"] = "free"


class ListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    order: Literal["asc", "desc"] = Field("asc", description="Sort order")
    page: int = Field(1, ge=1)


class Shop:
    """Routes with a nested body model, a query model and a 204 response."""

    @hookimpl
    def scaiproxy_routes(self) -> list[RouteSpec]:
        async def done(call: Call) -> Any:
            return NO_CONTENT

        return [
            RouteSpec(
                "POST",
                "/v1/shop/{shop_id}/signup",
                done,
                name="shop.signup",
                permission="shop:write",
                body=SignupBody,
                status=204,
                summary="Sign up a customer",
            ),
            RouteSpec(
                "GET",
                "/v1/shop/{shop_id}/orders",
                done,
                name="shop.orders",
                query=ListQuery,
                response={"type": "array", "items": {"type": "object"}},
            ),
        ]


@pytest.fixture
async def client(make_gateway, upstream, jwks_server):
    raw = base_config(
        upstream.base_url,
        jwks_server.url,
        plugins={"enabled": ["scaicore", "shop"]},
    )
    return await make_gateway(raw, plugins={"shop": Shop()})


# --- health and readiness -----------------------------------------------------


async def test_healthz(client):
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"data": {"status": "ok"}}
    assert response.headers["Server"] == "scaiproxy"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/healthz", 200),
        ("GET", "/metrics", 200),
        ("GET", "/api/v1/scaicore/events", 401),
        ("GET", "/api/v1/no-such-route", 404),
        ("DELETE", "/healthz", 405),
    ],
)
async def test_server_header_on_every_response(client, method, path, status):
    """aiohttp's own Server header would name Python's and aiohttp's versions."""
    response = await client.request(method, path)
    assert response.status == status
    assert response.headers["Server"] == "scaiproxy"


async def test_healthz_head(client):
    response = await client.head("/healthz")
    assert response.status == 200


async def test_readyz_when_started(client):
    response = await client.get("/readyz")
    assert response.status == 200
    assert await response.json() == {"data": {"status": "ready"}}


async def test_readyz_during_shutdown(client):
    await client.app.shutdown()
    response = await client.get("/readyz")
    body = await response.json()
    assert response.status == 503
    assert body["detail"]["error"] == "service_unavailable"
    assert body["detail"]["message"]
    assert response.headers["Retry-After"] == "1"
    assert response.headers["X-Request-ID"]
    assert response.headers["Content-Type"].startswith("application/json")


async def test_healthz_during_shutdown(client):
    await client.app.shutdown()
    response = await client.get("/healthz")
    assert response.status == 200


# --- metrics ------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def scrape(client) -> str:
    response = await client.get("/metrics")
    assert response.status == 200
    return await response.text()


async def test_metrics_content_type(client):
    response = await client.get("/metrics")
    assert response.headers["Content-Type"].startswith("text/plain")


async def test_metrics_requests_by_route_and_status(client, upstream, rsa_key):
    upstream.route("GET", EVENTS_UP, json_body=PAGE)
    token = mint(rsa_key, permissions=["scaicore:view"])
    await client.get(EVENTS, headers=bearer(token))
    await client.get(EVENTS, headers=bearer(token))
    await client.get(EVENTS)
    found = samples(await scrape(client))
    ok = (("method", "GET"), ("route", "scaicore.events"), ("status", "200"))
    rejected = (("method", "GET"), ("route", "scaicore.events"), ("status", "401"))
    assert found[("scaiproxy_requests_total", ok)] == 2
    assert found[("scaiproxy_requests_total", rejected)] == 1


async def test_metrics_latency_histograms(client, upstream, rsa_key):
    upstream.route("GET", EVENTS_UP, json_body=PAGE)
    await client.get(
        EVENTS, headers=bearer(mint(rsa_key, permissions=["scaicore:view"]))
    )
    found = samples(await scrape(client))
    route = (("route", "scaicore.events"),)
    assert found[("scaiproxy_request_duration_seconds_count", route)] == 1
    assert found[("scaiproxy_upstream_duration_seconds_count", route)] == 1
    assert (
        "scaiproxy_request_duration_seconds_bucket",
        (("le", "+Inf"), ("route", "scaicore.events")),
    ) in found
    assert (
        found[("scaiproxy_upstream_requests_total", (*route, ("status", "200")))] == 1
    )


async def test_metrics_upstream_errors(client, upstream, rsa_key):
    upstream.route("GET", EVENTS_UP, json_body={}, status=500)
    await client.get(
        EVENTS, headers=bearer(mint(rsa_key, permissions=["scaicore:view"]))
    )
    found = samples(await scrape(client))
    key = (("kind", "server_error"), ("route", "scaicore.events"))
    assert found[("scaiproxy_upstream_errors_total", key)] == 1


async def test_metrics_credential_sources(client, upstream, rsa_key):
    upstream.route("GET", EVENTS_UP, json_body=PAGE)
    await client.get(
        EVENTS, headers=bearer(mint(rsa_key, permissions=["scaicore:view"]))
    )
    found = samples(await scrape(client))
    assert found[("scaiproxy_credential_source_total", (("source", "user_jwt"),))] == 1


async def test_metrics_hold_no_tenant_or_token(client, upstream, rsa_key):
    upstream.route("GET", EVENTS_UP, json_body=PAGE)
    token = mint(
        rsa_key, tenant_id=TENANT, sub="person-5d2f", permissions=["scaicore:view"]
    )
    await client.get(EVENTS, headers=bearer(token))
    await client.get("/api/v1/nothing-4411", headers=bearer(token))
    text = await scrape(client)
    assert TENANT not in text
    assert "person-5d2f" not in text
    assert token.split(".")[1] not in text
    assert "nothing-4411" not in text


async def test_unmatched_paths_share_a_label(client):
    await client.get("/api/v1/one-3311")
    await client.get("/api/v1/two-3312")
    found = samples(await scrape(client))
    key = (("method", "GET"), ("route", "unmatched"), ("status", "404"))
    assert found[("scaiproxy_requests_total", key)] == 2


async def test_metrics_separate_per_app(make_gateway, upstream, jwks_server):
    first = await make_gateway(base_config(upstream.base_url, jwks_server.url))
    second = await make_gateway(base_config(upstream.base_url, jwks_server.url))
    await first.get("/healthz")
    found = samples(await scrape(second))
    key = (("method", "GET"), ("route", "/healthz"), ("status", "200"))
    assert ("scaiproxy_requests_total", key) not in found


# --- the OpenAPI document -----------------------------------------------------


async def openapi(client) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status == 200
    return await response.json()


async def test_openapi_valid(client):
    document = await openapi(client)
    validate(document)
    assert document["openapi"] == "3.1.0"


async def test_openapi_lists_every_route(client):
    document = await openapi(client)
    for spec in client.app[ROUTES]:
        path = "/api" + spec.path
        assert path in document["paths"], path
        assert spec.method.lower() in document["paths"][path], spec.name
        operation = document["paths"][path][spec.method.lower()]
        assert operation["operationId"] == spec.name


async def test_openapi_lists_operational_routes(client):
    document = await openapi(client)
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert document["paths"][path]["get"]["security"] == []


async def test_openapi_path_parameters(client):
    document = await openapi(client)
    operation = document["paths"]["/api/v1/shop/{shop_id}/signup"]["post"]
    [parameter] = operation["parameters"]
    assert parameter["name"] == "shop_id"
    assert parameter["in"] == "path"
    assert parameter["required"] is True
    assert parameter["schema"]["pattern"] == r"^[A-Za-z0-9_.:-]{1,128}$"


async def test_openapi_query_parameters(client):
    document = await openapi(client)
    operation = document["paths"]["/api/v1/shop/{shop_id}/orders"]["get"]
    query = {p["name"]: p for p in operation["parameters"] if p["in"] == "query"}
    assert set(query) == {"order", "page"}
    assert query["order"]["schema"]["enum"] == ["asc", "desc"]
    assert query["order"]["description"] == "Sort order"
    assert query["page"]["required"] is False


async def test_openapi_request_body(client):
    document = await openapi(client)
    operation = document["paths"]["/api/v1/shop/{shop_id}/signup"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert operation["requestBody"]["required"] is True
    assert set(schema["properties"]) == {"name", "address", "plan"}
    assert schema["properties"]["address"]["$ref"] == "#/components/schemas/Address"
    assert "Address" in document["components"]["schemas"]
    assert "204" in operation["responses"]
    assert "Requires: shop:write." in operation["description"]


async def test_openapi_scaicore_routes(client):
    document = await openapi(client)
    events = document["paths"]["/api/v1/scaicore/events"]["get"]
    invoke = document["paths"]["/api/v1/scaicore/cores/{core_id}/invoke"]["post"]
    names = {p["name"] for p in events["parameters"]}
    assert {"core_id", "limit", "cursor"} <= names
    assert "requestBody" not in events
    assert "requestBody" in invoke
    assert "400" in invoke["responses"]


async def test_openapi_error_schema(client):
    document = await openapi(client)
    error = document["components"]["schemas"]["Error"]
    assert error["properties"]["detail"]["required"] == ["error", "message"]


async def test_openapi_custom_path(make_gateway, upstream, jwks_server):
    raw = base_config(
        upstream.base_url, jwks_server.url, server={"openapi_path": "/docs/api.json"}
    )
    client = await make_gateway(raw)
    response = await client.get("/docs/api.json")
    document = await response.json()
    assert response.status == 200
    assert "/docs/api.json" in document["paths"]
    validate(document)
