"""The ScaiCore plugin through the whole app, against a recording ScaiGrid."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web
from conftest import base_config, bearer, mint

from scaiproxy.app import create_app
from scaiproxy.config import settings_from_mapping
from scaiproxy.errors import ConfigError

VIEW = ["scaicore:view"]
BOTH = ["scaicore:view", "scaicore:manage"]
TENANT_KEY = "sgk_" + "t3nantKey" * 4

EVENTS_UP = "/v1/modules/scaicore/events"
CHECKPOINTS_UP = "/v1/modules/scaicore/checkpoints"
RESOLVE_UP = "/v1/modules/scaicore/checkpoints/ckpt_1/resolve"
INVOKE_UP = "/v1/modules/scaicore/cores/core_triage/invoke"

# method, gateway path, upstream path, request body
ROUTES: dict[str, tuple[str, str, str, Any]] = {
    "events": ("GET", "/api/v1/scaicore/events", EVENTS_UP, None),
    "checkpoints": ("GET", "/api/v1/scaicore/checkpoints", CHECKPOINTS_UP, None),
    "resolve": (
        "POST",
        "/api/v1/scaicore/checkpoints/ckpt_1/resolve",
        RESOLVE_UP,
        {"resolution": "approve"},
    ),
    "invoke": (
        "POST",
        "/api/v1/scaicore/cores/core_triage/invoke",
        INVOKE_UP,
        {"input": {"message": "hi"}},
    ),
}

# Written by hand so that whitespace, escapes and key order are ScaiGrid's own.
# `\u00e9` stays an escape here (raw string) while `café` is raw UTF-8.
EVENTS_TEXT = r"""[
  {"type": "scaicore.runtime.invocation.started", "core_id": "core_triage",
   "timestamp": "2026-04-29T12:34:56Z",
   "payload": {"execution_id": "exec_01", "instance_key": null, "node_id": null,
               "input": {"message": "caf\u00e9 and café",
                         "ticket": 123456789012345678901234567890}}},
  {"type": "scaicore.runtime.block.entered", "core_id": "core_triage",
   "timestamp": "2026-04-29T12:34:57Z",
   "payload": {"execution_id": "exec_01", "node_id": "node_classify",
               "block_kind": "flexible"},
   "source_location": {"node_id": "node_classify", "line": 12}},
  {"type": "scaicore.runtime.block.exited", "core_id": "core_triage",
   "payload": {"execution_id": "exec_01", "node_id": "node_classify",
               "block_kind": "model_call", "result_binding": "label",
               "result_binding_value": {"label": "billing", "score": 1.0,
                                        "tiny": 1E-7, "huge": 1e400},
               "result_binding_truncated": false}},
  {"type": "scaicore.runtime.block.exited", "core_id": "core_triage",
   "payload": {"execution_id": "exec_01", "node_id": "node_transcript",
               "block_kind": "foreach", "result_binding": "transcript",
               "result_binding_value": null, "result_binding_truncated": true}},
  {"type": "scaicore.runtime.block.failed", "core_id": "core_triage",
   "payload": {"execution_id": "exec_02", "node_id": "node_refund",
               "block_kind": "guarded",
               "error": {"type": "GuardViolation", "message": "amount > 500 \u20ac"}}},
  {"type": "scaicore.runtime.invocation.failed", "core_id": "core_triage",
   "payload": {"execution_id": "exec_02",
               "error": {"type": "GuardViolation", "retryable": false}}},
  {"type": "scaicore.runtime.invocation.completed", "core_id": "core_triage",
   "payload": {"execution_id": "exec_01", "instance_key": "inst-7",
               "output": {"reply": "Merci \ud83d\ude00 ✓"}, "duration_ms": 412.0}},
  {"type": "support.ticket.escalated", "core_id": "core_triage",
   "payload": {"execution_id": "exec_01", "priority": -0.0, "tags": []}},
  {"type": "scaiqueue.message.completed", "module": "scaiqueue",
   "payload": {"queue_id": "q_1", "message_id": "m_9",
               "attempts": 18446744073709551616}},
  {"zeta": 1, "alpha": 2, "type": "custom.order",
   "x_future_field": {"nested": {"deep": [null, {"k": null}, {}]}}}
]"""
EVENTS_BYTES = EVENTS_TEXT.encode("utf-8")

CHECKPOINTS_TEXT = r"""[
  {"id": "ckpt_1", "core_id": "core_triage", "checkpoint_type": "hitl_review",
   "status": "pending",
   "presentation": {"title": "Review needed", "message": "Refund \u20ac 1200?"},
   "options": ["approve", "reject"], "created_at": "2026-04-29T12:35:00Z",
   "sla_seconds": 99999999999999999999},
  {"id": "ckpt_2", "core_id": "core_triage", "checkpoint_type": "debug_breakpoint",
   "status": "pending", "prompt": null, "options": ["continue"],
   "created_at": "2026-04-29T12:36:00Z", "source_location": {"node_id": "n_3"}}
]"""
CHECKPOINTS_BYTES = CHECKPOINTS_TEXT.encode("utf-8")

RESOLVED_TEXT = (
    '{"id": "ckpt_1", "status": "resolved", "checkpoint_type": "hitl_review", '
    '"resolution": "approve", "resolved_at": "2026-04-29T12:40:00Z", '
    '"resolved_by": "user-1", "extra": {"n": 12345678901234567890123}}'
)

INVOKE_RESULT_TEXT = (
    '{"output": {"reply": "ok", "n": 12345678901234567890123}, '
    '"request_id": "req_1", "duration_ms": 412, "model_usage": {"tokens": 37}}'
)


def scaigrid_error(code: str, message: str, request_id: str = "up-req-1") -> dict:
    return {
        "status": "error",
        "error": {"code": code, "message": message},
        "meta": {"request_id": request_id},
    }


def raw_route(upstream, method: str, path: str, body: bytes, **headers: str) -> None:
    """Serve exact bytes, which ``upstream.route(json_body=...)`` would re-encode."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            body=body, content_type="application/json", headers=headers or None
        )

    upstream.route(method, path, handler)


def delayed_route(upstream, method: str, path: str, delay_s: float, body: bytes):
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(delay_s)
        return web.Response(body=body, content_type="application/json")

    upstream.route(method, path, handler)


async def send_raw(
    gateway, method: str, target: str, body: bytes = b"", **headers: str
) -> tuple[int, bytes]:
    """Send a request line exactly as written; the aiohttp client would normalise it."""
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    lines = [
        f"{method} {target} HTTP/1.1",
        f"Host: {gateway.host}:{gateway.port}",
        "Connection: close",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), payload


@pytest.fixture
def viewer(rsa_key) -> str:
    return mint(rsa_key, permissions=VIEW)


@pytest.fixture
def manager(rsa_key) -> str:
    return mint(rsa_key, permissions=BOTH)


async def call_route(gateway, name: str, token: str, **kwargs: Any):
    method, path, _, body = ROUTES[name]
    if method == "POST" and "data" not in kwargs:
        kwargs.setdefault("json", body)
    headers = {**bearer(token), **kwargs.pop("headers", {})}
    return await gateway.request(method, path, headers=headers, **kwargs)


# --- events ----------------------------------------------------------------------


async def test_events_exact_upstream_request(gateway, upstream, viewer):
    upstream.route(
        "GET", EVENTS_UP, json_body={"data": {"events": [], "next_cursor": None}}
    )
    response = await gateway.get(
        "/api/v1/scaicore/events",
        params={"core_id": "core_triage", "limit": "5", "cursor": "a+b/c=="},
        headers={**bearer(viewer), "X-Request-ID": "req-abc.1:2"},
    )
    assert response.status == 200
    assert len(upstream.requests) == 1
    sent = upstream.last
    assert sent.method == "GET"
    assert sent.path == EVENTS_UP
    assert sent.query == {
        "core_id": ["core_triage"],
        "limit": ["5"],
        "cursor": ["a+b/c=="],
    }
    assert sent.headers["Authorization"] == f"Bearer {viewer}"
    assert sent.headers["X-Request-ID"] == "req-abc.1:2"
    assert response.headers["X-Request-ID"] == "req-abc.1:2"
    assert await response.json() == {"data": {"events": [], "next_cursor": None}}


async def test_bad_request_id_replaced(gateway, upstream, viewer):
    upstream.route("GET", EVENTS_UP, json_body={"data": {"events": []}})
    response = await call_route(
        gateway, "events", viewer, headers={"X-Request-ID": "bad id\u00e9"}
    )
    request_id = response.headers["X-Request-ID"]
    assert request_id != "bad id\u00e9"
    assert upstream.last.headers["X-Request-ID"] == request_id


async def test_events_default_limit_sent(gateway, upstream, viewer):
    upstream.route("GET", EVENTS_UP, json_body={"data": {"events": []}})
    response = await call_route(gateway, "events", viewer)
    assert response.status == 200
    assert upstream.last.query == {"limit": ["50"]}


async def test_events_page_bytes_exact(gateway, upstream, viewer):
    page = (
        b'{"status": "ok", "data": {"events": '
        + EVENTS_BYTES
        + b', "next_cursor": "ev+/42=="}}'
    )
    raw_route(upstream, "GET", EVENTS_UP, page)
    response = await call_route(gateway, "events", viewer)
    body = await response.read()
    assert response.status == 200
    assert body == b'{"data":{"events":' + EVENTS_BYTES + b',"next_cursor":"ev+/42=="}}'


async def test_events_page_decodes_exactly(gateway, upstream, viewer):
    page = b'{"data": {"events": ' + EVENTS_BYTES + b', "next_cursor": null}}'
    raw_route(upstream, "GET", EVENTS_UP, page)
    response = await call_route(gateway, "events", viewer)
    events = json.loads(await response.read())["data"]["events"]
    started = events[0]["payload"]
    assert started["input"]["ticket"] == 123456789012345678901234567890
    assert started["input"]["message"] == "café and café"
    assert events[1]["source_location"]["node_id"] == "node_classify"
    assert events[2]["payload"]["result_binding_value"]["huge"] == float("inf")
    assert events[3]["payload"]["result_binding_truncated"] is True
    assert events[6]["payload"]["output"]["reply"] == "Merci 😀 ✓"
    assert events[8]["payload"]["attempts"] == 2**64
    assert list(events[9]) == ["zeta", "alpha", "type", "x_future_field"]
    assert [event["type"] for event in events[:7]] == [
        "scaicore.runtime.invocation.started",
        "scaicore.runtime.block.entered",
        "scaicore.runtime.block.exited",
        "scaicore.runtime.block.exited",
        "scaicore.runtime.block.failed",
        "scaicore.runtime.invocation.failed",
        "scaicore.runtime.invocation.completed",
    ]


async def test_events_list_shape_accepted(gateway, upstream, viewer):
    page = b'{"data": ' + EVENTS_BYTES + b', "has_more": true, "next_cursor": "n2"}'
    raw_route(upstream, "GET", EVENTS_UP, page)
    response = await call_route(gateway, "events", viewer)
    body = await response.read()
    assert response.status == 200
    assert body == b'{"data":{"events":' + EVENTS_BYTES + b',"next_cursor":"n2"}}'


async def test_events_has_more_false_ends(gateway, upstream, viewer):
    page = b'{"data": [{"type": "x"}], "has_more": false, "next_cursor": "stale"}'
    raw_route(upstream, "GET", EVENTS_UP, page)
    response = await call_route(gateway, "events", viewer)
    assert await response.json() == {
        "data": {"events": [{"type": "x"}], "next_cursor": None}
    }


async def test_events_generic_items_page(gateway, upstream, viewer):
    page = b'{"data": {"items": ' + EVENTS_BYTES + b', "next_cursor": "c2"}}'
    raw_route(upstream, "GET", EVENTS_UP, page)
    response = await call_route(gateway, "events", viewer)
    body = await response.read()
    assert body == b'{"data":{"events":' + EVENTS_BYTES + b',"next_cursor":"c2"}}'


async def test_events_utf8_bom_dropped(gateway, upstream, viewer):
    page = b'\xef\xbb\xbf{"data": {"events": ' + EVENTS_BYTES + b"}}"
    raw_route(upstream, "GET", EVENTS_UP, page)
    response = await call_route(gateway, "events", viewer)
    body = await response.read()
    assert body == b'{"data":{"events":' + EVENTS_BYTES + b',"next_cursor":null}}'


BAD_PAGES = [
    pytest.param(b'{"data": {"items": {}}}', id="items-object"),
    pytest.param(b'{"data": {"other": []}}', id="no-list-key"),
    pytest.param(b'{"events": []}', id="no-data"),
    pytest.param(b"[]", id="list-body"),
    pytest.param(b'{"data": "events"}', id="data-string"),
    pytest.param(b'{"data": null}', id="data-null"),
    pytest.param(b'{"data": {"events": {}}}', id="events-object"),
    pytest.param(b'{"data": {"events": [1, 2]}}', id="events-not-objects"),
    pytest.param(b'{"data": {"events": [], "next_cursor": 5}}', id="cursor-number"),
    pytest.param(b'{"data": [], "next_cursor": {"a": 1}}', id="cursor-object"),
    pytest.param(b'{"data": {"events": [{"n": NaN}]}}', id="nan"),
    pytest.param(b'{"data": {"events": [', id="truncated"),
    pytest.param(b'{"data": {"events": []}} trailing', id="trailing-data"),
    pytest.param(b'{"data": {"events": [{"s": "\xff"}]}}', id="invalid-utf8"),
    pytest.param(b"<html><body>Bad gateway</body></html>", id="html"),
    pytest.param(b"", id="empty"),
]


@pytest.mark.parametrize("page", BAD_PAGES)
@pytest.mark.parametrize("route", ["events", "checkpoints"])
async def test_page_bad_shape_502(gateway, upstream, viewer, route, page):
    page = page.replace(b'"events"', f'"{route}"'.encode())
    raw_route(upstream, "GET", ROUTES[route][2], page)
    response = await call_route(gateway, route, viewer)
    body = await response.json()
    assert response.status == 502
    assert body["detail"]["error"] == "bad_gateway"


# --- the query string ------------------------------------------------------------


CURSORS = [
    pytest.param("cursor=a%2Bb%2Fc%3D%3D", "a+b/c==", id="percent-plus"),
    pytest.param("cursor=a%2Bb/c==", "a+b/c==", id="slash-and-equals"),
    pytest.param("cursor=a%26limit%3D9", "a&limit=9", id="ampersand"),
    pytest.param("cursor=50%25", "50%", id="percent"),
    pytest.param("cursor=%C3%A9t%C3%A9", "été", id="utf8"),
    pytest.param("cursor=eyJzIjo0Mn0", "eyJzIjo0Mn0", id="base64url"),
]


@pytest.mark.parametrize("query, cursor", CURSORS)
async def test_cursor_decoded_value_forwarded(gateway, upstream, viewer, query, cursor):
    wire: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        wire.append(request.raw_path)
        return web.json_response({"data": {"events": [], "next_cursor": None}})

    upstream.route("GET", EVENTS_UP, handler)
    status, _ = await send_raw(
        gateway, "GET", f"/api/v1/scaicore/events?{query}", **bearer(viewer)
    )
    assert status == 200
    assert upstream.last.query["cursor"] == [cursor]
    # A literal "+" must be percent-encoded, or ScaiGrid would read a space.
    assert wire[0].count("%2B") == cursor.count("+")


async def test_next_cursor_returned_exactly(gateway, upstream, viewer):
    raw_route(
        upstream,
        "GET",
        EVENTS_UP,
        b'{"data": {"events": [], "next_cursor": "a+b/c==\\u00e9"}}',
    )
    response = await call_route(gateway, "events", viewer)
    assert (await response.json())["data"]["next_cursor"] == "a+b/c==\u00e9"


QUERY_ERRORS = [
    # route, query string, field, text the message must contain
    ("events", "limit=abc", "limit", "1 to 500"),
    ("events", "limit=0", "limit", "1 to 500"),
    ("events", "limit=501", "limit", "1 to 500"),
    ("events", "limit=-1", "limit", "1 to 500"),
    ("events", "limit=5.5", "limit", "1 to 500"),
    ("events", "limit=5.0", "limit", "1 to 500"),
    ("events", "limit=%205", "limit", "1 to 500"),
    ("events", "limit=5%20", "limit", "1 to 500"),
    ("events", "limit=%2B5", "limit", "1 to 500"),
    ("events", "limit=5_0", "limit", "1 to 500"),
    ("events", "limit=1e2", "limit", "1 to 500"),
    ("events", "limit=%D9%A5", "limit", "1 to 500"),
    ("events", "limit=99999999999999999999", "limit", "1 to 500"),
    ("events", "limit=", "limit", "1 to 500"),
    ("events", "limit=5&limit=6", "limit", "more than once"),
    ("events", "core_id=", "core_id", "A-Z a-z 0-9 _ . : -"),
    ("events", "core_id=a%2Fb", "core_id", "A-Z a-z 0-9 _ . : -"),
    ("events", "core_id=..", "core_id", "not '.' or '..'"),
    ("events", "core_id=%2e", "core_id", "not '.' or '..'"),
    ("events", "core_id=" + "c" * 129, "core_id", "1 to 128"),
    ("events", "core_id=a%0D%0Ab", "core_id", "A-Z a-z 0-9 _ . : -"),
    ("events", "cursor=", "cursor", "leave cursor out"),
    ("events", "cursor", "cursor", "leave cursor out"),
    ("events", "cursor=" + "c" * 2049, "cursor", "1 to 2048"),
    ("events", "cursor=a%00b", "cursor", "control character"),
    ("events", "cursor=a%0D%0AX-Injected:%201", "cursor", "control character"),
    ("events", "cursor=%FF%FE", "cursor", "not valid UTF-8"),
    ("events", "cursor=a+b/c==", "cursor", "'+' is sent as %2B"),
    ("events", "cursor=a%20b", "cursor", "'+' is sent as %2B"),
    ("events", "status=pending", "status", "allowed: core_id, limit, cursor"),
    ("events", "offset=10", "offset", "allowed: core_id, limit, cursor"),
    ("checkpoints", "status=unknown", "status", "'pending'"),
    ("checkpoints", "status=PENDING", "status", "'cancelled'"),
    ("checkpoints", "status=", "status", "'resolved'"),
    ("checkpoints", "limit=0", "limit", "1 to 500"),
    ("checkpoints", "limit=501", "limit", "1 to 500"),
    ("checkpoints", "core_id=%2e%2e", "core_id", "not '.' or '..'"),
    ("checkpoints", "page=2", "page", "allowed: core_id, limit, cursor, status"),
]


@pytest.mark.parametrize("route, query, field, allowed", QUERY_ERRORS)
async def test_query_rejected_before_upstream(
    gateway, upstream, viewer, route, query, field, allowed
):
    status, payload = await send_raw(
        gateway, "GET", f"{ROUTES[route][1]}?{query}", **bearer(viewer)
    )
    detail = json.loads(payload)["detail"]
    assert status == 422
    assert detail["error"] == "validation_error"
    assert [entry["field"] for entry in detail["errors"]] == [field]
    assert allowed in detail["errors"][0]["message"]
    assert upstream.requests == []


@pytest.mark.parametrize("limit", ["1", "500", "050"])
async def test_limit_bounds_accepted(gateway, upstream, viewer, limit):
    upstream.route("GET", EVENTS_UP, json_body={"data": {"events": []}})
    response = await call_route(gateway, "events", viewer, params={"limit": limit})
    assert response.status == 200
    assert upstream.last.query["limit"] == [str(int(limit))]


async def test_core_id_max_length_accepted(gateway, upstream, viewer):
    core_id = "c" * 128
    upstream.route("GET", EVENTS_UP, json_body={"data": {"events": []}})
    response = await call_route(gateway, "events", viewer, params={"core_id": core_id})
    assert response.status == 200
    assert upstream.last.query["core_id"] == [core_id]


# --- checkpoints -----------------------------------------------------------------


async def test_checkpoints_exact_upstream_request(gateway, upstream, viewer):
    upstream.route("GET", CHECKPOINTS_UP, json_body={"data": {"checkpoints": []}})
    response = await gateway.get(
        "/api/v1/scaicore/checkpoints",
        params={
            "core_id": "core_triage",
            "status": "resolved",
            "limit": "20",
            "cursor": "ck+/==",
        },
        headers={**bearer(viewer), "X-Request-ID": "req-ck-1"},
    )
    assert response.status == 200
    sent = upstream.last
    assert sent.path == CHECKPOINTS_UP
    assert sent.query == {
        "core_id": ["core_triage"],
        "limit": ["20"],
        "cursor": ["ck+/=="],
        "status": ["resolved"],
    }
    assert sent.headers["Authorization"] == f"Bearer {viewer}"
    assert sent.headers["X-Request-ID"] == "req-ck-1"


async def test_checkpoints_default_status_sent(gateway, upstream, viewer):
    """ScaiGrid's own default status never decides what the canvas lists."""
    upstream.route("GET", CHECKPOINTS_UP, json_body={"data": {"checkpoints": []}})
    response = await call_route(gateway, "checkpoints", viewer)
    assert response.status == 200
    assert upstream.last.query == {"limit": ["50"], "status": ["pending"]}


@pytest.mark.parametrize(
    "status", ["pending", "resolved", "failed", "expired", "cancelled"]
)
async def test_checkpoints_status_accepted(gateway, upstream, viewer, status):
    upstream.route("GET", CHECKPOINTS_UP, json_body={"data": {"checkpoints": []}})
    response = await call_route(
        gateway, "checkpoints", viewer, params={"status": status}
    )
    assert response.status == 200
    assert upstream.last.query["status"] == [status]


async def test_checkpoints_page_bytes_exact(gateway, upstream, viewer):
    page = b'{"data": {"checkpoints": ' + CHECKPOINTS_BYTES + b', "next_cursor": "k2"}}'
    raw_route(upstream, "GET", CHECKPOINTS_UP, page)
    response = await call_route(gateway, "checkpoints", viewer)
    body = await response.read()
    assert response.status == 200
    # A page already in the gateway's shape is sent on as it came.
    assert body == (
        b'{"data":{"checkpoints": ' + CHECKPOINTS_BYTES + b', "next_cursor": "k2"}}'
    )


async def test_events_exact_shape_sent_as_is(gateway, upstream, viewer):
    events = b'[{"type": "t", "n": 123456789012345678901234567890, "s": "\\u00e9"}]'
    data = b'{ "next_cursor" : null ,\n "events": ' + events + b" }"
    raw_route(upstream, "GET", EVENTS_UP, b'\xef\xbb\xbf {"data": ' + data + b"}\n")
    response = await call_route(gateway, "events", viewer)
    body = await response.read()
    assert response.status == 200
    assert body == b'{"data":' + data + b"}"


async def test_compact_page_sent_as_it_came(gateway, upstream, viewer):
    event = b'{"n":123456789012345678901234567890}'
    page = b'{"data":{"events":[' + event + b'],"next_cursor":"c"}}'
    raw_route(upstream, "GET", EVENTS_UP, page)
    response = await call_route(gateway, "events", viewer)
    assert response.status == 200
    assert await response.read() == page


async def test_changed_page_of_same_length_sent(gateway, upstream, viewer):
    """A page is reused only when its bytes equal a page checked before."""
    pages = [
        b'{"data":{"events":[{"seq":1}],"next_cursor":"c1"}}',
        b'{"data":{"events":[{"seq":2}],"next_cursor":"c2"}}',
        b'{"data":{"events":[{"seq":1}],"next_cursor":"c1"}}',
    ]
    sent = []
    for page in pages:
        raw_route(upstream, "GET", EVENTS_UP, page)
        response = await call_route(gateway, "events", viewer)
        sent.append(await response.read())
    assert sent == pages


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(b'{"data": {"events": []}, "data": {"events": []}}', id="twice"),
        pytest.param(b'{"data": {"events": [], "next_cursor": 1}}', id="cursor"),
        pytest.param(b'{"data": {"events": [1], "next_cursor": null}}', id="entry"),
        pytest.param(b'{"data": {"events": [], "next_cursor": null}}x', id="tail"),
    ],
)
async def test_events_exact_shape_lookalikes(gateway, upstream, viewer, page):
    raw_route(upstream, "GET", EVENTS_UP, page)
    response = await call_route(gateway, "events", viewer)
    body = await response.json()
    if page.startswith(b'{"data": {"events": []}, "data"'):
        # Duplicate members: the last one wins, as in every JSON decoder.
        assert body == {"data": {"events": [], "next_cursor": None}}
    else:
        assert response.status == 502
        assert body["detail"]["error"] == "bad_gateway"


async def test_checkpoints_type_kept(gateway, upstream, viewer):
    page = b'{"data": ' + CHECKPOINTS_BYTES + b', "has_more": false}'
    raw_route(upstream, "GET", CHECKPOINTS_UP, page)
    response = await call_route(gateway, "checkpoints", viewer)
    checkpoints = json.loads(await response.read())["data"]["checkpoints"]
    assert [item["checkpoint_type"] for item in checkpoints] == [
        "hitl_review",
        "debug_breakpoint",
    ]
    assert checkpoints[0]["sla_seconds"] == 99999999999999999999


# --- resolve ---------------------------------------------------------------------


async def test_resolve_exact_upstream_request(gateway, upstream, manager):
    raw_route(
        upstream, "POST", RESOLVE_UP, b'{"data": ' + RESOLVED_TEXT.encode() + b"}"
    )
    response = await gateway.post(
        "/api/v1/scaicore/checkpoints/ckpt_1/resolve",
        data=b'{"comment": "Within budget.", "resolution": "approve"}',
        headers={
            **bearer(manager),
            "X-Request-ID": "req-resolve-1",
            "Content-Type": "application/json",
        },
    )
    body = await response.read()
    assert response.status == 200
    assert body == b'{"data":' + RESOLVED_TEXT.encode() + b"}"
    sent = upstream.last
    assert sent.method == "POST"
    assert sent.path == RESOLVE_UP
    assert sent.query == {}
    assert sent.body == b'{"resolution":"approve","comment":"Within budget."}'
    assert sent.headers["Authorization"] == f"Bearer {manager}"
    assert sent.headers["X-Request-ID"] == "req-resolve-1"
    assert sent.headers["Content-Type"] == "application/json"


async def test_resolve_null_comment_left_out(gateway, upstream, manager):
    upstream.route("POST", RESOLVE_UP, json_body={"data": {"id": "ckpt_1"}})
    response = await call_route(
        gateway, "resolve", manager, json={"resolution": "continue", "comment": None}
    )
    assert response.status == 200
    assert upstream.last.body == b'{"resolution":"continue"}'


async def test_resolve_strings_forwarded_raw(gateway, upstream, manager):
    upstream.route("POST", RESOLVE_UP, json_body={"data": {"id": "ckpt_1"}})
    response = await call_route(
        gateway,
        "resolve",
        manager,
        data=b'{"resolution": "appr\\u006fve", "comment": "caf\xc3\xa9 \\u00e9"}',
    )
    assert response.status == 200
    assert upstream.last.body == (
        b'{"resolution":"appr\\u006fve","comment":"caf\xc3\xa9 \\u00e9"}'
    )


async def test_resolve_lone_surrogate_422(gateway, upstream, manager):
    response = await call_route(
        gateway, "resolve", manager, data=b'{"resolution": "a", "comment": "\\ud800"}'
    )
    detail = (await response.json())["detail"]
    assert response.status == 422
    assert detail["errors"][0]["field"] == "comment"
    assert upstream.requests == []


async def test_resolve_bare_checkpoint_accepted(gateway, upstream, manager):
    """A resolved checkpoint without the envelope has a status of its own."""
    raw_route(upstream, "POST", RESOLVE_UP, RESOLVED_TEXT.encode())
    response = await call_route(gateway, "resolve", manager)
    body = await response.read()
    assert response.status == 200
    assert body == b'{"data":' + RESOLVED_TEXT.encode() + b"}"


@pytest.mark.parametrize(
    "status, code", [(404, "checkpoint_not_found"), (409, "checkpoint_resolved")]
)
async def test_resolve_upstream_status_kept(gateway, upstream, manager, status, code):
    upstream.route(
        "POST",
        RESOLVE_UP,
        json_body=scaigrid_error(code, "Checkpoint ckpt_1 cannot be resolved."),
        status=status,
    )
    response = await call_route(gateway, "resolve", manager)
    detail = (await response.json())["detail"]
    assert response.status == status
    assert detail["error"] == "upstream_error"
    assert detail["upstream_code"] == code
    assert detail["message"] == "Checkpoint ckpt_1 cannot be resolved."
    assert detail["upstream_request_id"] == "up-req-1"


@pytest.fixture
async def tenant_key_gateway(make_gateway, upstream, jwks_server, tmp_path):
    """A gateway that calls ScaiGrid with the tenant's stored key, not the JWT."""
    secrets = tmp_path / "secrets.json"
    secrets.write_text(json.dumps({"tenants/acme/scaigrid_api_key": TENANT_KEY}))
    config = base_config(
        upstream.base_url,
        jwks_server.url,
        secrets={"backend": "file", "file": {"path": str(secrets)}},
    )
    config["auth"] = {**config["auth"], "upstream_credentials": "api_key"}
    return await make_gateway(config)


@pytest.mark.parametrize(
    "status, code", [(404, "checkpoint_not_found"), (409, "checkpoint_resolved")]
)
async def test_resolve_status_kept_with_tenant_key(
    tenant_key_gateway, upstream, manager, status, code
):
    upstream.route(
        "POST", RESOLVE_UP, json_body=scaigrid_error(code, "No."), status=status
    )
    response = await call_route(tenant_key_gateway, "resolve", manager)
    body = await response.read()
    detail = json.loads(body)["detail"]
    assert response.status == status
    assert detail["error"] == "upstream_error"
    assert detail["upstream_code"] == code
    assert upstream.last.headers["Authorization"] == f"Bearer {TENANT_KEY}"
    assert TENANT_KEY.encode() not in body


async def test_rejected_tenant_key_502(tenant_key_gateway, upstream, manager):
    upstream.route(
        "POST", RESOLVE_UP, json_body=scaigrid_error("unauthorized", "No."), status=401
    )
    response = await call_route(tenant_key_gateway, "resolve", manager)
    body = await response.read()
    assert response.status == 502
    assert json.loads(body)["detail"]["error"] == "upstream_auth_failed"
    assert TENANT_KEY.encode() not in body


# --- invoke ----------------------------------------------------------------------


INPUT_TEXT = (
    '{"ticket": 123456789012345678901234567890, "text": "caf\\u00e9 / café", '
    '"ratio": 1.0, "huge": 1e400, "small": 2.50, "neg": -0.0, "none": null, '
    '"nested": {"k": [1, null, {"z": 1, "a": 2}]}}'
)


async def test_invoke_exact_upstream_request(gateway, upstream, manager):
    raw_route(
        upstream, "POST", INVOKE_UP, b'{"data": ' + INVOKE_RESULT_TEXT.encode() + b"}"
    )
    body = '{"entity_id": "user_42", "input": ' + INPUT_TEXT + "}"
    response = await gateway.post(
        "/api/v1/scaicore/cores/core_triage/invoke",
        data=body.encode("utf-8"),
        headers={**bearer(manager), "X-Request-ID": "req-invoke-1"},
    )
    assert response.status == 200
    sent = upstream.last
    assert sent.method == "POST"
    assert sent.path == INVOKE_UP
    assert sent.body == (
        b'{"input":' + INPUT_TEXT.encode("utf-8") + b',"entity_id":"user_42"}'
    )
    assert sent.headers["Authorization"] == f"Bearer {manager}"
    assert sent.headers["X-Request-ID"] == "req-invoke-1"
    assert sent.headers["Content-Type"] == "application/json"


async def test_invoke_response_bytes_exact(gateway, upstream, manager):
    raw_route(
        upstream,
        "POST",
        INVOKE_UP,
        b'{"data": ' + INVOKE_RESULT_TEXT.encode() + b', "status": "ok"}',
    )
    response = await call_route(gateway, "invoke", manager)
    body = await response.read()
    assert body == b'{"data":' + INVOKE_RESULT_TEXT.encode() + b"}"
    assert json.loads(body)["data"]["model_usage"] == {"tokens": 37}


async def test_invoke_lone_surrogate_forwarded(gateway, upstream, manager):
    """Inside ``input`` only ScaiGrid judges strings; the gateway copies the text."""
    raw_route(upstream, "POST", INVOKE_UP, INVOKE_RESULT_TEXT.encode())
    response = await call_route(
        gateway, "invoke", manager, data=b'{"input": {"s": "\\ud800"}}'
    )
    assert response.status == 200
    assert upstream.last.body == b'{"input":{"s": "\\ud800"}}'


async def test_invoke_without_entity_id(gateway, upstream, manager):
    raw_route(upstream, "POST", INVOKE_UP, INVOKE_RESULT_TEXT.encode())
    response = await call_route(gateway, "invoke", manager)
    assert response.status == 200
    assert upstream.last.body == b'{"input":{"message": "hi"}}'


async def test_invoke_bare_response_accepted(gateway, upstream, manager):
    raw_route(upstream, "POST", INVOKE_UP, INVOKE_RESULT_TEXT.encode())
    response = await call_route(gateway, "invoke", manager)
    body = await response.read()
    assert body == b'{"data":' + INVOKE_RESULT_TEXT.encode() + b"}"


BAD_INVOKE_RESPONSES = [
    pytest.param(b'{"data": {"result": 1}}', id="no-output"),
    pytest.param(b'{"data": {"output": 1, "duration_ms": "fast"}}', id="duration-text"),
    pytest.param(b'{"data": {"output": 1, "duration_ms": true}}', id="duration-bool"),
    pytest.param(b'{"data": {"output": 1, "request_id": 7}}', id="request-id-number"),
    pytest.param(b'{"data": [1]}', id="data-list"),
    pytest.param(b'{"status": "error", "error": {"code": "x"}}', id="error-envelope"),
    pytest.param(b'{"status": "ok"}', id="ok-without-data"),
    pytest.param(b"<html>oops</html>", id="html"),
]


@pytest.mark.parametrize("payload", BAD_INVOKE_RESPONSES)
async def test_invoke_bad_response_502(gateway, upstream, manager, payload):
    raw_route(upstream, "POST", INVOKE_UP, payload)
    response = await call_route(gateway, "invoke", manager)
    assert response.status == 502
    assert (await response.json())["detail"]["error"] == "bad_gateway"


# --- validation of path ids and bodies -------------------------------------------


PATH_IDS = [
    # segment as written on the request line, expected status
    pytest.param("..", 422, id="dot-dot"),
    pytest.param(".", 422, id="dot"),
    pytest.param("%2e%2e", 422, id="encoded-dot-dot"),
    pytest.param("%2E", 422, id="encoded-dot"),
    pytest.param("a%2Fb", 422, id="encoded-slash"),
    pytest.param("%2F", 422, id="only-encoded-slash"),
    pytest.param("..%2F..%2Fcores%2Fx", 422, id="encoded-traversal"),
    pytest.param("%00", 422, id="nul"),
    pytest.param("a%0d%0aX-Injected:%201", 422, id="crlf"),
    pytest.param("a%20b", 422, id="space"),
    pytest.param("a%25b", 422, id="percent"),
    pytest.param("a;b", 422, id="semicolon"),
    pytest.param("%C3%A9", 422, id="non-ascii"),
    pytest.param("x" * 129, 422, id="129-chars"),
    pytest.param("", 404, id="empty"),
    pytest.param("a/b", 404, id="slash"),
    pytest.param("../..", 404, id="traversal"),
    pytest.param("a?b", 404, id="question-mark"),
    pytest.param("a#b", 404, id="hash"),
]


@pytest.mark.parametrize("segment, expected", PATH_IDS)
@pytest.mark.parametrize(
    "template, field, body",
    [
        (
            "/api/v1/scaicore/checkpoints/{}/resolve",
            "checkpoint_id",
            b'{"resolution": "approve"}',
        ),
        ("/api/v1/scaicore/cores/{}/invoke", "core_id", b'{"input": {}}'),
    ],
    ids=["resolve", "invoke"],
)
async def test_path_id_rejected_before_upstream(
    gateway, upstream, manager, template, field, body, segment, expected
):
    status, payload = await send_raw(
        gateway, "POST", template.format(segment), body, **bearer(manager)
    )
    detail = json.loads(payload)["detail"]
    assert status == expected
    assert upstream.requests == []
    if expected == 422:
        assert detail["error"] == "validation_error"
        assert detail["errors"][0]["field"] == field
        assert "A-Z a-z 0-9 _ . : -" in detail["errors"][0]["message"]
    else:
        assert detail["error"] == "not_found"


@pytest.mark.parametrize("segment, decoded", [("%41bc", "Abc"), ("a%3Ab", "a:b")])
async def test_path_id_decoded_once(gateway, upstream, manager, segment, decoded):
    upstream.route(
        "POST",
        f"/v1/modules/scaicore/cores/{decoded}/invoke",
        json_body={"output": None},
    )
    status, _ = await send_raw(
        gateway,
        "POST",
        f"/api/v1/scaicore/cores/{segment}/invoke",
        b'{"input": {}}',
        **bearer(manager),
    )
    assert status == 200
    assert upstream.last.path == f"/v1/modules/scaicore/cores/{decoded}/invoke"


async def test_path_id_max_length_accepted(gateway, upstream, manager):
    checkpoint_id = "k" * 128
    path = f"/v1/modules/scaicore/checkpoints/{checkpoint_id}/resolve"
    upstream.route("POST", path, json_body={"data": {"id": checkpoint_id}})
    response = await gateway.post(
        f"/api/v1/scaicore/checkpoints/{checkpoint_id}/resolve",
        json={"resolution": "approve"},
        headers=bearer(manager),
    )
    assert response.status == 200
    assert upstream.last.path == path


BODY_ERRORS = [
    # route, body, field, text the message must contain
    ("resolve", {}, "resolution", "missing"),
    ("resolve", {"resolution": ""}, "resolution", "at least 1 character"),
    ("resolve", {"resolution": "   "}, "resolution", "must not be blank"),
    ("resolve", {"resolution": "\t\n"}, "resolution", "must not be blank"),
    ("resolve", {"resolution": 5}, "resolution", "expected a string"),
    ("resolve", {"resolution": True}, "resolution", "expected a string"),
    ("resolve", {"resolution": None}, "resolution", "expected a string"),
    ("resolve", {"resolution": ["approve"]}, "resolution", "expected a string"),
    ("resolve", {"resolution": {"id": "approve"}}, "resolution", "expected a string"),
    ("resolve", {"resolution": "r" * 257}, "resolution", "at most 256"),
    ("resolve", {"resolution": "approve", "comment": 5}, "comment", "string"),
    (
        "resolve",
        {"resolution": "approve", "note": "x"},
        "note",
        "allowed: resolution, comment",
    ),
    ("invoke", {}, "input", "missing"),
    ("invoke", {"input": []}, "input", "expected a mapping"),
    ("invoke", {"input": [["message", "hi"]]}, "input", "expected a mapping"),
    ("invoke", {"input": "hi"}, "input", "expected a mapping"),
    ("invoke", {"input": None}, "input", "expected a mapping"),
    ("invoke", {"input": 5}, "input", "expected a mapping"),
    ("invoke", {"input": {}, "entity_id": 42}, "entity_id", "string"),
    ("invoke", {"input": {}, "entity_id": ""}, "entity_id", "at least 1 character"),
    (
        "invoke",
        {"input": {}, "entityId": "user_42"},
        "entityId",
        "allowed: input, entity_id",
    ),
]


@pytest.mark.parametrize("route, body, field, allowed", BODY_ERRORS)
async def test_body_rejected_before_upstream(
    gateway, upstream, manager, route, body, field, allowed
):
    response = await call_route(gateway, route, manager, json=body)
    detail = (await response.json())["detail"]
    assert response.status == 422
    assert detail["error"] == "validation_error"
    assert [entry["field"] for entry in detail["errors"]] == [field]
    assert allowed in detail["errors"][0]["message"]
    assert upstream.requests == []


NOT_JSON = [
    pytest.param(b"", id="empty"),
    pytest.param(b"   ", id="blank"),
    pytest.param(b"resolution=approve", id="form"),
    pytest.param(b'{"input": {}', id="truncated"),
    pytest.param(b"[1, 2]", id="list"),
    pytest.param(b'"text"', id="string"),
    pytest.param(b"null", id="null"),
    pytest.param(b'{"input": {"x": NaN}, "resolution": "a"}', id="nan"),
    pytest.param(b'{"input": {}} {"input": {}}', id="two-documents"),
    pytest.param(b"\xff\xfe{}", id="not-utf8"),
]


@pytest.mark.parametrize("payload", NOT_JSON)
@pytest.mark.parametrize("route", ["resolve", "invoke"])
async def test_non_json_body_400(gateway, upstream, manager, route, payload):
    response = await call_route(gateway, route, manager, data=payload)
    detail = (await response.json())["detail"]
    assert response.status == 400
    assert detail["error"] == "invalid_json"
    assert upstream.requests == []


async def test_body_over_limit_413(make_gateway, upstream, jwks_server, manager):
    config = base_config(
        upstream.base_url, jwks_server.url, server={"max_body_bytes": 1024}
    )
    gateway = await make_gateway(config)
    body = {"input": {"blob": "x" * 2048}}
    response = await call_route(gateway, "invoke", manager, json=body)
    assert response.status == 413
    assert (await response.json())["detail"]["error"] == "payload_too_large"
    assert upstream.requests == []


# --- permissions -----------------------------------------------------------------


@pytest.mark.parametrize("route", list(ROUTES))
async def test_no_token_401(gateway, upstream, route):
    method, path, _, body = ROUTES[route]
    response = await gateway.request(method, path, json=body)
    assert response.status == 401
    assert (await response.json())["detail"]["error"] == "missing_token"
    assert upstream.requests == []


@pytest.mark.parametrize("route", ["resolve", "invoke"])
async def test_view_cannot_manage(gateway, upstream, viewer, route):
    response = await call_route(gateway, route, viewer)
    detail = (await response.json())["detail"]
    assert response.status == 403
    assert detail["error"] == "insufficient_scope"
    assert detail["required"] == "scaicore:manage"
    assert upstream.requests == []


@pytest.mark.parametrize("route", ["events", "checkpoints"])
async def test_view_permission_required(gateway, upstream, rsa_key, route):
    token = mint(rsa_key, permissions=["scaiqueue:view"])
    response = await call_route(gateway, route, token)
    detail = (await response.json())["detail"]
    assert response.status == 403
    assert detail["required"] == "scaicore:view"
    assert upstream.requests == []


async def test_permission_checked_before_validation(gateway, upstream, viewer):
    response = await call_route(gateway, "invoke", viewer, json={"input": []})
    assert response.status == 403


@pytest.mark.parametrize(
    "role, route, expected",
    [
        ("tenant_viewer", "events", 200),
        ("tenant_viewer", "invoke", 403),
        ("tenant_user", "events", 403),
        ("tenant_admin", "invoke", 200),
    ],
)
async def test_roles_grant_permissions(
    gateway, upstream, rsa_key, role, route, expected
):
    upstream.route("GET", EVENTS_UP, json_body={"data": {"events": []}})
    raw_route(upstream, "POST", INVOKE_UP, INVOKE_RESULT_TEXT.encode())
    token = mint(rsa_key, roles=[role])
    response = await call_route(gateway, route, token)
    assert response.status == expected


async def test_invoke_wrong_method_405(gateway, upstream, manager):
    response = await gateway.get(
        "/api/v1/scaicore/cores/core_triage/invoke", headers=bearer(manager)
    )
    assert response.status == 405
    assert response.headers["Allow"] == "POST"
    assert upstream.requests == []


# --- upstream failures -----------------------------------------------------------


UPSTREAM_FAILURES = [
    # upstream status, body, content type, gateway status, detail.error
    pytest.param(
        404, scaigrid_error("core_not_found", "No."), 404, "upstream_error", id="404"
    ),
    pytest.param(
        409, scaigrid_error("conflict", "No."), 409, "upstream_error", id="409"
    ),
    pytest.param(
        422, scaigrid_error("invalid", "No."), 422, "upstream_error", id="422"
    ),
    pytest.param(
        400, scaigrid_error("bad_request", "No."), 400, "upstream_error", id="400"
    ),
    pytest.param(
        500, scaigrid_error("internal", "Boom."), 502, "bad_gateway", id="500"
    ),
    pytest.param(
        503, "<html>Service Unavailable</html>", 502, "bad_gateway", id="503-html"
    ),
    pytest.param(200, "<html>Login</html>", 502, "bad_gateway", id="200-html"),
    pytest.param(418, scaigrid_error("teapot", "No."), 502, "bad_gateway", id="418"),
]


@pytest.mark.parametrize("up_status, payload, status, error", UPSTREAM_FAILURES)
@pytest.mark.parametrize("route", list(ROUTES))
async def test_upstream_failure_mapped(
    gateway, upstream, manager, route, up_status, payload, status, error
):
    if isinstance(payload, str):
        body, content_type = payload.encode(), "text/html"
    else:
        body, content_type = json.dumps(payload).encode(), "application/json"

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=up_status, body=body, content_type=content_type)

    upstream.route(ROUTES[route][0], ROUTES[route][2], handler)
    response = await call_route(gateway, route, manager)
    text = await response.text()
    detail = json.loads(text)["detail"]
    assert response.status == status
    assert detail["error"] == error
    assert "<html" not in text
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("route", list(ROUTES))
async def test_upstream_429_headers_kept(gateway, upstream, manager, route):
    upstream.route(
        ROUTES[route][0],
        ROUTES[route][2],
        json_body=scaigrid_error("rate_limited", "Slow down."),
        status=429,
        headers={"Retry-After": "7", "X-Scaigrid-Ratelimit-Remaining": "0"},
    )
    response = await call_route(gateway, route, manager)
    detail = (await response.json())["detail"]
    assert response.status == 429
    assert response.headers["Retry-After"] == "7"
    assert response.headers["X-Scaigrid-Ratelimit-Remaining"] == "0"
    assert detail["upstream_code"] == "rate_limited"
    assert len(upstream.requests) == 1


@pytest.fixture
async def short_timeout_gateway(make_gateway, upstream, jwks_server):
    """upstream.timeout_s is 0.3 s, and so is the invoke timeout."""
    config = base_config(
        upstream.base_url,
        jwks_server.url,
        upstream={"timeout_s": 0.3},
        plugins={"enabled": ["scaicore"], "scaicore": {"invoke_timeout_s": 0.3}},
    )
    return await make_gateway(config)


@pytest.mark.parametrize("route", list(ROUTES))
async def test_upstream_timeout_504(short_timeout_gateway, upstream, manager, route):
    method, _, path, _ = ROUTES[route]
    delayed_route(upstream, method, path, 1.0, INVOKE_RESULT_TEXT.encode())
    response = await call_route(short_timeout_gateway, route, manager)
    assert response.status == 504
    assert (await response.json())["detail"]["error"] == "upstream_timeout"
    assert len(upstream.requests) == 1


@pytest.fixture
async def one_second_gateway(make_gateway, upstream, jwks_server):
    """upstream.timeout_s is 1 s; invoke keeps its default and resolve gets 5 s."""
    config = base_config(
        upstream.base_url,
        jwks_server.url,
        upstream={"timeout_s": 1},
        plugins={"enabled": ["scaicore"], "scaicore": {"resolve_timeout_s": 5}},
    )
    return await make_gateway(config)


async def test_slow_invoke_within_timeout(one_second_gateway, upstream, manager):
    delayed_route(upstream, "POST", INVOKE_UP, 1.5, INVOKE_RESULT_TEXT.encode())
    response = await call_route(one_second_gateway, "invoke", manager)
    assert response.status == 200
    assert (await response.json())["data"]["request_id"] == "req_1"


async def test_slow_resolve_within_timeout(one_second_gateway, upstream, manager):
    delayed_route(upstream, "POST", RESOLVE_UP, 1.5, RESOLVED_TEXT.encode())
    response = await call_route(one_second_gateway, "resolve", manager)
    assert response.status == 200


async def test_slow_events_hit_timeout(one_second_gateway, upstream, manager):
    delayed_route(upstream, "GET", EVENTS_UP, 1.5, b'{"data": {"events": []}}')
    response = await call_route(one_second_gateway, "events", manager)
    assert response.status == 504


def reset_route(upstream, method: str, path: str, answer_after: int | None = None):
    """Drop the connection unanswered: always, or the first ``answer_after`` times."""
    hits = {"count": 0}

    async def handler(request: web.Request) -> web.StreamResponse:
        hits["count"] += 1
        if answer_after is None or hits["count"] <= answer_after:
            request.transport.abort()
            await asyncio.sleep(0.05)
            raise ConnectionResetError("dropped by the test")
        return web.Response(
            body=b'{"data": {"events": []}}', content_type="application/json"
        )

    upstream.route(method, path, handler)


@pytest.mark.parametrize("route", ["resolve", "invoke"])
async def test_post_not_retried_on_reset(gateway, upstream, manager, route):
    reset_route(upstream, "POST", ROUTES[route][2])
    response = await call_route(gateway, route, manager)
    assert response.status == 502
    assert (await response.json())["detail"]["error"] == "bad_gateway"
    assert len(upstream.requests) == 1


async def test_get_retried_once_on_reset(gateway, upstream, viewer):
    reset_route(upstream, "GET", EVENTS_UP, answer_after=1)
    response = await call_route(gateway, "events", viewer)
    assert response.status == 200
    assert len(upstream.requests) == 2


async def test_get_gives_up_after_retry(gateway, upstream, viewer):
    reset_route(upstream, "GET", EVENTS_UP)
    response = await call_route(gateway, "events", viewer)
    assert response.status == 502
    assert len(upstream.requests) == 2


# --- configuration ---------------------------------------------------------------


def build(upstream_url: str, block: dict[str, Any]):
    config = base_config(
        upstream_url,
        "http://127.0.0.1:1/jwks.json",
        plugins={"enabled": ["scaicore"], "scaicore": block},
    )
    return create_app(settings_from_mapping(config, environ={}), environ={})


@pytest.mark.parametrize(
    "block, key",
    [
        ({"invoke_timeout_s": 0}, "plugins.scaicore.invoke_timeout_s"),
        ({"invoke_timeout_s": "soon"}, "plugins.scaicore.invoke_timeout_s"),
        ({"resolve_timeout_s": -1}, "plugins.scaicore.resolve_timeout_s"),
        ({"invoke_timeout": 60}, "plugins.scaicore.invoke_timeout"),
    ],
)
def test_bad_config_names_key(block, key):
    with pytest.raises(ConfigError) as caught:
        build("http://127.0.0.1:9", block)
    assert caught.value.key == key


def test_config_timeouts_reach_routes():
    from scaiproxy.app import ROUTES as ROUTE_SPECS

    app = build("http://127.0.0.1:9", {"invoke_timeout_s": 300, "resolve_timeout_s": 9})
    timeouts = {spec.name: spec.timeout_s for spec in app[ROUTE_SPECS]}
    assert timeouts["scaicore.invoke"] == 300
    assert timeouts["scaicore.resolve"] == 9
    assert timeouts["scaicore.events"] is None


def test_config_default_invoke_timeout():
    from scaiproxy.app import ROUTES as ROUTE_SPECS

    app = build("http://127.0.0.1:9", {})
    timeouts = {spec.name: spec.timeout_s for spec in app[ROUTE_SPECS]}
    assert timeouts["scaicore.invoke"] == 120
    assert timeouts["scaicore.resolve"] is None


# --- page caches -------------------------------------------------------------------


@pytest.fixture
async def cached_gateway(make_gateway, upstream, jwks_server):
    """Events pages are reused for 30 s; checkpoints keep the default of none."""
    config = base_config(
        upstream.base_url,
        jwks_server.url,
        plugins={"enabled": ["scaicore"], "scaicore": {"events_cache_ttl_s": 30}},
    )
    return await make_gateway(config)


CACHED_PAGE = {"data": {"events": [{"type": "x", "n": 2**70}], "next_cursor": None}}


async def test_events_cache_reuses_page(cached_gateway, upstream, viewer):
    upstream.route("GET", EVENTS_UP, json_body=CACHED_PAGE)
    first = await call_route(cached_gateway, "events", viewer)
    second = await call_route(cached_gateway, "events", viewer)
    assert await first.read() == await second.read()
    assert second.status == 200
    assert len(upstream.requests) == 1


async def test_events_cache_keyed_by_credential(cached_gateway, upstream, rsa_key):
    upstream.route("GET", EVENTS_UP, json_body=CACHED_PAGE)
    acme = mint(rsa_key, tenant_id="acme", permissions=VIEW)
    globex = mint(rsa_key, tenant_id="globex", permissions=VIEW)
    await call_route(cached_gateway, "events", acme)
    await call_route(cached_gateway, "events", globex)
    sent = [request.headers["Authorization"] for request in upstream.requests]
    assert sent == [f"Bearer {acme}", f"Bearer {globex}"]


async def test_events_cache_keyed_by_query(cached_gateway, upstream, viewer):
    upstream.route("GET", EVENTS_UP, json_body=CACHED_PAGE)
    await call_route(cached_gateway, "events", viewer, params={"limit": "5"})
    await call_route(cached_gateway, "events", viewer, params={"limit": "6"})
    assert len(upstream.requests) == 2


async def test_events_cache_skips_errors(cached_gateway, upstream, viewer):
    upstream.route("GET", EVENTS_UP, json_body={"status": "error"}, status=500)
    await call_route(cached_gateway, "events", viewer)
    await call_route(cached_gateway, "events", viewer)
    assert len(upstream.requests) == 2


async def test_checkpoints_not_cached_by_default(cached_gateway, upstream, viewer):
    page = {"data": {"checkpoints": [], "next_cursor": None}}
    upstream.route("GET", "/v1/modules/scaicore/checkpoints", json_body=page)
    await call_route(cached_gateway, "checkpoints", viewer)
    await call_route(cached_gateway, "checkpoints", viewer)
    assert len(upstream.requests) == 2
