"""Requests that aiohttp's HTTP parser rejects get the envelope, not a quote."""

import asyncio
import json

from conftest import mint


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
