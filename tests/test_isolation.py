"""Tenant isolation under concurrency, against the ScaiGrid simulator.

Two tenants, acme and globex, send 200 interleaved requests at once over every
ScaiGrid-backed route: first with their own sgk_ keys from a real secrets file
(``auth.upstream_credentials: api_key``), then with their own JWTs forwarded
(``auto``). The simulator records which tenant's credential authenticated each
upstream call and keeps separate data per tenant. A credential, a coalesced call
or a cached lookup that crossed tenants therefore shows up as the wrong tenant,
or as ids that belong to the other tenant.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from typing import Any

import pytest
from conftest import base_config, bearer

TENANTS = ("acme", "globex")
# A core that only this tenant has, invoked with an input that never pauses.
OWN_CORE = {
    "acme": ("core_support_triage", {"ticket_id": "T-1", "priority": "low"}),
    "globex": ("core_order_routing", {"order_id": "O-1"}),
}
REQUESTS = 200
SIM_LATENCY_MS = 20


def sim_config(sim, **sections: Any) -> dict[str, Any]:
    sections.setdefault("plugins", {"enabled": ["scaicore", "lookups"]})
    config = base_config(sim.base_url, sim.jwks_url, **sections)
    config["auth"] = {
        **config["auth"],
        "issuers": [sim.options.issuer],
        "audience": sim.options.audience,
        **sections.get("auth", {}),
    }
    return config


@pytest.fixture
def secrets_file(simulator, tmp_path):
    path = tmp_path / "secrets.json"
    path.write_text(
        json.dumps(
            {
                f"tenants/{tenant}/scaigrid_api_key": simulator.demo_api_keys[tenant]
                for tenant in TENANTS
            }
        )
    )
    os.chmod(path, 0o600)
    return path


def plan(sim) -> list[tuple[str, str, str, Any]]:
    """``(tenant, method, path, body)`` for each request, tenants alternating."""
    routes: dict[str, list[tuple[str, str, Any]]] = {}
    for tenant in TENANTS:
        scope_id = sim.state.tenants[tenant].scopes[0]["id"]
        core_id, core_input = OWN_CORE[tenant]
        routes[tenant] = [
            ("GET", "/api/v1/scaicore/events", None),
            ("GET", "/api/v1/scaicore/checkpoints?status=resolved", None),
            ("GET", "/api/v1/scaiqueue/scopes", None),
            ("GET", f"/api/v1/scaiqueue/scopes/{scope_id}/queues", None),
            ("GET", "/api/v1/scaibunker/bunkers", None),
            ("GET", "/api/v1/scaigrid/models", None),
            ("GET", "/api/v1/scaicore/events?limit=5", None),
            (
                "POST",
                f"/api/v1/scaicore/cores/{core_id}/invoke",
                {"input": core_input},
            ),
        ]
    requests = []
    for index in range(REQUESTS):
        tenant = TENANTS[index % 2]
        method, path, body = routes[tenant][(index // 2) % len(routes[tenant])]
        requests.append((tenant, method, path, body))
    return requests


async def run_interleaved(client, sim, tokens: dict[str, str]) -> list[dict[str, Any]]:
    """Send every planned request at once; return what each one got back."""
    sim.recorded_requests.clear()

    async def one(index: int, tenant: str, method: str, path: str, body: Any):
        headers = {**bearer(tokens[tenant]), "X-Request-ID": f"{tenant}-{index}"}
        response = await client.request(method, path, json=body, headers=headers)
        return {
            "tenant": tenant,
            "path": path,
            "status": response.status,
            "body": await response.json(),
        }

    return await asyncio.gather(
        *(one(index, *request) for index, request in enumerate(plan(sim)))
    )


def tenant_markers(sim, tenant: str) -> dict[str, set[str]]:
    state = sim.state.tenants[tenant]
    return {
        "events": {event["id"] for event in state.event_dicts()},
        "checkpoints": set(state.checkpoints),
        "scopes": {scope["id"] for scope in state.scopes},
        "queues": {queue["id"] for queues in state.queues.values() for queue in queues},
        "bunkers": {bunker["bunker_id"] for bunker in state.bunkers},
        "executions": {
            event["payload"]["execution_id"] for event in state.event_dicts()
        },
    }


def ids_in(result: dict[str, Any]) -> tuple[str, set[str]]:
    """Return which marker set a response's ids belong to, and the ids."""
    data = result["body"]["data"]
    path = result["path"]
    if "/events" in path:
        return "events", {event["id"] for event in data["events"]}
    if "/checkpoints" in path:
        return "checkpoints", {checkpoint["id"] for checkpoint in data["checkpoints"]}
    if path.endswith("/queues"):
        return "queues", {queue["id"] for queue in data}
    if path.endswith("/scopes"):
        return "scopes", {scope["id"] for scope in data}
    if path.endswith("/bunkers"):
        return "bunkers", {bunker["bunker_id"] for bunker in data}
    if path.endswith("/invoke"):
        return "executions", {data["execution_id"]}
    return "models", set()


def metric(text: str, name: str) -> float:
    pattern = re.compile(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+]+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(text))


def check_isolation(sim, results, expected_auth: str) -> None:
    markers = {tenant: tenant_markers(sim, tenant) for tenant in TENANTS}
    for result in results:
        assert result["status"] == 200, result
        tenant = result["tenant"]
        other = TENANTS[1 - TENANTS.index(tenant)]
        kind, ids = ids_in(result)
        if kind == "models":
            continue
        assert ids, result["path"]
        assert ids <= markers[tenant][kind], (tenant, result["path"])
        assert not ids & markers[other][kind], (tenant, result["path"])

    assert len(sim.recorded_requests) < sim.recorded_requests.maxlen
    recorded = scaigrid_records(sim)
    assert recorded
    for record in recorded:
        tenant = record["request_id"].split("-", 1)[0]
        assert record["tenant_id"] == tenant, record
        assert record["auth"] == expected_auth, record
        assert record["status"] == 200, record


def scaigrid_records(sim) -> list[dict[str, Any]]:
    """The recorded ScaiGrid calls, without the JWKS fetches."""
    return [
        record
        for record in sim.recorded_requests
        if not record["path"].startswith(("/scaikey/", "/scaivault/"))
    ]


async def test_keys_isolated(make_gateway, simulator, secrets_file):
    simulator.options.latency_ms = SIM_LATENCY_MS
    raw = sim_config(
        simulator,
        auth={"upstream_credentials": "api_key"},
        secrets={"backend": "file", "file": {"path": str(secrets_file)}},
    )
    client = await make_gateway(raw)
    tokens = {tenant: simulator.mint_token(tenant) for tenant in TENANTS}

    results = await run_interleaved(client, simulator, tokens)

    check_isolation(simulator, results, "sgk")


async def test_jwts_isolated(make_gateway, simulator):
    simulator.options.latency_ms = SIM_LATENCY_MS
    client = await make_gateway(sim_config(simulator))
    tokens = {tenant: simulator.mint_token(tenant) for tenant in TENANTS}

    results = await run_interleaved(client, simulator, tokens)

    check_isolation(simulator, results, "jwt")


@pytest.mark.parametrize("mode", ["api_key", "auto"])
async def test_sharing_was_exercised(mode, make_gateway, simulator, secrets_file):
    """The run above coalesces and caches, so isolation was tested under both."""
    simulator.options.latency_ms = SIM_LATENCY_MS
    raw = sim_config(
        simulator,
        auth={"upstream_credentials": mode},
        secrets={"backend": "file", "file": {"path": str(secrets_file)}},
    )
    client = await make_gateway(raw)
    tokens = {tenant: simulator.mint_token(tenant) for tenant in TENANTS}
    await run_interleaved(client, simulator, tokens)
    # A second round finds the lookups cached.
    await run_interleaved(client, simulator, tokens)

    text = await (await client.get("/metrics")).text()
    assert metric(text, "scaiproxy_coalesced_requests_total") > 0
    assert metric(text, "scaiproxy_cache_hits_total") > 0


async def test_cached_lookup_not_shared(make_gateway, simulator, secrets_file):
    """One tenant's cached scope list is never served to the other."""
    raw = sim_config(
        simulator,
        auth={"upstream_credentials": "api_key"},
        secrets={"backend": "file", "file": {"path": str(secrets_file)}},
    )
    client = await make_gateway(raw)
    acme = simulator.mint_token("acme")
    globex = simulator.mint_token("globex")
    path = "/api/v1/scaiqueue/scopes"

    first = await (await client.get(path, headers=bearer(acme))).json()
    second = await (await client.get(path, headers=bearer(globex))).json()
    again = await (await client.get(path, headers=bearer(acme))).json()

    expected = {
        tenant: tenant_markers(simulator, tenant)["scopes"] for tenant in TENANTS
    }
    assert {scope["id"] for scope in first["data"]} == expected["acme"]
    assert {scope["id"] for scope in second["data"]} == expected["globex"]
    assert again == first


async def test_same_tenant_users_separate_jwts(make_gateway, simulator):
    """Two users of one tenant are coalesced apart, each with its own token."""
    simulator.options.latency_ms = SIM_LATENCY_MS
    client = await make_gateway(sim_config(simulator))
    tokens = [simulator.mint_token("acme", sub=f"user-{index}") for index in range(4)]
    simulator.recorded_requests.clear()
    responses = await asyncio.gather(
        *(
            client.get("/api/v1/scaicore/events", headers=bearer(token))
            for token in tokens * 5
        )
    )
    assert {response.status for response in responses} == {200}
    # Each user's token reached ScaiGrid at least once: nothing was shared.
    assert len(scaigrid_records(simulator)) >= len(tokens)
