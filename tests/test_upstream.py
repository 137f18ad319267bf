"""Upstream calls against a real aiohttp server: statuses, faults, limits,
outgoing headers, retries, disconnects and coalescing."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import socket
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import base_config, bearer, mint

from scaiproxy import RouteSpec, __version__, hookimpl
from scaiproxy.app import METRICS, SESSION, UPSTREAM, create_app
from scaiproxy.config import LoggingConfig, settings_from_mapping
from scaiproxy.logs import configure_logging
from scaiproxy.routes import Call
from scaiproxy.upstream import UpstreamCaller, upstream_url

EVENTS = "/api/v1/scaicore/events"
EVENTS_UP = "/v1/modules/scaicore/events"
RESOLVE = "/api/v1/scaicore/checkpoints/ckpt-1/resolve"
RESOLVE_UP = "/v1/modules/scaicore/checkpoints/ckpt-1/resolve"
PAGE = {
    "data": {
        "events": [{"id": "e1", "type": "scaicore.runtime.block.entered"}],
        "next_cursor": None,
    }
}
ENV_KEY = "sgk_" + "k" * 40
ROUTE_TIMEOUT_S = 0.4


class Fetch:
    """A route with its own short timeout that GETs ``/v1/slow`` upstream."""

    @hookimpl
    def scaiproxy_routes(self) -> list[RouteSpec]:
        async def fetch(call: Call) -> Any:
            response = await call.upstream.get("/v1/slow")
            return response.json()

        return [
            RouteSpec(
                "GET", "/v1/fetch", fetch, name="fetch", timeout_s=ROUTE_TIMEOUT_S
            )
        ]


def config(upstream_url: str, jwks_url: str, **sections: Any) -> dict[str, Any]:
    sections.setdefault("plugins", {"enabled": ["scaicore", "fetch"]})
    return base_config(upstream_url, jwks_url, **sections)


@pytest.fixture
async def gateway(make_gateway, upstream, jwks_server):
    return await make_gateway(
        config(upstream.base_url, jwks_server.url), plugins={"fetch": Fetch()}
    )


@pytest.fixture
async def key_gateway(make_gateway, upstream, jwks_server):
    """A gateway that sends the environment's sgk_ key, never the caller's JWT."""
    raw = config(
        upstream.base_url, jwks_server.url, auth={"upstream_credentials": "api_key"}
    )
    return await make_gateway(
        raw, environ={"SCAIGRID_API_KEY": ENV_KEY}, plugins={"fetch": Fetch()}
    )


@pytest.fixture
def token(rsa_key) -> str:
    return mint(rsa_key, permissions=["scaicore:view", "scaicore:manage"])


@pytest.fixture
def log_stream() -> io.StringIO:
    stream = io.StringIO()
    configure_logging(LoggingConfig(format="json", level="info"), stream=stream)
    return stream


def events(stream: io.StringIO, name: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [line for line in lines if line["event"] == name]


def scaigrid_error(code: str, message: str, request_id: str = "sg-req-1") -> dict:
    return {
        "status": "error",
        "error": {"code": code, "message": message},
        "meta": {"request_id": request_id},
    }


def raw_route(
    upstream,
    method: str,
    path: str,
    body: bytes,
    status: int = 200,
    content_type: str = "application/json",
    headers=None,
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            status=status, body=body, content_type=content_type, headers=headers
        )

    upstream.route(method, path, handler)


def reset_route(upstream, method: str, path: str, answer_after: int | None = None):
    """Drop the connection without a response, up to ``answer_after`` times."""
    hits = {"count": 0}

    async def handler(request: web.Request) -> web.StreamResponse:
        hits["count"] += 1
        if answer_after is None or hits["count"] <= answer_after:
            request.transport.abort()
            await asyncio.sleep(0.05)
            raise ConnectionResetError("dropped by the test")
        return web.json_response(PAGE)

    upstream.route(method, path, handler)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def acquired(client) -> int:
    # aiohttp keeps the connections handed out and not yet released here.
    return len(client.app[SESSION].connector._acquired)


async def detail_of(response) -> dict[str, Any]:
    body = await response.json()
    assert list(body) == ["detail"]
    return body["detail"]


# --- responses ---------------------------------------------------------------


async def test_ok_passes_page(gateway, upstream, token):
    upstream.route("GET", EVENTS_UP, json_body=PAGE)
    response = await gateway.get(EVENTS, headers=bearer(token))
    assert response.status == 200
    assert await response.json() == PAGE
    assert upstream.last.path == EVENTS_UP


async def test_cursor_reencoded(gateway, upstream, token):
    upstream.route("GET", EVENTS_UP, json_body=PAGE)
    response = await gateway.get(
        EVENTS, params={"cursor": "a+b/c==&x=1"}, headers=bearer(token)
    )
    assert response.status == 200
    assert upstream.last.query["cursor"] == ["a+b/c==&x=1"]
    assert "x" not in upstream.last.query


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
async def test_scaigrid_error_kept_with_jwt(gateway, upstream, token, status):
    upstream.route(
        "GET",
        EVENTS_UP,
        json_body=scaigrid_error("core_not_found", "Core c9 does not exist"),
        status=status,
    )
    response = await gateway.get(EVENTS, headers=bearer(token))
    detail = await detail_of(response)
    assert response.status == status
    assert detail["error"] == "upstream_error"
    assert detail["upstream_code"] == "core_not_found"
    assert detail["message"] == "Core c9 does not exist"
    assert detail["upstream_request_id"] == "sg-req-1"


async def test_scaigrid_error_request_id_from_header(gateway, upstream, token):
    upstream.route(
        "GET",
        EVENTS_UP,
        json_body={"detail": "Not Found"},
        status=404,
        headers={"X-Request-ID": "sg-header-id"},
    )
    response = await gateway.get(EVENTS, headers=bearer(token))
    detail = await detail_of(response)
    assert response.status == 404
    assert detail["upstream_request_id"] == "sg-header-id"
    assert detail["upstream_code"] is None


@pytest.mark.parametrize("status", [401, 403])
async def test_rejected_key_is_502(key_gateway, upstream, token, status):
    upstream.route(
        "GET",
        EVENTS_UP,
        json_body=scaigrid_error("invalid_api_key", "API key revoked"),
        status=status,
    )
    response = await key_gateway.get(EVENTS, headers=bearer(token))
    text = await response.text()
    detail = json.loads(text)["detail"]
    assert response.status == 502
    assert detail["error"] == "upstream_auth_failed"
    assert detail["upstream_status"] == status
    assert detail["fix"]
    assert ENV_KEY not in text
    assert "sgk_…kkkk" in detail["message"]
    assert upstream.last.headers["Authorization"] == f"Bearer {ENV_KEY}"


async def test_key_mode_never_sends_jwt(key_gateway, upstream, token):
    upstream.route("GET", EVENTS_UP, json_body=PAGE)
    response = await key_gateway.get(EVENTS, headers=bearer(token))
    assert response.status == 200
    assert token not in json.dumps(upstream.last.headers)


async def test_rate_limit_headers_kept(gateway, upstream, token):
    upstream.route(
        "GET",
        EVENTS_UP,
        json_body={
            "status": "error",
            "error": {"code": "rate_limited", "message": "Slow down", "retry_after": 7},
            "meta": {"request_id": "sg-429"},
        },
        status=429,
        headers={
            "Retry-After": "7",
            "X-Scaigrid-Ratelimit-Limit": "100",
            "X-Scaigrid-Ratelimit-Remaining": "0",
            "X-Scaigrid-Ratelimit-Reset": "1767225600",
            "X-Internal-Shard": "eu-3",
        },
    )
    response = await gateway.get(EVENTS, headers=bearer(token))
    detail = await detail_of(response)
    assert response.status == 429
    assert response.headers["Retry-After"] == "7"
    assert response.headers["X-Scaigrid-Ratelimit-Limit"] == "100"
    assert response.headers["X-Scaigrid-Ratelimit-Remaining"] == "0"
    assert response.headers["X-Scaigrid-Ratelimit-Reset"] == "1767225600"
    assert "X-Internal-Shard" not in response.headers
    assert detail["upstream_request_id"] == "sg-429"


async def test_rate_limit_retry_after_from_body(gateway, upstream, token):
    upstream.route(
        "GET",
        EVENTS_UP,
        json_body={
            "status": "error",
            "error": {"code": "rate_limited", "retry_after": 3},
        },
        status=429,
    )
    response = await gateway.get(EVENTS, headers=bearer(token))
    assert response.status == 429
    assert response.headers["Retry-After"] == "3"


async def test_html_error_page_is_502(gateway, upstream, token):
    raw_route(
        upstream,
        "GET",
        EVENTS_UP,
        b"<html><body><h1>502 Bad Gateway</h1>nginx</body></html>",
        status=502,
        content_type="text/html",
    )
    response = await gateway.get(EVENTS, headers=bearer(token))
    text = await response.text()
    assert response.status == 502
    assert json.loads(text)["detail"]["error"] == "bad_gateway"
    assert "<html>" not in text
    assert "nginx" not in text


@pytest.mark.parametrize("status", [500, 501, 502, 504])
async def test_server_error_is_502(gateway, upstream, token, status):
    upstream.route(
        "GET", EVENTS_UP, json_body=scaigrid_error("boom", "db down"), status=status
    )
    response = await gateway.get(EVENTS, headers=bearer(token))
    detail = await detail_of(response)
    assert response.status == 502
    assert detail["error"] == "bad_gateway"
    assert detail["upstream_status"] == status
    assert "db down" not in detail["message"]


async def test_unavailable_keeps_retry_after(gateway, upstream, token):
    upstream.route(
        "GET", EVENTS_UP, json_body={}, status=503, headers={"Retry-After": "30"}
    )
    response = await gateway.get(EVENTS, headers=bearer(token))
    assert response.status == 502
    assert response.headers["Retry-After"] == "30"


async def test_redirect_not_followed(gateway, upstream, token):
    upstream.route(
        "GET",
        EVENTS_UP,
        json_body={},
        status=302,
        headers={"Location": "http://127.0.0.1:1/elsewhere"},
    )
    response = await gateway.get(EVENTS, headers=bearer(token))
    assert response.status == 502
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(
    "body, content_type",
    [
        (b"<html>ok</html>", "text/html"),
        (b"", "application/json"),
        (b'{"data": {"events": [', "application/json"),
        (b"\xff\xfe\x00", "application/json"),
    ],
    ids=["html", "empty", "truncated", "binary"],
)
async def test_non_json_success_is_502(gateway, upstream, token, body, content_type):
    raw_route(upstream, "GET", EVENTS_UP, body, content_type=content_type)
    response = await gateway.get(EVENTS, headers=bearer(token))
    detail = await detail_of(response)
    assert response.status == 502
    assert detail["error"] == "bad_gateway"


@pytest.mark.parametrize(
    "payload",
    [
        [1, 2],
        {"events": []},
        {"data": 5},
        {"data": {"events": "none"}},
        {"data": {"events": [1, 2]}},
        {"data": {"events": [], "next_cursor": 7}},
    ],
    ids=[
        "array",
        "no data",
        "data number",
        "events string",
        "events ints",
        "cursor int",
    ],
)
async def test_wrong_shape_is_502(gateway, upstream, token, payload):
    upstream.route("GET", EVENTS_UP, json_body=payload)
    response = await gateway.get(EVENTS, headers=bearer(token))
    detail = await detail_of(response)
    assert response.status == 502
    assert detail["error"] == "bad_gateway"


async def test_wrong_shape_counted(gateway, upstream, token):
    upstream.route("GET", EVENTS_UP, json_body={"data": 5})
    await gateway.get(EVENTS, headers=bearer(token))
    metrics = await (await gateway.get("/metrics")).text()
    assert (
        'scaiproxy_upstream_errors_total{kind="bad_shape",route="scaicore.events"}'
        in metrics
    )


# --- timeouts, resets, limits -------------------------------------------------


def slow_route(upstream, path: str, delay_s: float) -> None:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(delay_s)
        return web.json_response({"data": {"late": True}})

    upstream.route("GET", path, handler)


async def test_timeout_is_504_within_route_timeout(gateway, upstream, token):
    slow_route(upstream, "/v1/slow", 3)
    started = time.monotonic()
    response = await gateway.get("/api/v1/fetch", headers=bearer(token))
    elapsed = time.monotonic() - started
    detail = await detail_of(response)
    assert response.status == 504
    assert detail["error"] == "upstream_timeout"
    assert f"{ROUTE_TIMEOUT_S:g} s" in detail["message"]
    assert elapsed < ROUTE_TIMEOUT_S + 0.5
    assert len(upstream.requests) == 1


async def test_retry_shares_route_timeout(gateway, upstream, token):
    """A reset and then a slow response still end within one route timeout."""
    hits = {"count": 0}

    async def handler(request: web.Request) -> web.StreamResponse:
        hits["count"] += 1
        if hits["count"] == 1:
            await asyncio.sleep(ROUTE_TIMEOUT_S / 2)
            request.transport.abort()
            raise ConnectionResetError("dropped by the test")
        await asyncio.sleep(3)
        return web.json_response({"data": {}})

    upstream.route("GET", "/v1/slow", handler)
    started = time.monotonic()
    response = await gateway.get("/api/v1/fetch", headers=bearer(token))
    elapsed = time.monotonic() - started
    assert response.status == 504
    assert hits["count"] == 2
    assert elapsed < ROUTE_TIMEOUT_S + 0.5


async def test_get_retried_once_on_reset(gateway, upstream, token):
    reset_route(upstream, "GET", EVENTS_UP, answer_after=1)
    response = await gateway.get(EVENTS, headers=bearer(token))
    assert response.status == 200
    assert len(upstream.requests) == 2


async def test_get_gives_up_after_one_retry(gateway, upstream, token):
    reset_route(upstream, "GET", EVENTS_UP)
    response = await gateway.get(EVENTS, headers=bearer(token))
    detail = await detail_of(response)
    assert response.status == 502
    assert detail["error"] == "bad_gateway"
    assert len(upstream.requests) == 2


async def test_get_retry_after_pooled_connection(gateway, upstream, token):
    """A pooled connection that drops still costs only one retry."""
    upstream.route("GET", EVENTS_UP, json_body=PAGE)
    assert (await gateway.get(EVENTS, headers=bearer(token))).status == 200
    reset_route(upstream, "GET", EVENTS_UP)
    response = await gateway.get(EVENTS, headers=bearer(token))
    assert response.status == 502
    assert len(upstream.requests) == 3


async def test_post_never_retried(gateway, upstream, token):
    reset_route(upstream, "POST", RESOLVE_UP)
    response = await gateway.post(
        RESOLVE, json={"resolution": "approve"}, headers=bearer(token)
    )
    assert response.status == 502
    assert len(upstream.requests) == 1


async def test_declared_body_over_limit(make_gateway, upstream, jwks_server, token):
    raw = config(
        upstream.base_url, jwks_server.url, upstream={"max_response_bytes": 1000}
    )
    client = await make_gateway(raw, plugins={"fetch": Fetch()})
    big = {"data": {"events": [{"pad": "x" * 2000}], "next_cursor": None}}
    upstream.route("GET", EVENTS_UP, json_body=big)
    response = await client.get(EVENTS, headers=bearer(token))
    detail = await detail_of(response)
    assert response.status == 502
    assert "max_response_bytes" in detail["message"]
    assert acquired(client) == 0


async def test_streamed_body_over_limit(make_gateway, upstream, jwks_server, token):
    raw = config(
        upstream.base_url, jwks_server.url, upstream={"max_response_bytes": 1000}
    )
    client = await make_gateway(raw, plugins={"fetch": Fetch()})

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(b'{"data": {"events": [')
        for _ in range(20):
            await response.write(b'{"pad": "' + b"x" * 100 + b'"},')
            await asyncio.sleep(0.001)
        await response.write(b"{}]}}")
        return response

    upstream.route("GET", EVENTS_UP, handler)
    response = await client.get(EVENTS, headers=bearer(token))
    assert response.status == 502
    assert acquired(client) == 0


async def test_decompressed_body_over_limit(make_gateway, upstream, jwks_server, token):
    """The limit counts decompressed bytes, so a small gzip body cannot expand."""
    raw = config(
        upstream.base_url, jwks_server.url, upstream={"max_response_bytes": 10_000}
    )
    client = await make_gateway(raw, plugins={"fetch": Fetch()})
    payload = b'{"data": {"events": [], "pad": "' + b"x" * 1_000_000 + b'"}}'
    compressed = gzip.compress(payload)
    assert len(compressed) < 10_000
    raw_route(
        upstream, "GET", EVENTS_UP, compressed, headers={"Content-Encoding": "gzip"}
    )
    response = await client.get(EVENTS, headers=bearer(token))
    detail = await detail_of(response)
    assert response.status == 502
    assert "max_response_bytes" in detail["message"]


async def test_gzip_body_decoded(gateway, upstream, token):
    raw_route(
        upstream,
        "GET",
        EVENTS_UP,
        gzip.compress(json.dumps(PAGE).encode()),
        headers={"Content-Encoding": "gzip"},
    )
    response = await gateway.get(EVENTS, headers=bearer(token))
    assert response.status == 200
    assert await response.json() == PAGE


async def test_streamed_body_read_whole(gateway, upstream, token):
    """A body that arrives in many chunks is read to its end, not to the first."""
    items = [{"id": f"e{i}", "pad": "y" * 500} for i in range(400)]
    payload = json.dumps({"data": {"events": items, "next_cursor": "n"}}).encode()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for start in range(0, len(payload), 8192):
            await response.write(payload[start : start + 8192])
            await asyncio.sleep(0.001)
        return response

    upstream.route("GET", EVENTS_UP, handler)
    response = await gateway.get(EVENTS, headers=bearer(token))
    body = await response.json()
    assert response.status == 200
    assert body["data"]["events"] == items


async def test_unreachable_is_502(make_gateway, jwks_server, token):
    raw = config(f"http://127.0.0.1:{closed_port()}", jwks_server.url)
    client = await make_gateway(raw, plugins={"fetch": Fetch()})
    response = await client.get(EVENTS, headers=bearer(token))
    detail = await detail_of(response)
    assert response.status == 502
    assert detail["error"] == "bad_gateway"
    assert "127.0.0.1" not in detail["message"]


async def test_failures_release_connections(gateway, upstream, token):
    upstream.route("GET", EVENTS_UP, json_body={"data": 5})
    await gateway.get(EVENTS, headers=bearer(token))
    upstream.route("GET", EVENTS_UP, json_body={}, status=500)
    await gateway.get(EVENTS, headers=bearer(token))
    slow_route(upstream, "/v1/slow", 2)
    await gateway.get("/api/v1/fetch", headers=bearer(token))
    assert acquired(gateway) == 0


# --- client disconnects -------------------------------------------------------


async def leave_early(url: str, token: str) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError):
            async with session.get(
                url, headers=bearer(token), timeout=aiohttp.ClientTimeout(total=0.2)
            ):
                pass


async def test_client_disconnect_logged(gateway, upstream, token, log_stream):
    slow_route(upstream, EVENTS_UP, 0.8)
    await leave_early(str(gateway.make_url(EVENTS)), token)
    await asyncio.sleep(1.0)

    disconnects = events(log_stream, "client_disconnected")
    assert len(disconnects) == 1
    assert disconnects[0]["level"] == "info"
    assert disconnects[0]["status"] == 499
    assert events(log_stream, "unhandled_error") == []
    assert acquired(gateway) == 0

    upstream.route("GET", EVENTS_UP, json_body=PAGE)
    response = await gateway.get(EVENTS, headers=bearer(token))
    assert response.status == 200


async def test_client_disconnect_without_cancellation(
    upstream, jwks_server, token, log_stream
):
    """``web.run_app`` does not cancel handlers; the upstream call then finishes."""
    settings = settings_from_mapping(
        config(upstream.base_url, jwks_server.url, plugins={"enabled": ["scaicore"]}),
        environ={},
    )
    app = create_app(settings, environ={})
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    try:
        slow_route(upstream, EVENTS_UP, 0.6)
        await leave_early(base + EVENTS, token)
        await asyncio.sleep(0.9)

        disconnects = events(log_stream, "client_disconnected")
        assert len(disconnects) == 1
        assert disconnects[0]["level"] == "info"
        assert events(log_stream, "unhandled_error") == []
        assert len(app[SESSION].connector._acquired) == 0

        upstream.route("GET", EVENTS_UP, json_body=PAGE)
        async with aiohttp.ClientSession() as session:
            async with session.get(base + EVENTS, headers=bearer(token)) as response:
                assert response.status == 200
    finally:
        await runner.cleanup()


# --- outgoing headers ---------------------------------------------------------


BUILT_HEADERS = {
    "host",
    "authorization",
    "x-request-id",
    "accept",
    "accept-encoding",
    "user-agent",
    "traceparent",
    "content-type",
    "content-length",
}


async def test_outgoing_headers_built(gateway, upstream, token):
    upstream.route("GET", EVENTS_UP, json_body=PAGE)
    headers = {
        **bearer(token),
        "Cookie": "session=abc123",
        "Host": "evil.example",
        "X-Forwarded-For": "10.1.2.3",
        "X-Forwarded-Host": "evil.example",
        "X-Forwarded-Proto": "https",
        "Forwarded": "for=10.1.2.3",
        "Connection": "keep-alive, X-Foo",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "X-Foo": "bar",
        "Origin": "http://canvas.example",
        "User-Agent": "Mozilla/5.0",
    }
    response = await gateway.get(EVENTS, headers=headers)
    sent = upstream.last
    assert response.status == 200
    assert set(sent.header_names) <= BUILT_HEADERS
    assert sent.headers["Host"] == upstream.base_url.removeprefix("http://")
    assert sent.headers["User-Agent"] == f"scaiproxy/{__version__}"
    assert sent.headers["Accept"] == "application/json"
    assert sent.headers["Authorization"] == f"Bearer {token}"
    assert "content-type" not in sent.header_names


async def test_post_sends_content_type(gateway, upstream, token):
    upstream.route("POST", RESOLVE_UP, json_body={"data": {"id": "ckpt-1"}})
    response = await gateway.post(
        RESOLVE,
        json={"resolution": "approve"},
        headers={**bearer(token), "Cookie": "session=abc123"},
    )
    assert response.status == 200
    assert set(upstream.last.header_names) <= BUILT_HEADERS
    assert upstream.last.headers["Content-Type"] == "application/json"
    assert json.loads(upstream.last.body) == {"resolution": "approve"}


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def test_traceparent_forwarded(gateway, upstream, token):
    upstream.route("GET", EVENTS_UP, json_body=PAGE)
    await gateway.get(EVENTS, headers={**bearer(token), "traceparent": TRACEPARENT})
    assert upstream.last.headers["traceparent"] == TRACEPARENT


@pytest.mark.parametrize(
    "value",
    [
        TRACEPARENT.upper(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "-" * 55,
        TRACEPARENT + "-extra",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\u00e9",
    ],
    ids=[
        "upper",
        "short",
        "zero trace",
        "zero parent",
        "version ff",
        "dashes",
        "extra",
        "non-ascii",
    ],
)
async def test_malformed_traceparent_dropped(gateway, upstream, token, value):
    upstream.route("GET", EVENTS_UP, json_body=PAGE)
    response = await gateway.get(
        EVENTS, headers={**bearer(token), "traceparent": value}
    )
    assert response.status == 200
    assert "traceparent" not in upstream.last.header_names


# --- coalescing ---------------------------------------------------------------


def counting_route(upstream, path: str, delay_s: float = 0.2) -> None:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(delay_s)
        return web.json_response(PAGE)

    upstream.route("GET", path, handler)


def held_route(upstream, path: str) -> asyncio.Event:
    """Hold every response until the returned event is set."""
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        await asyncio.wait_for(release.wait(), 10)
        return web.json_response(PAGE)

    upstream.route("GET", path, handler)
    return release


async def wait_for_coalesced(client, count: int) -> None:
    """Wait until ``count`` callers have joined an upstream call in flight."""
    registry = client.app[METRICS].registry
    labels = {"route": "scaicore.events"}
    for _ in range(500):
        joined = registry.get_sample_value("scaiproxy_coalesced_requests_total", labels)
        if joined == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{joined} callers joined, expected {count}")


async def test_identical_gets_coalesced(gateway, upstream, token):
    release = held_route(upstream, EVENTS_UP)
    pending = asyncio.gather(
        *(gateway.get(EVENTS, headers=bearer(token)) for _ in range(50))
    )
    await wait_for_coalesced(gateway, 49)
    release.set()
    responses = await pending
    bodies = [await response.json() for response in responses]
    assert [response.status for response in responses] == [200] * 50
    assert all(body == PAGE for body in bodies)
    assert len(upstream.requests) == 1


async def test_different_tokens_not_coalesced(gateway, upstream, rsa_key):
    release = held_route(upstream, EVENTS_UP)
    tokens = [
        mint(rsa_key, sub=f"user-{i}", permissions=["scaicore:view"]) for i in range(5)
    ]
    pending = asyncio.gather(
        *(
            gateway.get(EVENTS, headers=bearer(token))
            for token in tokens
            for _ in range(4)
        )
    )
    await wait_for_coalesced(gateway, 15)
    release.set()
    responses = await pending
    sent = {request.headers["Authorization"] for request in upstream.requests}
    assert [response.status for response in responses] == [200] * 20
    assert len(upstream.requests) == 5
    assert sent == {f"Bearer {token}" for token in tokens}


async def test_tenants_on_one_key_not_coalesced(key_gateway, upstream, rsa_key):
    """The development key serves every tenant; a call is still never shared
    between two of them (the fetch route is not a coalesced route)."""
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        if len(upstream.requests) == 2:
            arrived.set()
        await asyncio.wait_for(release.wait(), 10)
        return web.json_response({"ok": True})

    upstream.route("GET", "/v1/slow", handler)
    tokens = [
        mint(rsa_key, tenant_id=tenant, permissions=["scaicore:view"])
        for tenant in ("acme", "globex")
    ]
    pending = asyncio.gather(
        *(key_gateway.get("/api/v1/fetch", headers=bearer(token)) for token in tokens)
    )
    # Shared, only one call would arrive; give the second the time to come.
    try:
        await asyncio.wait_for(arrived.wait(), 2)
    except TimeoutError:
        pass
    release.set()
    responses = await pending
    assert [response.status for response in responses] == [200, 200]
    assert len(upstream.requests) == 2


async def test_different_queries_not_coalesced(gateway, upstream, token):
    counting_route(upstream, EVENTS_UP)
    await asyncio.gather(
        *(
            gateway.get(EVENTS, params={"limit": str(n)}, headers=bearer(token))
            for n in (1, 2, 3)
        )
    )
    assert len(upstream.requests) == 3


async def test_coalescing_can_be_disabled(make_gateway, upstream, jwks_server, token):
    raw = config(upstream.base_url, jwks_server.url, upstream={"coalesce_gets": False})
    client = await make_gateway(raw, plugins={"fetch": Fetch()})
    counting_route(upstream, EVENTS_UP, delay_s=0.05)
    await asyncio.gather(*(client.get(EVENTS, headers=bearer(token)) for _ in range(5)))
    assert len(upstream.requests) == 5


async def test_coalesced_error_shared(gateway, upstream, token):
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(0.1)
        return web.json_response({}, status=500)

    upstream.route("GET", EVENTS_UP, handler)
    responses = await asyncio.gather(
        *(gateway.get(EVENTS, headers=bearer(token)) for _ in range(10))
    )
    assert [response.status for response in responses] == [502] * 10
    assert len(upstream.requests) == 1


async def test_posts_not_coalesced(gateway, upstream, token):
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(0.1)
        return web.json_response({"data": {"id": "ckpt-1"}})

    upstream.route("POST", RESOLVE_UP, handler)
    await asyncio.gather(
        *(
            gateway.post(RESOLVE, json={"resolution": "approve"}, headers=bearer(token))
            for _ in range(3)
        )
    )
    assert len(upstream.requests) == 3


# --- building the upstream URL ---------------------------------------------------


def test_upstream_url_encodes_query():
    url = upstream_url(
        "http://grid.test:81/base",
        "/v1/items",
        {"flag": True, "off": False, "limit": 3, "skip": None, "cursor": "a+b/c=="},
    )
    assert str(url) == (
        "http://grid.test:81/base/v1/items?flag=true&off=false&limit=3"
        "&cursor=a%2Bb/c%3D%3D"
    )
    assert url.query["cursor"] == "a+b/c=="


@pytest.mark.parametrize("path", ["v1/items", "@evil.test/v1", "/v1/items?x=1", "/a#b"])
async def test_upstream_path_checked(gateway, upstream, path):
    """A path that could change the host or the query fails before any call."""
    never_called = None
    caller = UpstreamCaller(
        gateway.app[UPSTREAM], never_called, "req-1", 1.0, "t", None
    )
    with pytest.raises(ValueError, match="invalid upstream path"):
        await caller.get(path)
    assert upstream.requests == []


async def test_200_concurrent_polls_few_upstream_calls(gateway, upstream, token):
    """Many Live Runs panels polling one tenant's page cost ScaiGrid a few calls."""
    counting_route(upstream, EVENTS_UP, delay_s=0.05)
    responses = await asyncio.gather(
        *(gateway.get(EVENTS, headers=bearer(token)) for _ in range(200))
    )
    bodies = [await response.json() for response in responses]
    assert [response.status for response in responses] == [200] * 200
    assert all(body == PAGE for body in bodies)
    assert len(upstream.requests) <= 5


# --- what ScaiGrid echoes back -------------------------------------------------


async def test_echoed_key_never_shown(key_gateway, upstream, token, log_stream):
    upstream.route(
        "GET",
        EVENTS_UP,
        json_body={
            "status": "error",
            "error": {
                "code": ENV_KEY,
                "message": f"Credential Bearer {ENV_KEY} is not allowed here",
            },
            "meta": {"request_id": ENV_KEY},
        },
        status=400,
    )
    response = await key_gateway.get(EVENTS, headers=bearer(token))
    text = await response.text()
    detail = json.loads(text)["detail"]
    assert response.status == 400
    assert ENV_KEY[4:24] not in text
    assert detail["message"].endswith(" is not allowed here")
    assert ENV_KEY[4:24] not in log_stream.getvalue()


async def test_echoed_key_in_headers_dropped(key_gateway, upstream, token):
    upstream.route(
        "GET",
        EVENTS_UP,
        json_body={"status": "error", "error": {"code": "rate_limited"}},
        status=429,
        headers={
            "X-Scaigrid-Ratelimit-Key": ENV_KEY,
            "X-Scaigrid-Ratelimit-Limit": "100",
            "X-Request-ID": ENV_KEY,
        },
    )
    response = await key_gateway.get(EVENTS, headers=bearer(token))
    text = await response.text()
    assert response.status == 429
    assert "X-Scaigrid-Ratelimit-Key" not in response.headers
    assert response.headers["X-Scaigrid-Ratelimit-Limit"] == "100"
    assert ENV_KEY[4:24] not in text
    assert ENV_KEY[4:24] not in json.dumps(dict(response.headers))


async def test_echoed_token_redacted_before_cut(gateway, upstream, token, log_stream):
    # Cut to 128 characters first, the token would no longer look like one.
    upstream.route(
        "GET",
        EVENTS_UP,
        json_body=scaigrid_error("not_found", "no run", request_id=token),
        status=404,
    )
    response = await gateway.get(EVENTS, headers=bearer(token))
    detail = await detail_of(response)
    assert response.status == 404
    assert token[:40] not in json.dumps(detail)
    assert token[:40] not in log_stream.getvalue()


async def test_surrogate_from_scaigrid_logged(gateway, upstream, token, log_stream):
    raw_route(
        upstream,
        "GET",
        EVENTS_UP,
        b'{"error":{"code":"\\ud800","message":"gone"},"meta":{"request_id":"\\ud800x"}}',
        status=404,
    )
    response = await gateway.get(EVENTS, headers=bearer(token))
    detail = await detail_of(response)
    await asyncio.sleep(0)
    assert response.status == 404
    assert detail["upstream_request_id"].endswith("x")
    assert "\ud800" not in detail["upstream_request_id"]
    lines = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    assert [line["status"] for line in lines if line["event"] == "request"] == [404]
    assert [line["event"] for line in lines].count("upstream_error_status") == 1


@pytest.mark.parametrize(
    "header, body_seconds, expected",
    [
        ("7", None, "7"),
        ("Wed, 21 Oct 2026 07:28:00 GMT", None, "Wed, 21 Oct 2026 07:28:00 GMT"),
        ("soon", None, None),
        ("-5", None, None),
        (None, 2.5, "3"),
        (None, 1e999, None),
        (None, -5, None),
        (None, True, None),
        (None, 10**12, "86400"),
        ("999999999999", None, "86400"),
    ],
)
async def test_retry_after_checked(
    gateway, upstream, token, header, body_seconds, expected
):
    error: dict[str, Any] = {"code": "rate_limited"}
    if body_seconds is not None:
        error["retry_after"] = body_seconds
    raw_route(
        upstream,
        "GET",
        EVENTS_UP,
        json.dumps({"status": "error", "error": error}).encode(),
        status=429,
        headers={"Retry-After": header} if header is not None else None,
    )
    response = await gateway.get(EVENTS, headers=bearer(token))
    detail = await detail_of(response)
    assert response.status == 429
    assert response.headers.get("Retry-After") == expected
    if expected is None:
        assert "Retry-After" not in detail["fix"]
    else:
        assert "Retry-After" in detail["fix"]
