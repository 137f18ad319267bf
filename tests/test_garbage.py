"""Requests leave no reference cycles behind.

Only the cyclic garbage collector frees an object in a cycle, and under load its
passes over every request's leftovers cost a large share of the CPU time. These
tests collect what the collector finds after a batch of requests through a real
gateway and a real upstream server. They fail when a request, a Call or any
other gateway object is among it.
"""

from __future__ import annotations

import asyncio
import gc

import pytest
from aiohttp import web
from conftest import base_config, bearer, mint

from scaiproxy.app import METRICS

EVENTS = {"data": {"events": [{"event_id": "e1", "seq": 1}], "next_cursor": None}}
REQUESTS = 40


def _ours(garbage: list[object]) -> list[str]:
    """Return the type names of the gateway and aiohttp request objects in ``garbage``."""
    names = []
    for item in garbage:
        kind = type(item)
        module = kind.__module__ or ""
        if module.startswith("scaiproxy") or kind is web.Request:
            names.append(f"{module}.{kind.__qualname__}")
    return sorted(set(names))


async def _garbage_after(
    client, method: str, path: str, headers: dict, batch: int = 1, **kwargs
):
    """Send ``REQUESTS`` requests, ``batch`` at a time, and collect the garbage."""

    async def send() -> int:
        async with client.request(method, path, headers=headers, **kwargs) as response:
            await response.read()
            return response.status

    # Warm up first: caches and pools fill on the first requests.
    for _ in range(3):
        await send()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    statuses = set()
    try:
        for _ in range(REQUESTS // batch):
            statuses.update(await asyncio.gather(*(send() for _ in range(batch))))
        gc.collect()
        garbage = list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    return statuses, _ours(garbage)


@pytest.fixture
async def client(make_gateway, upstream, jwks_server):
    upstream.route("GET", "/v1/modules/scaicore/events", json_body=EVENTS)
    upstream.route(
        "GET",
        "/v1/modules/scaicore/checkpoints",
        json_body={"status": "error", "error": {"code": "boom", "message": "down"}},
        status=500,
    )
    return await make_gateway(base_config(upstream.base_url, jwks_server.url))


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/v1/scaicore/events?limit=5", 200),
        # ScaiGrid's 500 becomes a 502 raised from deep in the upstream client.
        ("/api/v1/scaicore/checkpoints", 502),
        # Rejected before any upstream call.
        ("/api/v1/scaicore/events?limit=abc", 422),
        ("/api/v1/me", 200),
    ],
)
async def test_requests_leave_no_cycles(client, rsa_key, path, status):
    headers = bearer(mint(rsa_key, permissions=["scaicore:view"]))
    statuses, ours = await _garbage_after(client, "GET", path, headers)
    assert statuses == {status}
    assert ours == []


@pytest.mark.parametrize(
    ("path", "route", "status"),
    [
        ("/api/v1/scaicore/events?limit=5", "scaicore.events", 200),
        ("/api/v1/scaicore/checkpoints", "scaicore.checkpoints", 502),
    ],
)
async def test_coalesced_batches_leave_no_cycles(client, rsa_key, path, route, status):
    """Requests that wait on another request's run, its result or its error."""
    headers = bearer(mint(rsa_key, permissions=["scaicore:view"]))
    statuses, ours = await _garbage_after(client, "GET", path, headers, batch=8)
    registry = client.app[METRICS].registry
    joined = registry.get_sample_value(
        "scaiproxy_coalesced_requests_total", {"route": route}
    )
    assert statuses == {status}
    assert ours == []
    assert joined > 0


async def test_rejected_callers_leave_no_cycles(client, rsa_key):
    statuses, ours = await _garbage_after(client, "GET", "/api/v1/scaicore/events", {})
    assert statuses == {401}
    assert ours == []
    headers = bearer(mint(rsa_key, permissions=["other:view"]))
    statuses, ours = await _garbage_after(
        client, "GET", "/api/v1/scaicore/events", headers
    )
    assert statuses == {403}
    assert ours == []
