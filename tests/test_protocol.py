"""Requests that aiohttp's HTTP parser rejects get the envelope, not a quote."""

import asyncio
import gc
import json
import tracemalloc

from conftest import mint

from scaiproxy.pages import CHECKED_PAGES


async def exchange(port: int, data: bytes) -> tuple[bytes, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return status_line.encode(), headers, body


async def test_bad_authorization_byte_not_echoed(gateway, upstream, rsa_key):
    token = mint(rsa_key, permissions=["scaicore:view"])
    request = (
        b"GET /api/v1/me HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + token.encode()
        + b"\x01\r\nConnection: close\r\n\r\n"
    )
    status, headers, body = await exchange(gateway.server.port, request)
    assert status.startswith(b"HTTP/1.0 400")
    assert headers["Content-Type"].startswith("application/json")
    assert headers["X-Request-ID"]
    assert json.loads(body)["detail"]["error"] == "bad_request"
    assert token.encode() not in body
    assert token[:40].encode() not in body
    assert upstream.requests == []


async def test_unknown_method_enveloped(gateway, upstream):
    request = b"FOO\x01 /api/v1/me HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    status, headers, body = await exchange(gateway.server.port, request)
    assert status.startswith(b"HTTP/1.0 400")
    assert json.loads(body)["detail"]["error"] == "bad_request"


async def test_gateway_serves_after_rejection(gateway, upstream, rsa_key):
    await exchange(gateway.server.port, b"GET / HTTP/1.1\r\nBad\x7fHeader: 1\r\n\r\n")
    response = await gateway.get("/healthz")
    assert response.status == 200


# Idle keep-alive connections

IDLE_CONNECTIONS = 20
# About 200 KB of events, so that kept bodies would dwarf everything else.
BIG_PAGE = {
    "data": {
        "events": [{"event_id": f"e{n}", "payload": "x" * 1000} for n in range(200)],
        "next_cursor": None,
    }
}


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return await reader.readexactly(length)


async def test_idle_connection_drops_last_body(gateway, upstream, rsa_key):
    upstream.route("GET", "/v1/modules/scaicore/events", json_body=BIG_PAGE)
    token = mint(rsa_key, permissions=["scaicore:view"])
    request = (
        b"GET /api/v1/scaicore/events HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + token.encode() + b"\r\n\r\n"
    )
    writers = []
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(IDLE_CONNECTIONS):
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.server.port)
            writers.append(writer)
            writer.write(request)
            body = await _read_response(reader)
            assert len(body) > 200_000
        del body
        gc.collect()
        retained_bytes = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        for writer in writers:
            writer.close()
    # Every connection is still open and idle. Keeping each one's body would
    # retain over 4 MB, while the connections themselves cost a few KB each.
    # The one page kept as checked lately does not depend on the connections.
    kept_page_bytes = gateway.app[CHECKED_PAGES].size
    assert kept_page_bytes < 2_000_000
    assert retained_bytes - kept_page_bytes < IDLE_CONNECTIONS * 200_000 / 4


# Expect headers


async def test_unknown_expectation_enveloped(gateway, upstream):
    """An expectation other than 100-continue is ignored: the request gets the
    gateway's own response, here 401, with the envelope and a request id."""
    request = (
        b"POST /api/v1/scaicore/cores/core_a/invoke HTTP/1.1\r\nHost: x\r\n"
        b"Expect: 200-ok\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    status, headers, body = await exchange(gateway.server.port, request)
    assert status.startswith(b"HTTP/1.1 401")
    assert headers["X-Request-ID"]
    assert headers["Server"] == "scaiproxy"
    assert json.loads(body)["detail"]["error"] == "missing_token"


async def test_continue_expectation_answered(gateway, upstream, rsa_key):
    token = mint(rsa_key, permissions=["scaicore:view"])
    request = (
        b"GET /api/v1/me HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Authorization: Bearer " + token.encode() + b"\r\nConnection: close\r\n\r\n"
    )
    status, headers, body = await exchange(gateway.server.port, request)
    assert status == b"HTTP/1.1 100 Continue"
    assert b"HTTP/1.1 200 OK" in body
