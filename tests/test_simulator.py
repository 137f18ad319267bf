"""Behaviour of the ScaiGrid, ScaiKey and ScaiVault simulator over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from scaiproxy.simulator import SimOptions, Simulator, main
from scaiproxy.simulator.activity import MAX_BACKGROUND_PENDING
from scaiproxy.simulator.flows import HUGE_TOTAL_MINOR_UNITS
from scaiproxy.simulator.runtime import MAX_RESULT_BINDING_BYTES
from scaiproxy.simulator.state import MAX_EVENTS_PER_TENANT

ClientFactory = Callable[..., Awaitable[TestClient]]

SCAICORE = "/v1/modules/scaicore"
RUNTIME = "scaicore.runtime."


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def sim() -> Simulator:
    return Simulator()


@pytest.fixture
async def client(aiohttp_client: ClientFactory, sim: Simulator) -> TestClient:
    return await aiohttp_client(sim.app())


@pytest.fixture
def acme(sim: Simulator) -> dict[str, str]:
    return bearer(sim.mint_token("acme"))


@pytest.fixture
def globex(sim: Simulator) -> dict[str, str]:
    return bearer(sim.mint_token("globex"))


async def get_json(
    client: TestClient, path: str, headers: dict[str, str], **params: Any
) -> tuple[int, Any]:
    response = await client.get(path, headers=headers, params=params or None)
    return response.status, await response.json()


async def invoke(
    client: TestClient,
    headers: dict[str, str],
    core_id: str,
    input: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    response = await client.post(
        f"{SCAICORE}/cores/{core_id}/invoke",
        headers=headers,
        json={"input": input, **extra},
    )
    assert response.status == 200
    return (await response.json())["data"]


def execution_events(sim: Simulator, tenant_id: str, execution_id: str) -> list[dict]:
    return [
        event
        for event in sim.state.tenants[tenant_id].event_dicts()
        if event["payload"].get("execution_id") == execution_id
    ]


async def all_events(
    client: TestClient, headers: dict[str, str], **params: Any
) -> list[dict[str, Any]]:
    """Follow next_cursor until an empty page and return every event seen."""
    events: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = dict(params)
        if cursor is not None:
            query["cursor"] = cursor
        status, body = await get_json(client, f"{SCAICORE}/events", headers, **query)
        assert status == 200
        events.extend(body["data"]["events"])
        if body["data"]["next_cursor"] is None:
            return events
        cursor = body["data"]["next_cursor"]


# --- ScaiKey: tokens and JWKS ----------------------------------------------------


async def test_minted_token_verifies_against_served_jwks(sim: Simulator) -> None:
    await sim.start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(sim.jwks_url) as response:
                assert response.status == 200
                jwks = await response.json()
    finally:
        await sim.stop()

    token = sim.mint_token("acme", sub="alice", roles=["tenant_viewer"])
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWKSet.from_dict(jwks)[kid]
    claims = jwt.decode(
        token,
        key.key,
        algorithms=["RS256"],
        audience="scaiflow-canvas",
        issuer="http://scaikey.sim",
    )
    assert claims["tenant_id"] == "acme"
    assert claims["sub"] == "alice"
    assert claims["roles"] == ["tenant_viewer"]
    assert claims["scope"] == "scaicore:view scaicore:manage"
    assert claims["nbf"] <= claims["iat"] < claims["exp"]
    assert claims["jti"]


async def test_jwks_key_is_rs256_signing_key(client: TestClient) -> None:
    response = await client.get("/scaikey/api/v1/platform/.well-known/jwks.json")
    (key,) = (await response.json())["keys"]
    assert key["kty"] == "RSA"
    assert key["alg"] == "RS256"
    assert key["use"] == "sig"
    assert key["kid"]
    assert "d" not in key


async def test_mint_token_claims_override_defaults(sim: Simulator) -> None:
    token = sim.mint_token("acme", partner_id="partner-9", iss="http://other")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["partner_id"] == "partner-9"
    assert claims["iss"] == "http://other"


async def test_dev_token_route_issues_accepted_token(client: TestClient) -> None:
    response = await client.post(
        "/scaikey/dev/token",
        json={"tenant_id": "globex", "roles": ["tenant_viewer"], "ttl_s": 120},
    )
    assert response.status == 200
    body = await response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 120

    status, _ = await get_json(
        client, f"{SCAICORE}/cores", bearer(body["access_token"])
    )
    assert status == 200


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"tenant_id": ""},
        {"tenant_id": "acme", "roles": "admin"},
        {"tenant_id": "acme", "ttl_s": 0},
    ],
)
async def test_dev_token_route_rejects_bad_body(
    client: TestClient, payload: dict[str, Any]
) -> None:
    response = await client.post("/scaikey/dev/token", json=payload)
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_request"


async def dev_token_claims(client: TestClient, **body: Any) -> dict[str, Any]:
    response = await client.post(
        "/scaikey/dev/token", json={"tenant_id": "acme", **body}
    )
    assert response.status == 200
    token = (await response.json())["access_token"]
    return jwt.decode(token, options={"verify_signature": False})


async def test_dev_token_defaults_without_roles(client: TestClient) -> None:
    claims = await dev_token_claims(client)
    assert claims["roles"] == ["tenant_admin"]
    assert claims["permissions"] == ["scaicore:view", "scaicore:manage"]


async def test_dev_token_roles_grant_no_permissions(client: TestClient) -> None:
    claims = await dev_token_claims(client, roles=["tenant_viewer"])
    assert claims["roles"] == ["tenant_viewer"]
    assert claims["permissions"] == []
    assert claims["scope"] == ""


async def test_dev_token_permissions_grant_no_roles(client: TestClient) -> None:
    claims = await dev_token_claims(client, permissions=["scaicore:view"])
    assert claims["roles"] == []
    assert claims["permissions"] == ["scaicore:view"]


async def test_dev_token_both_given(client: TestClient) -> None:
    claims = await dev_token_claims(
        client, roles=["tenant_user"], permissions=["scaicore:view"]
    )
    assert claims["roles"] == ["tenant_user"]
    assert claims["permissions"] == ["scaicore:view"]


# --- ScaiGrid authentication -----------------------------------------------------


def _other_simulator_token() -> str:
    return Simulator().mint_token("acme")


@pytest.mark.parametrize(
    "make_header",
    [
        pytest.param(lambda sim: {}, id="missing"),
        pytest.param(lambda sim: {"Authorization": "Basic YTpi"}, id="not-bearer"),
        pytest.param(lambda sim: bearer("not.a.jwt"), id="garbage"),
        pytest.param(
            lambda sim: bearer(sim.mint_token("acme", ttl_s=-60)), id="expired"
        ),
        pytest.param(
            lambda sim: bearer(sim.mint_token("acme", iss="http://evil")), id="iss"
        ),
        pytest.param(
            lambda sim: bearer(sim.mint_token("acme", aud="other-app")), id="aud"
        ),
        pytest.param(lambda sim: bearer(sim.mint_token("")), id="tenant"),
        pytest.param(lambda sim: bearer(_other_simulator_token()), id="foreign-key"),
        pytest.param(lambda sim: bearer("sgk_" + "x" * 40), id="unknown-sgk"),
    ],
)
async def test_scaigrid_rejects_bad_bearer(
    client: TestClient, sim: Simulator, make_header: Callable[[Simulator], dict]
) -> None:
    response = await client.get(f"{SCAICORE}/events", headers=make_header(sim))
    body = await response.json()
    assert response.status == 401
    assert body["status"] == "error"
    assert body["error"]["code"] == "unauthorized"
    assert body["meta"]["request_id"] == response.headers["X-Request-ID"]
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_hs256_token_is_rejected(client: TestClient, sim: Simulator) -> None:
    forged = jwt.encode(
        {"tenant_id": "acme", "iss": "http://scaikey.sim", "aud": "scaiflow-canvas"},
        "a-shared-secret-that-is-long-enough-for-hs256",
        algorithm="HS256",
        headers={"kid": sim.scaikey.kid},
    )
    response = await client.get(f"{SCAICORE}/events", headers=bearer(forged))
    assert response.status == 401


async def test_demo_api_keys_authenticate_their_tenant(
    client: TestClient, sim: Simulator
) -> None:
    assert set(sim.demo_api_keys) == {"acme", "globex"}
    for tenant_id, api_key in sim.demo_api_keys.items():
        assert api_key.startswith("sgk_")
        assert len(api_key) >= 36
        status, body = await get_json(client, f"{SCAICORE}/cores", bearer(api_key))
        assert status == 200
        core_ids = {core["id"] for core in body["data"]}
        assert core_ids == set(sim.state.tenants[tenant_id].cores)


async def test_added_api_key_maps_to_new_tenant(
    client: TestClient, sim: Simulator
) -> None:
    api_key = "sgk_" + "k" * 32
    sim.add_api_key(api_key, "initech")
    status, body = await get_json(client, f"{SCAICORE}/cores", bearer(api_key))
    assert status == 200
    assert "core_support_triage" in {core["id"] for core in body["data"]}
    assert sim.state.tenants["initech"].event_dicts() == []


@pytest.mark.parametrize("api_key", ["sgk_short", "key_" + "a" * 40, "sgk_" + "!" * 32])
def test_add_api_key_rejects_bad_format(sim: Simulator, api_key: str) -> None:
    with pytest.raises(ValueError):
        sim.add_api_key(api_key, "acme")


# --- request ids and errors ------------------------------------------------------


async def test_request_id_echoed_when_valid(client: TestClient, acme: dict) -> None:
    response = await client.get(
        f"{SCAICORE}/cores", headers={**acme, "X-Request-ID": "trace-123:abc"}
    )
    assert response.headers["X-Request-ID"] == "trace-123:abc"


async def test_request_id_replaced_when_invalid(client: TestClient, acme: dict) -> None:
    response = await client.get(
        f"{SCAICORE}/cores", headers={**acme, "X-Request-ID": "bad id<script>"}
    )
    assert response.headers["X-Request-ID"].startswith("req_")


async def test_error_envelope_carries_incoming_request_id(client: TestClient) -> None:
    response = await client.get(f"{SCAICORE}/events", headers={"X-Request-ID": "r-1"})
    body = await response.json()
    assert body["meta"]["request_id"] == "r-1"


async def test_unknown_route_is_enveloped_404(client: TestClient) -> None:
    response = await client.get("/v1/modules/nope")
    body = await response.json()
    assert response.status == 404
    assert body["error"]["code"] == "not_found"
    assert body["meta"]["request_id"] == response.headers["X-Request-ID"]


async def test_wrong_method_is_405_with_allow(client: TestClient, acme: dict) -> None:
    response = await client.delete(f"{SCAICORE}/events", headers=acme)
    body = await response.json()
    assert response.status == 405
    assert body["error"]["code"] == "method_not_allowed"
    assert "GET" in response.headers["Allow"]


async def test_unexpected_error_hides_traceback(
    client: TestClient, sim: Simulator, acme: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(sim.runtime, "invoke", explode)
    response = await client.post(
        f"{SCAICORE}/cores/core_flaky/invoke", headers=acme, json={"input": {}}
    )
    text = await response.text()
    assert response.status == 500
    assert json.loads(text)["error"]["code"] == "internal_error"
    assert "secret internals" not in text
    assert "Traceback" not in text


async def test_oversized_body_is_enveloped_413(client: TestClient, acme: dict) -> None:
    response = await client.post(
        f"{SCAICORE}/cores/core_flaky/invoke",
        headers={**acme, "Content-Type": "application/json"},
        data=b'{"input": "' + b"x" * (2 * 1024 * 1024) + b'"}',
    )
    body = await response.json()
    assert response.status == 413
    assert body["error"]["code"] == "payload_too_large"


# --- tenant isolation ------------------------------------------------------------


async def test_events_are_per_tenant(
    client: TestClient, sim: Simulator, acme: dict, globex: dict
) -> None:
    result = await invoke(client, acme, "core_debug_demo", {"note": "acme only"})
    acme_ids = {
        event["payload"]["execution_id"] for event in await all_events(client, acme)
    }
    globex_ids = {
        event["payload"]["execution_id"] for event in await all_events(client, globex)
    }
    assert result["execution_id"] in acme_ids
    assert result["execution_id"] not in globex_ids
    assert acme_ids.isdisjoint(globex_ids)


async def test_checkpoints_are_per_tenant(
    client: TestClient, acme: dict, globex: dict
) -> None:
    paused = await invoke(client, acme, "core_debug_demo", {})
    _, body = await get_json(client, f"{SCAICORE}/checkpoints", globex, limit=500)
    globex_ids = {checkpoint["id"] for checkpoint in body["data"]["checkpoints"]}
    assert paused["checkpoint_id"] not in globex_ids

    response = await client.post(
        f"{SCAICORE}/checkpoints/{paused['checkpoint_id']}/resolve",
        headers=globex,
        json={"resolution": "continue"},
    )
    assert response.status == 404


async def test_cores_scopes_and_bunkers_are_per_tenant(
    client: TestClient, acme: dict, globex: dict
) -> None:
    response = await client.post(
        f"{SCAICORE}/cores/core_support_triage/invoke",
        headers=globex,
        json={"input": {}},
    )
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "core_not_found"

    _, acme_scopes = await get_json(client, "/v1/modules/scaiqueue/scopes", acme)
    acme_scope_id = acme_scopes["data"][0]["id"]
    status, _ = await get_json(
        client, f"/v1/modules/scaiqueue/scopes/{acme_scope_id}/queues", globex
    )
    assert status == 404

    _, acme_bunkers = await get_json(client, "/v1/modules/scaibunker/bunkers", acme)
    _, globex_bunkers = await get_json(client, "/v1/modules/scaibunker/bunkers", globex)
    acme_bunker_ids = {bunker["bunker_id"] for bunker in acme_bunkers["data"]}
    globex_bunker_ids = {bunker["bunker_id"] for bunker in globex_bunkers["data"]}
    assert acme_bunker_ids.isdisjoint(globex_bunker_ids)


# --- invoke and runtime events ---------------------------------------------------


async def test_cores_list_nodes_with_block_kinds(
    client: TestClient, acme: dict
) -> None:
    _, body = await get_json(client, f"{SCAICORE}/cores", acme)
    cores = {core["id"]: core for core in body["data"]}
    kinds = {node["block_kind"] for core in cores.values() for node in core["nodes"]}
    assert {
        "core_support_triage",
        "core_invoice_review",
        "core_debug_demo",
        "core_flaky",
    } <= set(cores)
    assert {
        "rigid",
        "flexible",
        "guarded",
        "model_call",
        "parallel",
        "checkpoint",
        "foreach",
        "while",
    } <= kinds


async def test_invoke_records_runtime_events_in_order(
    client: TestClient, sim: Simulator, acme: dict
) -> None:
    result = await invoke(client, acme, "core_support_triage", {"message": "Hallo"})
    events = execution_events(sim, "acme", result["execution_id"])
    runtime_types = [
        event["type"] for event in events if event["type"].startswith(RUNTIME)
    ]
    nodes = [
        "node_load_ticket",
        "node_classify",
        "node_guard_pii",
        "node_draft_reply",
        "node_send_reply",
    ]
    expected = [RUNTIME + "invocation.started"]
    for _ in nodes:
        expected += [RUNTIME + "block.entered", RUNTIME + "block.exited"]
    expected.append(RUNTIME + "invocation.completed")

    assert result["status"] == "completed"
    assert runtime_types == expected
    entered = [e for e in events if e["type"] == RUNTIME + "block.entered"]
    assert [e["payload"]["node_id"] for e in entered] == nodes
    assert [e["payload"]["block_kind"] for e in entered] == [
        "rigid",
        "flexible",
        "guarded",
        "model_call",
        "rigid",
    ]
    assert events[0]["payload"]["input"] == {"message": "Hallo"}
    assert events[0]["payload"]["node_id"] is None
    assert events[-1]["payload"]["output"] == result["output"]
    assert events[-1]["payload"]["duration_ms"] == result["duration_ms"]


async def test_invoke_response_shape(client: TestClient, acme: dict) -> None:
    response = await client.post(
        f"{SCAICORE}/cores/core_support_triage/invoke",
        headers={**acme, "X-Request-ID": "replay-7"},
        json={"input": {}},
    )
    data = (await response.json())["data"]
    assert list(data) == [
        "output",
        "request_id",
        "duration_ms",
        "execution_id",
        "status",
    ]
    assert data["request_id"] == "replay-7"
    assert data["duration_ms"] > 0


async def test_events_have_common_envelope(client: TestClient, acme: dict) -> None:
    await invoke(client, acme, "core_support_triage", {})
    events = await all_events(client, acme, limit=500)
    for event in events:
        assert set(event) == {"id", "type", "core_id", "timestamp", "payload"}
        assert event["timestamp"].endswith("Z")
        assert "execution_id" in event["payload"]
        assert "node_id" in event["payload"]


async def test_flow_emits_custom_and_module_events(
    client: TestClient, sim: Simulator, acme: dict
) -> None:
    result = await invoke(client, acme, "core_support_triage", {})
    events = execution_events(sim, "acme", result["execution_id"])
    by_type = {event["type"]: event for event in events}
    assert by_type["support.ticket.classified"]["payload"]["node_id"] == "node_classify"
    assert by_type["support.ticket.classified"]["payload"]["assignee"] is None
    assert by_type["scaiqueue.message.completed"]["payload"]["node_id"] is None


async def test_entity_id_becomes_instance_key(
    client: TestClient, sim: Simulator, acme: dict
) -> None:
    result = await invoke(
        client, acme, "core_flaky", {"succeed": True}, entity_id="user_42"
    )
    events = execution_events(sim, "acme", result["execution_id"])
    assert events[0]["payload"]["instance_key"] == "user_42"
    assert events[-1]["payload"]["instance_key"] == "user_42"


async def test_failing_node_fails_invocation(
    client: TestClient, sim: Simulator, acme: dict
) -> None:
    result = await invoke(client, acme, "core_flaky", {})
    events = execution_events(sim, "acme", result["execution_id"])
    assert result["status"] == "failed"
    assert [event["type"] for event in events[-2:]] == [
        RUNTIME + "block.failed",
        RUNTIME + "invocation.failed",
    ]
    failed = events[-2]["payload"]
    assert failed["node_id"] == "node_call_vendor"
    assert failed["block_kind"] == "model_call"
    assert failed["error"]["type"] == "ModelTimeout"
    assert events[-1]["payload"]["error"]["node_id"] == "node_call_vendor"
    assert "node_store" not in {event["payload"]["node_id"] for event in events}


async def test_large_result_binding_is_truncated(
    client: TestClient, sim: Simulator, acme: dict
) -> None:
    result = await invoke(client, acme, "core_invoice_review", {"amount": 10})
    exited = {
        event["payload"]["node_id"]: event["payload"]
        for event in execution_events(sim, "acme", result["execution_id"])
        if event["type"] == RUNTIME + "block.exited"
    }
    big = exited["node_extract_lines"]
    assert big["result_binding"] == "lines"
    assert big["result_binding_truncated"] is True
    assert "result_binding_value" not in big
    assert big["result_binding_bytes"] > MAX_RESULT_BINDING_BYTES
    assert exited["node_fetch_invoice"]["result_binding_value"]["currency"] == "EUR"
    assert "result_binding_truncated" not in exited["node_fetch_invoice"]


async def test_big_integers_and_unicode_sent_exactly(
    client: TestClient, acme: dict
) -> None:
    result = await invoke(client, acme, "core_invoice_review", {"amount": 10})
    response = await client.get(
        f"{SCAICORE}/events", headers=acme, params={"limit": "500"}
    )
    text = await response.text()
    assert result["output"]["total_minor_units"] == HUGE_TOTAL_MINOR_UNITS
    assert f'"total_minor_units":{HUGE_TOTAL_MINOR_UNITS}' in text
    assert "Müller & Söhne GmbH, Zürich" in text
    assert "invoice.totals.checked" in text


async def test_invoke_echoes_big_integer_input(
    client: TestClient, sim: Simulator, acme: dict
) -> None:
    big = 2**80 + 1
    response = await client.post(
        f"{SCAICORE}/cores/core_flaky/invoke",
        headers={**acme, "Content-Type": "application/json"},
        data=f'{{"input": {{"n": {big}}}}}',
    )
    data = (await response.json())["data"]
    started = execution_events(sim, "acme", data["execution_id"])[0]
    assert started["payload"]["input"]["n"] == big


async def test_invoke_unknown_core_is_404(client: TestClient, acme: dict) -> None:
    response = await client.post(
        f"{SCAICORE}/cores/core_missing/invoke", headers=acme, json={"input": {}}
    )
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "core_not_found"


@pytest.mark.parametrize(
    "body",
    [{"input": [1, 2]}, {"input": "text"}, {}, {"input": {}, "entity_id": 5}],
)
async def test_invoke_rejects_bad_body_with_422(
    client: TestClient, acme: dict, body: dict[str, Any]
) -> None:
    response = await client.post(
        f"{SCAICORE}/cores/core_flaky/invoke", headers=acme, json=body
    )
    error = (await response.json())["error"]
    assert response.status == 422
    assert error["code"] == "validation_error"
    assert error["details"][0]["field"] in {"input", "entity_id"}


async def test_invoke_rejects_invalid_json_with_400(
    client: TestClient, acme: dict
) -> None:
    response = await client.post(
        f"{SCAICORE}/cores/core_flaky/invoke",
        headers={**acme, "Content-Type": "application/json"},
        data=b"{not json",
    )
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_json"


# --- checkpoints -----------------------------------------------------------------


async def test_checkpoint_pauses_and_resolve_resumes(
    client: TestClient, sim: Simulator, acme: dict
) -> None:
    paused = await invoke(client, acme, "core_debug_demo", {})
    checkpoint_id = paused["checkpoint_id"]
    events = execution_events(sim, "acme", paused["execution_id"])
    assert paused["status"] == "paused"
    assert events[-1]["type"] == RUNTIME + "block.entered"
    assert events[-1]["payload"]["node_id"] == "node_breakpoint"
    assert events[-1]["payload"]["block_kind"] == "checkpoint"

    _, listing = await get_json(
        client, f"{SCAICORE}/checkpoints", acme, core_id="core_debug_demo"
    )
    pending = {c["id"]: c for c in listing["data"]["checkpoints"]}
    checkpoint = pending[checkpoint_id]
    assert checkpoint["checkpoint_type"] == "debug_breakpoint"
    assert checkpoint["options"] == ["continue"]
    assert checkpoint["prompt"]
    assert checkpoint["status"] == "pending"
    assert checkpoint["resolved_at"] is None

    response = await client.post(
        f"{SCAICORE}/checkpoints/{checkpoint_id}/resolve",
        headers=acme,
        json={"resolution": "continue", "comment": "weiter"},
    )
    resolved = (await response.json())["data"]
    assert response.status == 200
    assert resolved["status"] == "resolved"
    assert resolved["resolution"] == "continue"
    assert resolved["comment"] == "weiter"
    assert resolved["resolved_at"] is not None

    resumed = execution_events(sim, "acme", paused["execution_id"])[len(events) :]
    assert [(e["type"], e["payload"]["node_id"]) for e in resumed] == [
        (RUNTIME + "block.exited", "node_breakpoint"),
        (RUNTIME + "block.entered", "node_finish"),
        (RUNTIME + "block.exited", "node_finish"),
        (RUNTIME + "invocation.completed", None),
    ]
    assert resumed[0]["payload"]["result_binding_value"]["resolution"] == "continue"

    _, after = await get_json(client, f"{SCAICORE}/checkpoints", acme)
    assert checkpoint_id not in {c["id"] for c in after["data"]["checkpoints"]}
    _, done = await get_json(
        client, f"{SCAICORE}/checkpoints", acme, status="resolved", limit=500
    )
    assert checkpoint_id in {c["id"] for c in done["data"]["checkpoints"]}


async def test_hitl_review_checkpoint_has_presentation(
    client: TestClient, sim: Simulator, acme: dict
) -> None:
    paused = await invoke(client, acme, "core_support_triage", {"priority": "high"})
    checkpoint = sim.state.tenants["acme"].checkpoints[paused["checkpoint_id"]].body
    assert checkpoint["checkpoint_type"] == "hitl_review"
    assert checkpoint["options"] == ["approve", "reject"]
    assert checkpoint["presentation"]["title"] == "Review needed"
    assert "T-1042" in checkpoint["presentation"]["message"]


async def test_reject_resolution_completes_with_decision(
    client: TestClient, sim: Simulator, acme: dict
) -> None:
    paused = await invoke(client, acme, "core_support_triage", {"priority": "high"})
    response = await client.post(
        f"{SCAICORE}/checkpoints/{paused['checkpoint_id']}/resolve",
        headers=acme,
        json={"resolution": "reject"},
    )
    assert response.status == 200
    completed = execution_events(sim, "acme", paused["execution_id"])[-1]
    assert completed["type"] == RUNTIME + "invocation.completed"
    assert completed["payload"]["output"]["review"] == "reject"
    assert completed["payload"]["output"]["sent"] is False


async def test_resolve_unknown_checkpoint_is_404(
    client: TestClient, acme: dict
) -> None:
    response = await client.post(
        f"{SCAICORE}/checkpoints/ckpt_missing/resolve",
        headers=acme,
        json={"resolution": "continue"},
    )
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "checkpoint_not_found"


async def test_resolve_twice_is_409(client: TestClient, acme: dict) -> None:
    paused = await invoke(client, acme, "core_debug_demo", {})
    path = f"{SCAICORE}/checkpoints/{paused['checkpoint_id']}/resolve"
    first = await client.post(path, headers=acme, json={"resolution": "continue"})
    second = await client.post(path, headers=acme, json={"resolution": "continue"})
    assert first.status == 200
    assert second.status == 409
    assert (await second.json())["error"]["code"] == "checkpoint_already_resolved"


async def test_resolve_expired_checkpoint_is_409(
    client: TestClient, acme: dict
) -> None:
    _, body = await get_json(client, f"{SCAICORE}/checkpoints", acme, status="expired")
    expired = body["data"]["checkpoints"][0]
    response = await client.post(
        f"{SCAICORE}/checkpoints/{expired['id']}/resolve",
        headers=acme,
        json={"resolution": "approve"},
    )
    assert response.status == 409
    assert (await response.json())["error"]["code"] == "checkpoint_not_pending"


@pytest.mark.parametrize(
    "body",
    [
        {"resolution": "approve"},
        {"resolution": ""},
        {},
        {"resolution": "continue", "comment": 3},
    ],
)
async def test_resolve_rejects_bad_resolution_with_422(
    client: TestClient, acme: dict, body: dict[str, Any]
) -> None:
    paused = await invoke(client, acme, "core_debug_demo", {})
    response = await client.post(
        f"{SCAICORE}/checkpoints/{paused['checkpoint_id']}/resolve",
        headers=acme,
        json=body,
    )
    assert response.status == 422
    assert (await response.json())["error"]["code"] == "validation_error"


async def test_seeded_checkpoints_cover_every_status(
    client: TestClient, acme: dict
) -> None:
    for status in ("pending", "resolved", "failed", "expired", "cancelled"):
        _, body = await get_json(client, f"{SCAICORE}/checkpoints", acme, status=status)
        checkpoints = body["data"]["checkpoints"]
        assert checkpoints, status
        assert {c["status"] for c in checkpoints} == {status}


async def test_checkpoint_status_must_be_known(client: TestClient, acme: dict) -> None:
    status, body = await get_json(
        client, f"{SCAICORE}/checkpoints", acme, status="done"
    )
    assert status == 422
    assert body["error"]["details"][0]["field"] == "status"


async def test_checkpoints_page_with_cursor(client: TestClient, acme: dict) -> None:
    for _ in range(4):
        await invoke(client, acme, "core_debug_demo", {})
    seen: list[str] = []
    cursor = None
    while True:
        params = {"core_id": "core_debug_demo", "limit": "2"}
        if cursor:
            params["cursor"] = cursor
        _, body = await get_json(client, f"{SCAICORE}/checkpoints", acme, **params)
        seen += [c["id"] for c in body["data"]["checkpoints"]]
        cursor = body["data"]["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 4
    assert len(set(seen)) == 4


# --- event paging and cursors ----------------------------------------------------


async def test_event_paging_returns_each_event_once(
    client: TestClient, sim: Simulator, acme: dict
) -> None:
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": "7"}
        if cursor is not None:
            params["cursor"] = cursor
        status, body = await get_json(client, f"{SCAICORE}/events", acme, **params)
        assert status == 200
        assert len(body["data"]["events"]) <= 7
        seen += [event["id"] for event in body["data"]["events"]]
        pages += 1
        if pages <= 5:
            # New events arrive between pages, behind the cursor's position.
            await invoke(client, acme, "core_flaky", {"succeed": pages % 2 == 0})
        if body["data"]["next_cursor"] is None:
            break
        cursor = body["data"]["next_cursor"]

    stored = [event["id"] for event in sim.state.tenants["acme"].event_dicts()]
    assert len(seen) == len(set(seen))
    assert seen == stored


async def test_event_cursor_resumes_after_empty_page(
    client: TestClient, acme: dict
) -> None:
    _, first = await get_json(client, f"{SCAICORE}/events", acme, limit="500")
    cursor = first["data"]["next_cursor"]
    _, empty = await get_json(client, f"{SCAICORE}/events", acme, cursor=cursor)
    assert empty["data"] == {"events": [], "next_cursor": None}

    result = await invoke(client, acme, "core_flaky", {"succeed": True})
    _, fresh = await get_json(client, f"{SCAICORE}/events", acme, cursor=cursor)
    execution_ids = {e["payload"]["execution_id"] for e in fresh["data"]["events"]}
    assert execution_ids == {result["execution_id"]}


async def test_events_filtered_by_core_id(client: TestClient, acme: dict) -> None:
    events = await all_events(client, acme, core_id="core_flaky", limit="3")
    assert events
    assert {event["core_id"] for event in events} == {"core_flaky"}


async def test_event_cursor_contains_base64_specials(
    client: TestClient, acme: dict
) -> None:
    _, body = await get_json(client, f"{SCAICORE}/events", acme, limit="1")
    cursor = body["data"]["next_cursor"]
    assert "+" in cursor
    assert "/" in cursor
    assert cursor.endswith("=")

    response = await client.get(
        f"{SCAICORE}/events", headers=acme, params={"cursor": cursor, "limit": "1"}
    )
    assert response.status == 200


async def test_unencoded_plus_in_cursor_is_rejected(
    client: TestClient, acme: dict
) -> None:
    _, body = await get_json(client, f"{SCAICORE}/events", acme, limit="1")
    cursor = body["data"]["next_cursor"]
    # Sent raw, "+" means a space in a query string and "=" stays as it is.
    raw = URL(f"{SCAICORE}/events?cursor={cursor}", encoded=True)
    response = await client.get(raw, headers=acme)
    error = (await response.json())["error"]
    assert response.status == 400
    assert error["code"] == "invalid_cursor"


@pytest.mark.parametrize(
    "cursor",
    ["nope", "++//", base64.b64encode(b"\xfb\xef\xffc" + bytes(9)).decode(), "é"],
)
async def test_bad_event_cursor_is_400(
    client: TestClient, acme: dict, cursor: str
) -> None:
    status, body = await get_json(client, f"{SCAICORE}/events", acme, cursor=cursor)
    assert status == 400
    assert body["error"]["code"] == "invalid_cursor"


async def test_checkpoint_cursor_rejected_for_events(
    client: TestClient, acme: dict
) -> None:
    for _ in range(2):
        await invoke(client, acme, "core_debug_demo", {})
    _, body = await get_json(client, f"{SCAICORE}/checkpoints", acme, limit="1")
    cursor = body["data"]["next_cursor"]
    status, _ = await get_json(client, f"{SCAICORE}/events", acme, cursor=cursor)
    assert status == 400


@pytest.mark.parametrize("limit", ["0", "501", "-1", "ten", "1.5"])
async def test_event_limit_outside_range_is_422(
    client: TestClient, acme: dict, limit: str
) -> None:
    status, body = await get_json(client, f"{SCAICORE}/events", acme, limit=limit)
    assert status == 422
    assert body["error"]["details"] == [
        {
            "field": "limit",
            "message": f"expected an integer from 1 to 500, got {limit!r}",
        }
    ]


async def test_event_limit_defaults_to_50(client: TestClient, acme: dict) -> None:
    for _ in range(5):
        await invoke(client, acme, "core_invoice_review", {})
    _, body = await get_json(client, f"{SCAICORE}/events", acme)
    assert len(body["data"]["events"]) == 50


async def test_event_store_drops_oldest_beyond_cap(
    client: TestClient, sim: Simulator, acme: dict
) -> None:
    tenant = sim.state.tenants["acme"]
    first_kept = tenant.last_event_seq + 51
    for number in range(MAX_EVENTS_PER_TENANT + 50):
        tenant.append_event(
            {
                "id": f"evt_fill_{number}",
                "type": "fill",
                "core_id": "core_flaky",
                "timestamp": "",
                "payload": {},
            }
        )
    assert len(tenant.events) == MAX_EVENTS_PER_TENANT
    assert tenant.events[0].seq == first_kept

    _, body = await get_json(client, f"{SCAICORE}/events", acme, limit="1")
    assert body["data"]["events"][0]["id"] == "evt_fill_50"


# --- catalogues ------------------------------------------------------------------


async def test_scopes_follow_cursors_to_the_end(client: TestClient, acme: dict) -> None:
    scopes: list[dict[str, Any]] = []
    pages: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"cursor": cursor} if cursor else {}
        _, body = await get_json(client, "/v1/modules/scaiqueue/scopes", acme, **params)
        pages.append(body)
        scopes += body["data"]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert [len(page["data"]) for page in pages] == [3, 3, 1]
    assert [page["has_more"] for page in pages] == [True, True, False]
    assert len({scope["id"] for scope in scopes}) == 7
    for scope in scopes:
        assert {"id", "slug", "display_name", "description", "queue_count"} <= set(
            scope
        )


async def test_scope_queues_listed(client: TestClient, acme: dict) -> None:
    _, scopes = await get_json(client, "/v1/modules/scaiqueue/scopes", acme)
    scope = scopes["data"][1]
    status, body = await get_json(
        client, f"/v1/modules/scaiqueue/scopes/{scope['id']}/queues", acme
    )
    assert status == 200
    assert len(body["data"]) == scope["queue_count"]
    for queue in body["data"]:
        assert queue["scope_id"] == scope["id"]
        assert {"id", "slug", "display_name", "consumer_mode", "max_retries"} <= set(
            queue
        )


async def test_unknown_scope_queues_is_404(client: TestClient, acme: dict) -> None:
    status, body = await get_json(
        client, "/v1/modules/scaiqueue/scopes/scope_missing/queues", acme
    )
    assert status == 404
    assert body["error"]["code"] == "scope_not_found"


async def test_bunkers_cover_each_lifecycle_and_status(
    client: TestClient, acme: dict
) -> None:
    status, body = await get_json(client, "/v1/modules/scaibunker/bunkers", acme)
    combinations = {(b["lifecycle"], b["status"]) for b in body["data"]}
    assert status == 200
    assert body["status"] == "ok"
    for lifecycle in ("ephemeral", "persistent"):
        for state in (
            "running",
            "ready",
            "starting",
            "stopped",
            "destroyed",
            "failed",
            "terminated",
        ):
            assert (lifecycle, state) in combinations
    assert all(b["image_ref"] and b["bunker_id"] for b in body["data"])


async def test_models_native_shape(client: TestClient, acme: dict) -> None:
    _, body = await get_json(client, "/v1/models", acme)
    models = body["data"]
    assert isinstance(models, list)
    assert models[0] == {
        "slug": "openai/gpt-4o",
        "display_name": "GPT-4o",
        "modality": "chat",
        "context_window": 128000,
        "max_output_tokens": 16384,
    }
    assert any("display_name" not in model for model in models)
    assert any("modality" not in model for model in models)


async def test_models_items_shape_pages(
    client: TestClient, sim: Simulator, acme: dict
) -> None:
    sim.options.models_shape = "items"
    slugs: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"cursor": cursor} if cursor else {}
        _, body = await get_json(client, "/v1/models", acme, **params)
        slugs += [model["slug"] for model in body["data"]["items"]]
        pages += 1
        cursor = body["data"]["next_cursor"]
        if cursor is None:
            break
    assert pages == 2
    assert len(slugs) == 6
    assert len(set(slugs)) == 6


async def test_models_openai_shape(
    client: TestClient, sim: Simulator, acme: dict
) -> None:
    sim.options.models_shape = "openai"
    _, body = await get_json(client, "/v1/models", acme)
    assert body["object"] == "list"
    assert body["data"][0]["id"] == "openai/gpt-4o"
    assert body["data"][0]["object"] == "model"
    assert body["data"][0]["owned_by"] == "openai"
    assert body["data"][0]["context_window"] == 128000


async def test_oai_models_always_openai_shape(
    client: TestClient, sim: Simulator, acme: dict
) -> None:
    for shape in ("native", "items"):
        sim.options.models_shape = shape
        _, body = await get_json(client, "/oai/v1/models", acme)
        assert body["object"] == "list"
        assert {model["object"] for model in body["data"]} == {"model"}


# --- ScaiVault -------------------------------------------------------------------

VAULT = "/scaivault/v1/secrets"


@pytest.fixture
def vault_auth() -> dict[str, str]:
    return bearer("dev-vault-token")


async def test_vault_returns_seeded_tenant_key(
    client: TestClient, sim: Simulator, vault_auth: dict
) -> None:
    response = await client.get(
        f"{VAULT}/tenants/acme/scaigrid_api_key", headers=vault_auth
    )
    secret = await response.json()
    assert response.status == 200
    assert secret["path"] == "tenants/acme/scaigrid_api_key"
    assert secret["secret_type"] == "api_key"
    assert secret["version"] == 1
    assert secret["data"] == {"value": sim.demo_api_keys["acme"]}
    assert {"created_at", "updated_at"} <= set(secret)


async def test_vault_put_increments_version(
    client: TestClient, vault_auth: dict
) -> None:
    path = f"{VAULT}/tenants/initech/scaigrid_base_url"
    first = await client.put(
        path,
        headers=vault_auth,
        json={"data": {"value": "http://a"}, "secret_type": "url"},
    )
    second = await client.put(
        path,
        headers=vault_auth,
        json={"data": {"value": "http://b"}, "secret_type": "url"},
    )
    fetched = await (await client.get(path, headers=vault_auth)).json()
    assert first.status == 200
    assert (await first.json())["version"] == 1
    assert (await second.json())["version"] == 2
    assert fetched["data"] == {"value": "http://b"}
    assert fetched["secret_type"] == "url"


async def test_vault_missing_secret_is_404(
    client: TestClient, vault_auth: dict
) -> None:
    response = await client.get(
        f"{VAULT}/tenants/nobody/scaigrid_api_key", headers=vault_auth
    )
    body = await response.json()
    assert response.status == 404
    assert body["error"] == "secret_not_found"
    assert body["request_id"] == response.headers["X-Request-ID"]


@pytest.mark.parametrize(
    "headers",
    [{}, bearer("wrong"), {"Authorization": "dev-vault-token"}],
)
async def test_vault_rejects_bad_token(
    client: TestClient, headers: dict[str, str]
) -> None:
    get = await client.get(f"{VAULT}/tenants/acme/scaigrid_api_key", headers=headers)
    put = await client.put(
        f"{VAULT}/tenants/acme/scaigrid_api_key", headers=headers, json={"data": {}}
    )
    assert get.status == 401
    assert put.status == 401
    assert (await get.json())["error"] == "unauthorized"


@pytest.mark.parametrize(
    "raw_path", ["tenants/%2E%2E/acme/x", "tenants//x", "tenants/a%20b", "%2E"]
)
async def test_vault_rejects_path_traversal(
    client: TestClient, vault_auth: dict, raw_path: str
) -> None:
    url = URL(f"{VAULT}/{raw_path}", encoded=True)
    response = await client.get(url, headers=vault_auth)
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_path"


async def test_vault_rejects_raw_dot_segments(sim: Simulator) -> None:
    """HTTP clients normalise "..", so this test writes the request line itself."""
    base_url = await sim.start()
    port = int(base_url.rsplit(":", 1)[1])
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /scaivault/v1/secrets/tenants/../../etc/passwd HTTP/1.1\r\n"
            b"Host: 127.0.0.1\r\nAuthorization: Bearer dev-vault-token\r\n"
            b"Connection: close\r\n\r\n"
        )
        await writer.drain()
        response = await reader.read()
        writer.close()
        await writer.wait_closed()
    finally:
        await sim.stop()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert json.loads(body)["error"] == "invalid_path"


@pytest.mark.parametrize("body", [{"data": "x"}, {}, {"data": {}, "secret_type": 5}])
async def test_vault_put_rejects_bad_body(
    client: TestClient, vault_auth: dict, body: dict[str, Any]
) -> None:
    response = await client.put(f"{VAULT}/a/b", headers=vault_auth, json=body)
    assert response.status == 422
    assert (await response.json())["error"] == "invalid_request"


# --- faults and controls ---------------------------------------------------------


async def test_error_rate_one_returns_500_envelope(
    aiohttp_client: ClientFactory,
) -> None:
    sim = Simulator(SimOptions(error_rate=1.0))
    client = await aiohttp_client(sim.app())
    response = await client.get(
        f"{SCAICORE}/cores", headers=bearer(sim.mint_token("acme"))
    )
    body = await response.json()
    assert response.status == 500
    assert body["status"] == "error"
    assert body["error"]["code"] == "internal_error"
    assert body["meta"]["request_id"] == response.headers["X-Request-ID"]


async def test_error_rate_half_fails_some_requests(
    client: TestClient, sim: Simulator, acme: dict
) -> None:
    sim.options.error_rate = 0.5
    statuses = [
        (await client.get(f"{SCAICORE}/cores", headers=acme)).status for _ in range(40)
    ]
    assert 500 in statuses
    assert 200 in statuses


async def test_error_rate_does_not_touch_vault(
    client: TestClient, sim: Simulator, vault_auth: dict
) -> None:
    sim.options.error_rate = 1.0
    response = await client.get(
        f"{VAULT}/tenants/acme/scaigrid_api_key", headers=vault_auth
    )
    assert response.status == 200


async def test_rate_limit_answers_429_with_headers(
    client: TestClient, sim: Simulator, acme: dict, globex: dict
) -> None:
    sim.options.rate_limit_per_minute = 2
    first = await client.get(f"{SCAICORE}/cores", headers=acme)
    await client.get(f"{SCAICORE}/cores", headers=acme)
    limited = await client.get(f"{SCAICORE}/cores", headers=acme)
    other_tenant = await client.get(f"{SCAICORE}/cores", headers=globex)
    body = await limited.json()

    assert first.headers["X-Scaigrid-Ratelimit-Limit"] == "2"
    assert first.headers["X-Scaigrid-Ratelimit-Remaining"] == "1"
    assert limited.status == 429
    assert body["error"]["code"] == "rate_limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert body["error"]["retry_after"] == int(limited.headers["Retry-After"])
    assert limited.headers["X-Scaigrid-Ratelimit-Remaining"] == "0"
    assert int(limited.headers["X-Scaigrid-Ratelimit-Reset"]) > time.time()
    assert other_tenant.status == 200


async def test_latency_delays_scaigrid_responses(sim: Simulator) -> None:
    sim.options.latency_ms = 150
    base_url = await sim.start()
    try:
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            async with session.get(
                f"{base_url}{SCAICORE}/cores", headers=bearer(sim.mint_token("acme"))
            ) as response:
                assert response.status == 200
            elapsed = time.monotonic() - started
    finally:
        await sim.stop()
    assert elapsed >= 0.15


async def test_fault_route_changes_options(client: TestClient, sim: Simulator) -> None:
    response = await client.post(
        "/_sim/faults", json={"error_rate": 0.25, "models_shape": "openai"}
    )
    data = (await response.json())["data"]
    assert response.status == 200
    assert data["error_rate"] == 0.25
    assert sim.options.models_shape == "openai"
    assert sim.options.latency_ms == 0.0


@pytest.mark.parametrize(
    "body",
    [
        {"error_rate": 2},
        {"latency_ms": -1},
        {"models_shape": "xml"},
        {"rate_limit_per_minute": 0},
        {"rate_limit_per_minute": "10"},
        {"jitter": 1},
    ],
)
async def test_fault_route_rejects_bad_values(
    client: TestClient, sim: Simulator, body: dict[str, Any]
) -> None:
    response = await client.post("/_sim/faults", json=body)
    assert response.status == 422
    assert sim.options.error_rate == 0.0


async def test_key_route_adds_api_key(client: TestClient) -> None:
    api_key = "sgk_" + "Z" * 36
    response = await client.post(
        "/_sim/keys", json={"api_key": api_key, "tenant_id": "initech"}
    )
    created = (await response.json())["data"]
    status, _ = await get_json(client, f"{SCAICORE}/cores", bearer(api_key))
    assert response.status == 201
    assert api_key not in json.dumps(created)
    assert status == 200


async def test_key_route_rejects_bad_key(client: TestClient) -> None:
    response = await client.post(
        "/_sim/keys", json={"api_key": "sgk_short", "tenant_id": "acme"}
    )
    assert response.status == 422


async def test_request_log_records_kind_not_secret(
    client: TestClient, sim: Simulator, acme: dict
) -> None:
    api_key = sim.demo_api_keys["globex"]
    await client.get(f"{SCAICORE}/events", headers=acme, params={"cursor": "a+b"})
    await client.get(f"{SCAICORE}/cores", headers=bearer(api_key))
    await client.get(f"{SCAICORE}/cores")
    response = await client.get("/_sim/requests", params={"limit": "3"})
    records = (await response.json())["data"]

    assert [r["auth"] for r in records] == ["jwt", "sgk", "none"]
    assert [r["tenant_id"] for r in records] == ["acme", "globex", None]
    assert [r["status"] for r in records] == [400, 200, 401]
    assert records[0]["query_string"] == "cursor=a%2Bb"
    assert "authorization" in records[0]["header_names"]
    assert api_key not in json.dumps(records)
    assert acme["Authorization"][7:] not in json.dumps(records)
    assert list(sim.recorded_requests)[-3:] == records


async def test_request_log_time_is_completion(
    client: TestClient, sim: Simulator, acme: dict
) -> None:
    sim.options.latency_ms = 300
    sent = time.time()
    await client.get(f"{SCAICORE}/cores", headers=acme)
    response = await client.get("/_sim/requests", params={"limit": "1"})
    record = (await response.json())["data"][0]
    recorded = datetime.fromisoformat(record["time"]).timestamp()
    assert recorded >= sent + 0.29


async def test_request_log_limit_is_validated(client: TestClient) -> None:
    response = await client.get("/_sim/requests", params={"limit": "0"})
    assert response.status == 422


# --- background activity, lifecycle and command line -----------------------------


async def test_background_activity_keeps_events_flowing() -> None:
    sim = Simulator(SimOptions(activity_interval_s=0.02))
    before = sim.state.tenants["acme"].last_event_seq
    await sim.start()
    await asyncio.sleep(0.3)
    await sim.stop()
    after_stop = sim.state.tenants["acme"].last_event_seq
    await asyncio.sleep(0.1)

    assert after_stop > before
    assert sim.state.tenants["globex"].event_dicts()
    assert sim.state.tenants["acme"].last_event_seq == after_stop
    assert sim.state.tenants["acme"].pending_checkpoints() <= MAX_BACKGROUND_PENDING


async def test_start_sets_service_urls(sim: Simulator) -> None:
    base_url = await sim.start()
    try:
        assert base_url.startswith("http://127.0.0.1:")
        assert sim.base_url == base_url
        assert (
            sim.jwks_url == base_url + "/scaikey/api/v1/platform/.well-known/jwks.json"
        )
        assert sim.vault_url == base_url + "/scaivault"
    finally:
        await sim.stop()
    with pytest.raises(RuntimeError):
        sim.base_url


def test_default_seed_gives_documented_demo_keys() -> None:
    assert Simulator().demo_api_keys == {
        "acme": "sgk_wfMG4E7YiEJ38nXpyxRofkc1wbX9wEQ2sQb6Bval",
        "globex": "sgk_HsJlVt8x7WyPcoDdNYKaqWewohKxbwGQOm5bm3WQ",
    }


def test_same_seed_gives_same_demo_keys() -> None:
    assert Simulator().demo_api_keys == Simulator().demo_api_keys
    assert Simulator(SimOptions(seed=8)).demo_api_keys != Simulator().demo_api_keys


def test_options_reject_out_of_range_values() -> None:
    with pytest.raises(ValueError):
        SimOptions(error_rate=1.5)
    with pytest.raises(ValueError):
        SimOptions(models_shape="xml")
    with pytest.raises(ValueError):
        SimOptions(activity_interval_s=0)


def test_main_rejects_bad_error_rate(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--error-rate", "2"])
    assert exit_info.value.code == 2
    assert "error_rate" in capsys.readouterr().err
