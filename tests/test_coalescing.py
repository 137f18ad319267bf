"""Coalesced routes: identical requests in flight share one run of the handler.

A test plugin serves coalesced routes whose handler counts its runs, records
who started each run, calls a real upstream server and delays its response until
the test releases it, so that every request of a batch is in flight at once.
"""

from __future__ import annotations

import asyncio
import gc
import json
from typing import Any

import pytest
from aiohttp import web
from conftest import base_config, bearer, mint
from pydantic import BaseModel, ConfigDict

from scaiproxy import ProxyError, RouteSpec, hookimpl
from scaiproxy.app import METRICS
from scaiproxy.dispatch import SharedRuns
from scaiproxy.routes import Call
from scaiproxy.upstream import UpstreamCaller

ENV_KEY = "sgk_" + "c" * 40
VIEW = "scaicore:view"


class ItemsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = "all"


class Counted:
    """Coalesced routes that record every run of their handler."""

    def __init__(self) -> None:
        self.runs: list[dict[str, Any]] = []
        self.release = asyncio.Event()

    async def _run(self, call: Call, **extra: Any) -> dict[str, Any]:
        number = len(self.runs) + 1
        self.runs.append(
            {"tenant": call.principal.tenant_id, "sub": call.principal.sub, **extra}
        )
        await asyncio.wait_for(self.release.wait(), 10)
        response = await call.upstream.get("/v1/items")
        return {"run": number, "tenant": call.principal.tenant_id, **response.json()}

    @hookimpl
    def scaiproxy_routes(self) -> list[RouteSpec]:
        async def items(call: Call) -> Any:
            return await self._run(call, kind=call.query.kind)

        async def item(call: Call) -> Any:
            return await self._run(call, item=call.params["item_id"])

        async def failing(call: Call) -> Any:
            self.runs.append({"tenant": call.principal.tenant_id})
            await asyncio.wait_for(self.release.wait(), 10)
            raise ProxyError(409, "conflict", "The items changed; try again.")

        async def response(call: Call) -> Any:
            self.runs.append({"tenant": call.principal.tenant_id})
            return web.json_response({"data": "hand-made"})

        async def moved(call: Call) -> Any:
            self.runs.append({"tenant": call.principal.tenant_id})
            await asyncio.wait_for(self.release.wait(), 10)
            raise web.HTTPFound("/api/v1/items")

        common = {"permission": VIEW, "coalesce": True}
        return [
            RouteSpec(
                "GET", "/v1/items", items, name="items", query=ItemsQuery, **common
            ),
            RouteSpec("GET", "/v1/items/{item_id}", item, name="item", **common),
            RouteSpec("GET", "/v1/failing", failing, name="failing", **common),
            RouteSpec("GET", "/v1/response", response, name="response", **common),
            RouteSpec("GET", "/v1/moved", moved, name="moved", **common),
        ]


def config(upstream_url: str, jwks_url: str, **sections: Any) -> dict[str, Any]:
    sections.setdefault("plugins", {"enabled": ["scaicore", "counted"]})
    return base_config(upstream_url, jwks_url, **sections)


@pytest.fixture
def counted() -> Counted:
    return Counted()


@pytest.fixture
async def items_upstream(upstream):
    upstream.route("GET", "/v1/items", json_body={"items": ["a", "b"]})
    return upstream


@pytest.fixture
async def gateway(make_gateway, items_upstream, jwks_server, counted):
    """Forwards each caller's own token (``auto``, no secret store)."""
    raw = config(items_upstream.base_url, jwks_server.url)
    return await make_gateway(raw, plugins={"counted": counted})


@pytest.fixture
async def key_gateway(make_gateway, items_upstream, jwks_server, counted):
    """Sends the one development key for every tenant (``api_key``)."""
    raw = config(
        items_upstream.base_url,
        jwks_server.url,
        auth={"upstream_credentials": "api_key"},
    )
    return await make_gateway(
        raw, environ={"SCAIGRID_API_KEY": ENV_KEY}, plugins={"counted": counted}
    )


def viewer(rsa_key, **claims: Any) -> dict[str, str]:
    claims.setdefault("permissions", [VIEW])
    return bearer(mint(rsa_key, **claims))


async def wait_for_runs(counted: Counted, count: int) -> None:
    for _ in range(500):
        if len(counted.runs) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(counted.runs)} runs started, expected {count}")


async def wait_for_joined(client, route: str, count: int) -> None:
    """Wait until ``count`` requests of ``route`` wait on a run in flight."""
    registry = client.app[METRICS].registry
    joined = None
    for _ in range(500):
        joined = registry.get_sample_value(
            "scaiproxy_coalesced_requests_total", {"route": route}
        )
        if joined == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{joined} requests joined a run, expected {count}")


async def held_batch(client, counted, requests, route: str, joined: int) -> list:
    """Send ``(path, headers)`` requests at once, release the runs once
    ``joined`` requests wait on one; returns ``(status, body, headers)`` each."""

    async def send(path: str, headers: dict[str, str]) -> tuple[int, Any, Any]:
        async with client.get(path, headers=headers) as response:
            return response.status, await response.json(), response.headers

    pending = asyncio.gather(*(send(path, headers) for path, headers in requests))
    await wait_for_joined(client, route, joined)
    counted.release.set()
    return await pending


async def test_identical_requests_share_one_run(
    gateway, items_upstream, counted, rsa_key
):
    headers = viewer(rsa_key)
    results = await held_batch(
        gateway, counted, [("/api/v1/items", headers)] * 20, "items", joined=19
    )
    statuses = [status for status, _, _ in results]
    request_ids = {answer["X-Request-ID"] for _, _, answer in results}
    assert statuses == [200] * 20
    assert all(
        body == {"data": {"run": 1, "tenant": "acme", "items": ["a", "b"]}}
        for _, body, _ in results
    )
    assert len(counted.runs) == 1
    assert len(items_upstream.requests) == 1
    assert len(request_ids) == 20


async def test_runs_forgotten_once_finished(gateway, counted, rsa_key):
    headers = viewer(rsa_key)
    counted.release.set()
    first = await gateway.get("/api/v1/items", headers=headers)
    second = await gateway.get("/api/v1/items", headers=headers)
    assert (await first.json())["data"]["run"] == 1
    assert (await second.json())["data"]["run"] == 2


async def test_user_tokens_run_apart(gateway, items_upstream, counted, rsa_key):
    """Forwarded user tokens are different credentials: no sharing across users."""
    ann = viewer(rsa_key, sub="ann")
    bob = viewer(rsa_key, sub="bob")
    requests = [("/api/v1/items", ann), ("/api/v1/items", bob)] * 3
    results = await held_batch(gateway, counted, requests, "items", joined=4)
    sent = {request.headers["Authorization"] for request in items_upstream.requests}
    assert [status for status, _, _ in results] == [200] * 6
    assert sorted(run["sub"] for run in counted.runs) == ["ann", "bob"]
    assert sent == {ann["Authorization"], bob["Authorization"]}


async def test_tenant_key_shared_by_users(key_gateway, counted, rsa_key):
    """Users of one tenant whose calls use one key share a run, as their
    upstream calls would be identical."""
    requests = [("/api/v1/items", viewer(rsa_key, sub=f"user-{n}")) for n in range(6)]
    results = await held_batch(key_gateway, counted, requests, "items", joined=5)
    assert [status for status, _, _ in results] == [200] * 6
    assert len(counted.runs) == 1


async def test_tenants_run_apart_with_one_key(
    key_gateway, items_upstream, counted, rsa_key
):
    """The development key serves every tenant, but runs, and their upstream
    calls, never cross tenants."""
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def held_items(request: web.Request) -> web.Response:
        if len(items_upstream.requests) == 2:
            arrived.set()
        await asyncio.wait_for(release.wait(), 10)
        return web.json_response({"items": ["a", "b"]})

    items_upstream.route("GET", "/v1/items", held_items)
    requests = [
        ("/api/v1/items", viewer(rsa_key, tenant_id=tenant))
        for tenant in ("acme", "globex")
        for _ in range(4)
    ]
    batch = asyncio.ensure_future(
        held_batch(key_gateway, counted, requests, "items", joined=6)
    )
    # Both runs' calls must be in flight at once: shared, only one would come.
    try:
        await asyncio.wait_for(arrived.wait(), 2)
    except TimeoutError:
        pass
    release.set()
    results = await batch
    tenants = [body["data"]["tenant"] for _, body, _ in results]
    assert sorted(run["tenant"] for run in counted.runs) == ["acme", "globex"]
    assert tenants == ["acme"] * 4 + ["globex"] * 4
    assert len(items_upstream.requests) == 2


async def test_queries_run_apart(gateway, counted, rsa_key):
    headers = viewer(rsa_key)
    requests = [
        ("/api/v1/items?kind=open", headers),
        ("/api/v1/items?kind=done", headers),
    ] * 2
    results = await held_batch(gateway, counted, requests, "items", joined=2)
    assert [status for status, _, _ in results] == [200] * 4
    assert sorted(run["kind"] for run in counted.runs) == ["done", "open"]


async def test_path_parameters_run_apart(gateway, counted, rsa_key):
    headers = viewer(rsa_key)
    requests = [("/api/v1/items/a", headers), ("/api/v1/items/b", headers)] * 2
    results = await held_batch(gateway, counted, requests, "item", joined=2)
    assert [status for status, _, _ in results] == [200] * 4
    assert sorted(run["item"] for run in counted.runs) == ["a", "b"]


async def test_permission_checked_for_each_request(key_gateway, counted, rsa_key):
    """A caller without the permission never gets the shared result."""
    allowed = viewer(rsa_key, sub="ann")
    pending = asyncio.gather(
        *(key_gateway.get("/api/v1/items", headers=allowed) for _ in range(3))
    )
    await wait_for_joined(key_gateway, "items", 2)
    denied = await key_gateway.get(
        "/api/v1/items", headers=viewer(rsa_key, sub="eve", permissions=[])
    )
    counted.release.set()
    responses = await pending
    assert denied.status == 403
    assert (await denied.json())["detail"]["error"] == "insufficient_scope"
    assert [response.status for response in responses] == [200] * 3


async def test_invalid_query_rejected_while_run_held(gateway, counted, rsa_key):
    headers = viewer(rsa_key)
    pending = asyncio.gather(
        *(gateway.get("/api/v1/items", headers=headers) for _ in range(2))
    )
    await wait_for_joined(gateway, "items", 1)
    invalid = await gateway.get("/api/v1/items?colour=red", headers=headers)
    counted.release.set()
    await pending
    assert invalid.status == 422
    assert (await invalid.json())["detail"]["error"] == "validation_error"


async def test_error_shared_by_waiting_requests(gateway, counted, rsa_key):
    headers = viewer(rsa_key)
    results = await held_batch(
        gateway, counted, [("/api/v1/failing", headers)] * 5, "failing", joined=4
    )
    errors = {body["detail"]["error"] for _, body, _ in results}
    assert [status for status, _, _ in results] == [409] * 5
    assert errors == {"conflict"}
    assert len(counted.runs) == 1


async def test_response_from_coalesced_route_is_500(
    gateway, counted, rsa_key, log_stream
):
    response = await gateway.get("/api/v1/response", headers=viewer(rsa_key))
    body = await response.json()
    lines = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    errors = [line for line in lines if line["event"] == "unhandled_error"]
    assert response.status == 500
    assert body["detail"]["error"] == "internal_error"
    assert "must return data, not a response" in json.dumps(errors)


@pytest.mark.parametrize("coalesce_gets", [True, False])
async def test_redirect_from_coalesced_route_is_500(
    make_gateway, items_upstream, jwks_server, counted, rsa_key, coalesce_gets
):
    """One raised redirect is one response object, which only one of several
    waiting requests could be sent: every request gets the same 500 instead."""
    raw = config(
        items_upstream.base_url,
        jwks_server.url,
        upstream={"coalesce_gets": coalesce_gets},
    )
    client = await make_gateway(raw, plugins={"counted": counted})
    headers = viewer(rsa_key)
    pending = asyncio.gather(
        *(
            client.get("/api/v1/moved", headers=headers, allow_redirects=False)
            for _ in range(3)
        )
    )
    if coalesce_gets:
        await wait_for_joined(client, "moved", 2)
    else:
        await wait_for_runs(counted, 3)
    counted.release.set()
    responses = await asyncio.wait_for(pending, 10)
    errors = {(await response.json())["detail"]["error"] for response in responses}
    assert [response.status for response in responses] == [500] * 3
    assert errors == {"internal_error"}


async def test_coalescing_off_runs_each_request(
    make_gateway, items_upstream, jwks_server, counted, rsa_key
):
    raw = config(
        items_upstream.base_url, jwks_server.url, upstream={"coalesce_gets": False}
    )
    client = await make_gateway(raw, plugins={"counted": counted})
    headers = viewer(rsa_key)
    pending = asyncio.gather(
        *(client.get("/api/v1/items", headers=headers) for _ in range(4))
    )
    await wait_for_runs(counted, 4)
    counted.release.set()
    responses = await pending
    assert [response.status for response in responses] == [200] * 4
    assert len(counted.runs) == 4


async def test_waiting_requests_logged_with_upstream_fields(
    gateway, counted, rsa_key, log_stream
):
    headers = viewer(rsa_key)
    results = await held_batch(
        gateway, counted, [("/api/v1/items", headers)] * 3, "items", joined=2
    )
    lines = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    access = [line for line in lines if line["event"] == "request"]
    assert len(access) == 3
    assert {line["request_id"] for line in access} == {
        answer["X-Request-ID"] for _, _, answer in results
    }
    assert {line["upstream_status"] for line in access} == {200}
    assert {line["credential_source"] for line in access} == {"user_jwt"}


async def test_me_answers_each_user(key_gateway, rsa_key):
    """GET /v1/me is not coalesced: each user sees their own identity."""
    users = [f"user-{n}" for n in range(8)]
    responses = await asyncio.gather(
        *(
            key_gateway.get("/api/v1/me", headers=viewer(rsa_key, sub=user))
            for user in users
        )
    )
    subs = [(await response.json())["data"]["sub"] for response in responses]
    assert subs == users


# --- SharedRuns itself --------------------------------------------------------


def caller() -> UpstreamCaller:
    return UpstreamCaller(None, None, "req-1", 1.0, "route", None)  # type: ignore[arg-type]


async def test_cancelled_waiter_spares_run():
    runs = SharedRuns()
    release = asyncio.Event()

    async def work() -> str:
        await release.wait()
        return "result"

    run = runs.start(("key",), work(), caller())
    first = asyncio.ensure_future(run.waiter())
    second = asyncio.ensure_future(run.waiter())
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    release.set()
    assert await second == "result"
    assert first.cancelled()
    assert not run.future.cancelled()


async def test_waiter_after_run_finished_settles():
    runs = SharedRuns()

    async def work() -> int:
        return 7

    run = runs.start(("key",), work(), caller())
    await run.future
    await asyncio.sleep(0)
    assert await asyncio.wait_for(run.waiter(), 1) == 7


async def test_finished_run_leaves_table():
    runs = SharedRuns()

    async def work() -> str:
        raise ProxyError(502, "bad_gateway", "ScaiGrid failed.")

    run = runs.start(("key",), work(), caller())
    with pytest.raises(ProxyError):
        await run.waiter()
    await asyncio.sleep(0)
    assert runs.get(("key",)) is None
    assert len(runs) == 0


async def test_unawaited_failed_run_leaves_no_cycle():
    """A run whose every waiter was cancelled, and that then fails, is freed
    by reference counting although its frames held the futures that held
    its error (as UpstreamClient.request holds the shared upstream call)."""

    class Marker:
        """Stands for the request that the run's Call refers to."""

    async def failing() -> None:
        await asyncio.sleep(0.02)
        raise ProxyError(502, "bad_gateway", "ScaiGrid answered HTTP 500.")

    async def work(marker: Marker) -> None:
        shared = asyncio.ensure_future(failing())
        await asyncio.shield(shared)

    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        runs = SharedRuns()
        run = runs.start(("key",), work(Marker()), caller())
        waiter = asyncio.ensure_future(run.waiter())
        await asyncio.sleep(0)
        waiter.cancel()
        del run, waiter
        await asyncio.sleep(0.1)
        gc.collect()
        kinds = {type(item).__name__ for item in gc.garbage}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert "Marker" not in kinds
    assert "ProxyError" not in kinds


@pytest.mark.parametrize(("method", "authenticated"), [("POST", True), ("GET", False)])
def test_coalesce_needs_authenticated_get(method, authenticated):
    async def handler(call: Call) -> Any:
        return None

    with pytest.raises(ValueError, match="only authenticated GET routes can coalesce"):
        RouteSpec(
            method,
            "/v1/x",
            handler,
            name="x",
            authenticated=authenticated,
            coalesce=True,
        )


def test_coalesce_rejects_request_body():
    async def handler(call: Call) -> Any:
        return None

    with pytest.raises(ValueError, match="a coalesced route cannot take a request"):
        RouteSpec("GET", "/v1/x", handler, name="x", body=ItemsQuery, coalesce=True)
