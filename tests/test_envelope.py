"""The error envelope and the middleware order: the one place that pins the shape
``{"detail": {"error", "message", ...}}`` of every error the gateway returns."""

from __future__ import annotations

import asyncio
import io
import json
import re
from typing import Any

import pytest
from aiohttp import web
from conftest import base_config, bearer, mint
from multidict import CIMultiDict
from pydantic import BaseModel, ConfigDict, Field

from scaiproxy import RouteSpec, hookimpl
from scaiproxy.config import LoggingConfig
from scaiproxy.logs import configure_logging
from scaiproxy.routes import Call, RawJSON

LIMIT = 1024
EVENTS = "/api/v1/scaicore/events"
EVENTS_UP = "/v1/modules/scaicore/events"
ITEMS = "/api/v1/probe/items"
EMPTY_PAGE = {"data": {"events": [], "next_cursor": None}}


class ItemBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=20)
    size: int = Field(ge=1, le=100)
    tags: list[str] = []


class ItemQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(10, ge=1, le=50)
    name: str | None = Field(None, min_length=1)


class Probe:
    """Routes that succeed, validate, and fail on purpose."""

    @hookimpl
    def scaiproxy_routes(self) -> list[RouteSpec]:
        return [
            RouteSpec(
                "POST",
                "/v1/probe/items",
                self.create,
                name="probe.create",
                permission="probe:write",
                body=ItemBody,
            ),
            RouteSpec(
                "GET",
                "/v1/probe/items",
                self.search,
                name="probe.search",
                permission="probe:read",
                query=ItemQuery,
            ),
            RouteSpec("GET", "/v1/probe/boom", self.boom, name="probe.boom"),
        ]

    async def create(self, call: Call) -> dict[str, Any]:
        return call.body.model_dump()

    async def search(self, call: Call) -> dict[str, Any]:
        return call.query.model_dump()

    async def boom(self, call: Call) -> None:
        raise RuntimeError("kaboom: internal detail /srv/scaiproxy/state.db")


@pytest.fixture
async def client(make_gateway, upstream, jwks_server):
    raw = base_config(
        upstream.base_url,
        jwks_server.url,
        server={"base_path": "/api", "max_body_bytes": LIMIT},
        plugins={"enabled": ["scaicore", "probe"]},
    )
    return await make_gateway(raw, plugins={"probe": Probe()})


@pytest.fixture
def token(rsa_key) -> str:
    return mint(
        rsa_key,
        permissions=["probe:write", "probe:read", "scaicore:view", "scaicore:manage"],
    )


@pytest.fixture
def viewer(rsa_key) -> str:
    return mint(rsa_key, permissions=["scaicore:view"])


async def detail_of(response) -> dict[str, Any]:
    body = await response.json()
    assert list(body) == ["detail"]
    return body["detail"]


def assert_enveloped(response, body: dict[str, Any], code: str) -> None:
    assert response.headers["Content-Type"].startswith("application/json")
    assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", response.headers["X-Request-ID"])
    assert list(body) == ["detail"]
    assert body["detail"]["error"] == code
    assert isinstance(body["detail"]["message"], str)
    assert body["detail"]["message"]


# --- every error has the same shape -------------------------------------------


ERROR_CASES = [
    ("missing token", "GET", EVENTS, None, None, 401, "missing_token"),
    ("malformed token", "GET", EVENTS, "not-a-jwt", None, 401, "invalid_token"),
    (
        "no permission",
        "POST",
        ITEMS,
        "viewer",
        b'{"name":"a","size":1}',
        403,
        "insufficient_scope",
    ),
    ("no route", "GET", "/api/v1/nothing", None, None, 404, "not_found"),
    ("no route outside base", "GET", "/favicon.ico", None, None, 404, "not_found"),
    ("wrong method", "DELETE", EVENTS, "token", None, 405, "method_not_allowed"),
    ("too large", "POST", ITEMS, "token", b"x" * (LIMIT + 1), 413, "payload_too_large"),
    ("not json", "POST", ITEMS, "token", b"name=a", 400, "invalid_json"),
    (
        "bad field",
        "POST",
        ITEMS,
        "token",
        b'{"name":"a","size":0}',
        422,
        "validation_error",
    ),
    ("bad query", "GET", EVENTS + "?limit=0", "token", None, 422, "validation_error"),
    (
        "handler crash",
        "GET",
        "/api/v1/probe/boom",
        "token",
        None,
        500,
        "internal_error",
    ),
    ("upstream 500", "GET", EVENTS, "token", None, 502, "bad_gateway"),
]


@pytest.mark.parametrize(
    "method, path, auth, data, status, code",
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
async def test_error_enveloped(
    client, upstream, token, viewer, method, path, auth, data, status, code
):
    upstream.route("GET", EVENTS_UP, json_body={"error": "down"}, status=500)
    tokens = {"token": token, "viewer": viewer}
    headers = bearer(tokens.get(auth, auth)) if auth else {}
    response = await client.request(method, path, data=data, headers=headers)
    body = await response.json()
    assert response.status == status
    assert_enveloped(response, body, code)


async def test_not_found_names_path(client):
    response = await client.get("/api/v1/nothing")
    detail = await detail_of(response)
    assert "/api/v1/nothing" in detail["message"]
    assert detail["fix"]


async def test_method_not_allowed_sets_allow(client, token):
    response = await client.put(EVENTS, headers=bearer(token))
    detail = await detail_of(response)
    assert response.status == 405
    assert response.headers["Allow"] == "GET"
    assert "PUT" in detail["message"]
    assert detail["fix"].startswith("Send the request with GET")


async def test_method_not_allowed_on_operational_route(client):
    response = await client.post("/healthz")
    assert response.status == 405
    assert set(response.headers["Allow"].split(", ")) == {"GET", "HEAD"}


async def test_success_envelope(client, token):
    response = await client.post(
        ITEMS, json={"name": "a", "size": 3}, headers=bearer(token)
    )
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["X-Request-ID"]
    assert await response.json() == {"data": {"name": "a", "size": 3, "tags": []}}


# --- 413 ----------------------------------------------------------------------


async def test_declared_length_over_limit(client, upstream, token):
    response = await client.post(
        "/api/v1/scaicore/cores/core-1/invoke",
        data=b'{"input": {"pad": "' + b"x" * LIMIT + b'"}}',
        headers={**bearer(token), "Content-Type": "application/json"},
    )
    detail = await detail_of(response)
    assert response.status == 413
    assert detail["error"] == "payload_too_large"
    assert detail["limit"] == LIMIT
    assert upstream.requests == []


async def test_chunked_body_over_limit(client, upstream, token):
    async def chunks():
        yield b'{"input": {"pad": "'
        for _ in range(4):
            yield b"x" * 512
        yield b'"}}'

    response = await client.post(
        "/api/v1/scaicore/cores/core-1/invoke",
        data=chunks(),
        headers={**bearer(token), "Content-Type": "application/json"},
    )
    detail = await detail_of(response)
    assert response.status == 413
    assert detail["error"] == "payload_too_large"
    assert upstream.requests == []


async def test_body_at_limit_accepted(client, token):
    prefix, suffix = b'{"name":"a","size":1,"tags":["', b'"]}'
    data = prefix + b"x" * (LIMIT - len(prefix) - len(suffix)) + suffix
    assert len(data) == LIMIT
    response = await client.post(ITEMS, data=data, headers=bearer(token))
    assert response.status == 200


# --- 400 invalid_json ---------------------------------------------------------


INVALID_BODIES = {
    "not json": b"name=a&size=1",
    "empty": b"",
    "whitespace": b"  \n ",
    "invalid utf-8": b'{"name": "\xff\xfe", "size": 1}',
    "array": b'[{"name": "a", "size": 1}]',
    "number": b"42",
    "string": b'"name"',
    "null": b"null",
    "truncated": b'{"name": "a", "size": 1',
    "trailing data": b'{"name": "a", "size": 1} {}',
    "nan": b'{"name": "a", "size": NaN}',
    "infinity": b'{"name": "a", "size": -Infinity}',
    "deep arrays": b"[" * 100_000 + b"]" * 100_000,
    "deep objects": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "deep value": b'{"name": "a", "size": 1, "tags": ' + b"[" * 129 + b"]" * 129 + b"}",
}


@pytest.fixture
async def large_client(make_gateway, upstream, jwks_server):
    """A gateway whose body limit fits a JSON document nested 100,000 levels."""
    raw = base_config(
        upstream.base_url,
        jwks_server.url,
        server={"max_body_bytes": 1_000_000},
        plugins={"enabled": ["scaicore", "probe"]},
    )
    return await make_gateway(raw, plugins={"probe": Probe()})


@pytest.mark.parametrize("data", INVALID_BODIES.values(), ids=INVALID_BODIES.keys())
async def test_invalid_json_is_400(large_client, token, data):
    response = await large_client.post(ITEMS, data=data, headers=bearer(token))
    body = await response.json()
    assert response.status == 400
    assert_enveloped(response, body, "invalid_json")
    assert body["detail"]["fix"]


async def test_deep_invoke_input_not_500(large_client, upstream, token):
    upstream.route(
        "POST",
        "/v1/modules/scaicore/cores/c1/invoke",
        json_body={"data": {"output": 1}},
    )
    for depth in (900, 940, 990, 5000):
        data = b'{"input": {"a": ' + b"[" * depth + b"]" * depth + b"}}"
        response = await large_client.post(
            "/api/v1/scaicore/cores/c1/invoke", data=data, headers=bearer(token)
        )
        assert response.status == 400, depth
    assert upstream.requests == []


async def test_nesting_within_limit_accepted(client, upstream, token):
    upstream.route(
        "POST",
        "/v1/modules/scaicore/cores/c1/invoke",
        json_body={"data": {"output": 1}},
    )
    data = b'{"input": {"a": ' + b"[" * 100 + b"]" * 100 + b"}}"
    response = await client.post(
        "/api/v1/scaicore/cores/c1/invoke", data=data, headers=bearer(token)
    )
    assert response.status == 200


async def test_bom_prefixed_body_accepted(client, token):
    data = b'\xef\xbb\xbf{"name": "a", "size": 2}'
    response = await client.post(ITEMS, data=data, headers=bearer(token))
    assert response.status == 200


JSON_TYPES = [
    pytest.param(b"[1, 2]", "array", id="array"),
    pytest.param(b"null", "null", id="null"),
    pytest.param(b"42", "number", id="integer"),
    pytest.param(b"1.5", "number", id="float"),
    pytest.param(b'"name"', "string", id="string"),
    pytest.param(b"true", "boolean", id="boolean"),
]


@pytest.mark.parametrize("data, name", JSON_TYPES)
async def test_non_object_body_names_json_type(client, token, data, name):
    response = await client.post(ITEMS, data=data, headers=bearer(token))
    detail = await detail_of(response)
    assert detail["message"] == f"The request body is a JSON {name}, not an object."


DEEP_BODIES = {
    key: INVALID_BODIES[key] for key in ("deep arrays", "deep objects", "deep value")
}


@pytest.mark.parametrize("data", DEEP_BODIES.values(), ids=DEEP_BODIES.keys())
async def test_deep_body_names_depth_limit(large_client, token, data):
    response = await large_client.post(ITEMS, data=data, headers=bearer(token))
    detail = await detail_of(response)
    assert detail["message"] == (
        "The request body is not valid JSON: nested deeper than 128 levels."
    )


async def test_invalid_utf8_names_byte(client, token):
    data = b'{"name": "\xff\xfe", "size": 1}'
    response = await client.post(ITEMS, data=data, headers=bearer(token))
    detail = await detail_of(response)
    assert detail["message"] == "The request body is not valid UTF-8 (at byte 10)."


async def test_lone_surrogate_field_message(client, token):
    data = b'{"name": "\\ud800", "size": 1}'
    response = await client.post(ITEMS, data=data, headers=bearer(token))
    detail = await detail_of(response)
    assert response.status == 422
    assert detail["errors"][0]["field"] == "name"
    assert "lone surrogate" in detail["errors"][0]["message"]
    assert "unable to parse" not in detail["errors"][0]["message"]


# --- 422 ----------------------------------------------------------------------


async def test_each_bad_body_field_listed(client, token):
    response = await client.post(
        ITEMS,
        json={"name": "", "size": "big", "tags": [1], "colour": "red"},
        headers=bearer(token),
    )
    detail = await detail_of(response)
    fields = [entry["field"] for entry in detail["errors"]]
    assert response.status == 422
    assert sorted(fields) == ["colour", "name", "size", "tags.0"]
    assert all(entry["location"] == "body" for entry in detail["errors"])
    assert all(entry["message"] for entry in detail["errors"])


async def test_missing_body_field_listed(client, token):
    response = await client.post(ITEMS, json={"name": "a"}, headers=bearer(token))
    detail = await detail_of(response)
    assert detail["errors"] == [
        {"field": "size", "location": "body", "message": "required value is missing"}
    ]


async def test_each_bad_query_field_listed(client, token):
    response = await client.get(f"{ITEMS}?limit=abc&name=", headers=bearer(token))
    detail = await detail_of(response)
    fields = {entry["field"] for entry in detail["errors"]}
    assert response.status == 422
    assert fields == {"limit", "name"}
    assert "limit" in detail["message"]


async def test_repeated_query_parameter(client, token):
    response = await client.get(
        f"{ITEMS}?limit=1&limit=2&limit=3", headers=bearer(token)
    )
    detail = await detail_of(response)
    assert response.status == 422
    assert len(detail["errors"]) == 1
    assert detail["errors"][0]["field"] == "limit"
    assert "more than once" in detail["errors"][0]["message"]


async def test_unknown_query_parameter(client, token):
    response = await client.get(f"{ITEMS}?lmit=5&x=1&x=2", headers=bearer(token))
    detail = await detail_of(response)
    fields = [entry["field"] for entry in detail["errors"]]
    assert response.status == 422
    assert fields == ["lmit", "x"]
    assert "allowed: limit, name" in detail["errors"][0]["message"]


async def test_many_unknown_parameters_listed_briefly(client, token):
    query = "&".join(f"p{number}=1" for number in range(1500))
    response = await client.get(f"{ITEMS}?{query}", headers=bearer(token))
    body = await response.read()
    detail = json.loads(body)["detail"]
    assert response.status == 422
    assert len(detail["errors"]) == 20
    assert detail["unlisted"] == 1480
    assert detail["message"].endswith("p19 and 1480 more.")
    assert len(body) < len(query)


async def test_query_on_route_without_query(client, token):
    response = await client.get("/api/v1/probe/boom?debug=1", headers=bearer(token))
    detail = await detail_of(response)
    assert response.status == 422
    assert "allowed: none" in detail["errors"][0]["message"]


async def test_bad_query_not_forwarded(client, upstream, viewer):
    response = await client.get(f"{EVENTS}?limit=501", headers=bearer(viewer))
    assert response.status == 422
    assert upstream.requests == []


# --- 500 ----------------------------------------------------------------------


async def test_handler_crash_logged_not_sent(client, token):
    stream = io.StringIO()
    configure_logging(LoggingConfig(format="json", level="info"), stream=stream)
    response = await client.get("/api/v1/probe/boom", headers=bearer(token))
    text = await response.text()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    crashes = [line for line in lines if line["event"] == "unhandled_error"]
    assert response.status == 500
    assert "kaboom" not in text
    assert "Traceback" not in text
    assert "RuntimeError" not in text
    assert len(crashes) == 1
    assert crashes[0]["level"] == "error"
    assert crashes[0]["exception"][0]["exc_type"] == "RuntimeError"
    assert "kaboom" in crashes[0]["exception"][0]["exc_value"]
    assert crashes[0]["request_id"] == response.headers["X-Request-ID"]


# --- X-Request-ID -------------------------------------------------------------


KEPT_IDS = ["a", "req-1", "A.b_c:d-9", "x" * 128, "0123456789abcdef"]
REPLACED_IDS = [
    "",
    "x" * 129,
    "has space",
    "semi;colon",
    "slash/id",
    "caf\u00e9",
    "abc%0D%0AX-Evil: 1",
    "<script>",
    # Shaped like a JWT and like a ScaiGrid key: never echoed or forwarded.
    "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl",
    "sgk_" + "a" * 36,
]


@pytest.mark.parametrize("given", KEPT_IDS)
async def test_request_id_kept(client, upstream, viewer, given):
    upstream.route("GET", EVENTS_UP, json_body=EMPTY_PAGE)
    response = await client.get(
        EVENTS, headers={**bearer(viewer), "X-Request-ID": given}
    )
    assert response.status == 200
    assert response.headers["X-Request-ID"] == given
    assert upstream.last.headers["X-Request-ID"] == given


@pytest.mark.parametrize("given", REPLACED_IDS)
async def test_request_id_replaced(client, upstream, viewer, given):
    upstream.route("GET", EVENTS_UP, json_body=EMPTY_PAGE)
    headers = CIMultiDict(bearer(viewer))
    headers["X-Request-ID"] = given
    response = await client.get(EVENTS, headers=headers)
    sent = response.headers["X-Request-ID"]
    assert response.status == 200
    assert sent != given
    assert re.fullmatch(r"[0-9a-f]{32}", sent)
    assert upstream.last.headers["X-Request-ID"] == sent


async def test_request_id_made_when_absent(client, upstream, viewer):
    upstream.route("GET", EVENTS_UP, json_body=EMPTY_PAGE)
    first = await client.get(EVENTS, headers=bearer(viewer))
    second = await client.get(EVENTS, headers=bearer(viewer))
    assert first.headers["X-Request-ID"] != second.headers["X-Request-ID"]
    assert upstream.last.headers["X-Request-ID"] == second.headers["X-Request-ID"]


async def test_repeated_request_id_replaced(client, upstream, viewer):
    upstream.route("GET", EVENTS_UP, json_body=EMPTY_PAGE)
    headers = CIMultiDict(bearer(viewer))
    headers.add("X-Request-ID", "first")
    headers.add("X-Request-ID", "second")
    response = await client.get(EVENTS, headers=headers)
    sent = response.headers["X-Request-ID"]
    assert sent not in ("first", "second")
    assert upstream.last.headers["X-Request-ID"] == sent
    assert len(upstream.last.header_names) == len(set(upstream.last.header_names))


async def raw_exchange(client, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


async def test_crlf_in_request_id_not_echoed(client):
    """A CR/LF pair ends the header: the rest is a separate header, never echoed."""
    raw = await raw_exchange(
        client,
        b"GET /healthz HTTP/1.1\r\nHost: gw\r\n"
        b"X-Request-ID: abc\r\nX-Evil: injected\r\nConnection: close\r\n\r\n",
    )
    head = raw.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 200")
    assert b"x-request-id: abc\r\n" in head + b"\r\n"
    assert b"x-evil" not in head


@pytest.mark.parametrize(
    "header",
    [
        b"X-Request-ID: abc\rX-Evil: 1",
        b"X-Request-ID: abc\nX-Evil: 1",
        b"X-Request-ID: abc\r\n X-Evil: 1",
    ],
    ids=["bare CR", "bare LF", "folded"],
)
async def test_header_injection_not_echoed(client, header):
    """aiohttp's parser rejects broken header lines or splits them; neither echoes."""
    raw = await raw_exchange(
        client,
        b"GET /healthz HTTP/1.1\r\nHost: gw\r\n" + header + b"\r\n"
        b"Connection: close\r\n\r\n",
    )
    head = raw.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.")
    assert b"x-evil" not in head


# --- middleware order: tracing, errors, auth, permission, handler -------------


async def test_unauthenticated_request_traced(client):
    response = await client.get(EVENTS, headers={"X-Request-ID": "trace-401"})
    metrics = await (await client.get("/metrics")).text()
    assert response.status == 401
    assert response.headers["X-Request-ID"] == "trace-401"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    counted = 'route="scaicore.events",status="401"} 1.0'
    assert f'scaiproxy_requests_total{{method="GET",{counted}' in metrics


async def test_forbidden_before_body_validation(client, viewer):
    response = await client.post(ITEMS, data=b"{not json", headers=bearer(viewer))
    detail = await detail_of(response)
    assert response.status == 403
    assert detail["required"] == "probe:write"


async def test_forbidden_before_size_check(client, viewer):
    response = await client.post(ITEMS, data=b"x" * (LIMIT * 4), headers=bearer(viewer))
    assert response.status == 403


async def test_unauthenticated_before_path_validation(client, upstream):
    response = await client.post("/api/v1/scaicore/cores/a%20b/invoke", json={})
    assert response.status == 401


async def test_forbidden_before_path_validation(client, viewer):
    response = await client.post(
        "/api/v1/scaicore/cores/a%20b/invoke",
        json={"input": {}},
        headers=bearer(viewer),
    )
    assert response.status == 403


async def test_unknown_route_404_without_token(client):
    response = await client.get("/api/v1/scaicore/nothing")
    assert response.status == 404


async def test_wrong_method_405_without_token(client):
    response = await client.delete(EVENTS)
    assert response.status == 405


async def test_forbidden_response_names_permission(client, viewer):
    response = await client.get(ITEMS, headers=bearer(viewer))
    detail = await detail_of(response)
    assert response.status == 403
    assert detail["error"] == "insufficient_scope"
    assert detail["required"] == "probe:read"
    assert "probe:read" in detail["message"]
    assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]


async def test_invalid_token_challenge(client):
    response = await client.get(EVENTS, headers=bearer("a.b.c"))
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


async def test_operational_routes_need_no_token(client):
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        response = await client.get(path)
        assert response.status == 200, path
        assert response.headers["X-Request-ID"], path


async def test_error_status_counted_by_route(client, token):
    await client.get("/api/v1/probe/boom", headers=bearer(token))
    metrics = await (await client.get("/metrics")).text()
    assert 'route="probe.boom",status="500"' in metrics


async def test_stream_response_passes(make_gateway, upstream, jwks_server, rsa_key):
    """A handler may return its own response; it still gets the request id."""

    class Raw:
        @hookimpl
        def scaiproxy_routes(self) -> list[RouteSpec]:
            async def text(call: Call) -> web.Response:
                return web.Response(text="plain")

            return [RouteSpec("GET", "/v1/raw", text, name="raw")]

    raw = base_config(upstream.base_url, jwks_server.url, plugins={"enabled": ["raw"]})
    client = await make_gateway(raw, plugins={"raw": Raw()})
    response = await client.get("/api/v1/raw", headers=bearer(mint(rsa_key)))
    assert await response.text() == "plain"
    assert response.headers["X-Request-ID"]


async def test_redirect_keeps_request_id(make_gateway, upstream, jwks_server, rsa_key):
    """A handler may raise an aiohttp redirect; it is counted with its status."""

    class Moved:
        @hookimpl
        def scaiproxy_routes(self) -> list[RouteSpec]:
            async def moved(call: Call) -> None:
                raise web.HTTPFound("/api/v1/elsewhere")

            return [RouteSpec("GET", "/v1/moved", moved, name="moved")]

    raw = base_config(
        upstream.base_url, jwks_server.url, plugins={"enabled": ["moved"]}
    )
    client = await make_gateway(raw, plugins={"moved": Moved()})
    response = await client.get(
        "/api/v1/moved",
        headers={**bearer(mint(rsa_key)), "X-Request-ID": "moved-1"},
        allow_redirects=False,
    )
    metrics = await (await client.get("/metrics")).text()
    assert response.status == 302
    assert response.headers["X-Request-ID"] == "moved-1"
    assert 'route="moved",status="302"' in metrics


async def test_empty_query_name_listed(client, token):
    response = await client.get(f"{ITEMS}?=5", headers=bearer(token))
    detail = await detail_of(response)
    assert response.status == 422
    assert detail["errors"][0]["field"] == "(empty name)"


# --- 408 request_timeout ------------------------------------------------------


INVOKE = "/api/v1/scaicore/cores/c1/invoke"


async def raw_request(client, head: bytes, parts: list[bytes], pause_s: float):
    """Send ``head`` and the body ``parts`` with ``pause_s`` between them.

    Returns the response's status, headers and decoded JSON body, waiting at
    most 5 s for each part of the response.
    """
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(head)
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(pause_s)
        status_line = await asyncio.wait_for(reader.readline(), 5)
        lines = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).split(
            b"\r\n"
        )
        headers = CIMultiDict(
            line.decode("latin-1").split(": ", 1) for line in lines if b": " in line
        )
        body = await asyncio.wait_for(
            reader.readexactly(int(headers["Content-Length"])), 5
        )
    finally:
        writer.close()
    return int(status_line.split()[1]), headers, json.loads(body)


def post_head(path: str, token: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


@pytest.fixture
async def slow_body_client(make_gateway, upstream, jwks_server):
    """A gateway that waits 0.5 s for a request body."""
    upstream.route(
        "POST",
        "/v1/modules/scaicore/cores/c1/invoke",
        json_body={"data": {"output": 1}},
    )
    raw = base_config(
        upstream.base_url,
        jwks_server.url,
        server={"body_timeout_s": 0.5},
        plugins={"enabled": ["scaicore", "probe"]},
    )
    return await make_gateway(raw, plugins={"probe": Probe()})


async def test_incomplete_body_is_408(slow_body_client, upstream, token):
    status, headers, body = await raw_request(
        slow_body_client, post_head(INVOKE, token, 100), [b'{"input":'], 0
    )
    assert status == 408
    assert body["detail"]["error"] == "request_timeout"
    assert "9 bytes received" in body["detail"]["message"]
    assert headers["Connection"] == "close"
    assert upstream.requests == []


async def test_body_in_parts_within_timeout(slow_body_client, upstream, token):
    parts = [b'{"input": ', b'{"a": 1}', b"}"]
    length = sum(len(part) for part in parts)
    status, _, body = await raw_request(
        slow_body_client, post_head(INVOKE, token, length), parts, 0.1
    )
    assert status == 200, body
    assert upstream.last.body == b'{"input":{"a": 1}}'


async def test_openapi_lists_408_for_body_routes(client):
    document = await (await client.get("/openapi.json")).json()
    operations = document["paths"]["/api/v1/probe/items"]
    assert "408" in operations["post"]["responses"]
    assert "408" not in operations["get"]["responses"]


def test_raw_json_envelope_built_once():
    value = RawJSON(b'[{"n":123456789012345678901234567890}]')
    body = value.enveloped()
    assert body == b'{"data":[{"n":123456789012345678901234567890}]}'
    assert value.enveloped() is body


# --- requests that aiohttp's parser rejects ------------------------------------


def response_head(raw: bytes) -> dict[str, str]:
    lines = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return {
        name.lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines)
    }


async def test_rejected_request_id_logged(client, log_stream):
    raw = await raw_exchange(
        client, b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Bad: a\x01b\r\n\r\n"
    )
    request_id = response_head(raw)["x-request-id"]
    lines = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    [rejected] = [line for line in lines if line["event"] == "http_request_rejected"]
    assert raw.startswith(b"HTTP/1.0 400")
    assert rejected["request_id"] == request_id


async def test_too_many_headers_explained(client):
    headers = b"".join(b"X-H%d: v\r\n" % number for number in range(129))
    raw = await raw_exchange(
        client, b"GET /healthz HTTP/1.1\r\nHost: gw\r\n" + headers + b"\r\n"
    )
    body = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    assert raw.startswith(b"HTTP/1.0 400")
    assert "more than 128 header lines" in body["detail"]["message"]
