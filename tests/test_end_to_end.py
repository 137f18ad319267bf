"""The whole path over real sockets: the gateway in front of the ScaiGrid simulator.

A Core is invoked, its events are paged with cursors until each has been seen
once, its pending checkpoint is listed and resolved, and the rest of the
execution appears in the events. The same runs for a tenant whose only
credential is a stored ScaiGrid key.
"""

from __future__ import annotations

import json

import pytest

from conftest import bearer

CORE = "core_invoice_review"


def gateway_config(sim, mode: str, secrets_path) -> dict:
    return {
        "upstream": {"base_url": sim.base_url, "timeout_s": 10},
        "auth": {
            "mode": "scaikey",
            "jwks_url": sim.jwks_url,
            "issuers": [sim.options.issuer],
            "audience": sim.options.audience,
            "upstream_credentials": mode,
        },
        "secrets": {"backend": "file", "file": {"path": str(secrets_path)}},
        "logging": {"level": "info", "format": "json"},
        "plugins": {"enabled": ["scaicore", "lookups", "tenants"]},
    }


async def page_events(client, token: str, cursor: str | None) -> tuple[list, str]:
    """Follow cursors until an empty page; returns the events and the last cursor."""
    seen = []
    for _ in range(200):
        params = {"core_id": CORE, "limit": "3"}
        if cursor:
            params["cursor"] = cursor
        response = await client.get(
            "/api/v1/scaicore/events", params=params, headers=bearer(token)
        )
        assert response.status == 200, await response.text()
        page = (await response.json())["data"]
        seen.extend(page["events"])
        if not page["events"]:
            return seen, cursor
        cursor = page["next_cursor"] or cursor
    raise AssertionError("the events never ran out")


@pytest.mark.parametrize("mode", ["auto", "api_key"], ids=["user-jwt", "stored-key"])
async def test_invoke_pause_resolve_complete(make_gateway, simulator, tmp_path, mode):
    tenant = "acme" if mode == "auto" else "globex"
    secrets_path = tmp_path / "secrets.json"
    if mode == "api_key":
        key = simulator.demo_api_keys[tenant]
        secrets_path.write_text(json.dumps({f"tenants/{tenant}/scaigrid_api_key": key}))
    client = await make_gateway(gateway_config(simulator, mode, secrets_path))
    token = simulator.mint_token(tenant, roles=["tenant_admin"])

    _, cursor = await page_events(client, token, None)
    response = await client.post(
        f"/api/v1/scaicore/cores/{CORE}/invoke",
        json={"input": {"invoice_id": "inv_7", "amount": 2**70}},
        headers=bearer(token),
    )
    assert response.status == 200
    invoked = (await response.json())["data"]
    execution = invoked["execution_id"]
    assert invoked["status"] == "paused"

    before, cursor = await page_events(client, token, cursor)
    mine = [event for event in before if event["payload"]["execution_id"] == execution]
    ids = [event["id"] for event in before]
    assert len(ids) == len(set(ids))
    assert mine[0]["type"] == "scaicore.runtime.invocation.started"
    assert mine[0]["payload"]["input"]["amount"] == 2**70
    assert mine[-1]["type"] == "scaicore.runtime.block.entered"
    assert mine[-1]["payload"]["block_kind"] == "checkpoint"

    response = await client.get(
        "/api/v1/scaicore/checkpoints",
        params={"core_id": CORE, "status": "pending"},
        headers=bearer(token),
    )
    checkpoints = (await response.json())["data"]["checkpoints"]
    waiting = [item for item in checkpoints if item["execution_id"] == execution]
    assert len(waiting) == 1
    assert waiting[0]["checkpoint_type"] == "hitl_review"

    response = await client.post(
        f"/api/v1/scaicore/checkpoints/{waiting[0]['id']}/resolve",
        json={"resolution": waiting[0]["options"][0], "comment": "Within budget."},
        headers=bearer(token),
    )
    assert response.status == 200
    assert (await response.json())["data"]["status"] == "resolved"

    after, _ = await page_events(client, token, cursor)
    rest = [event for event in after if event["payload"]["execution_id"] == execution]
    all_ids = ids + [event["id"] for event in after]
    assert len(all_ids) == len(set(all_ids))
    assert rest[0]["type"] == "scaicore.runtime.block.exited"
    assert rest[-1]["type"] == "scaicore.runtime.invocation.completed"

    upstream_kinds = {
        record["auth"]
        for record in simulator.recorded_requests
        if record["path"].startswith("/v1/")
    }
    assert upstream_kinds == ({"jwt"} if mode == "auto" else {"sgk"})
