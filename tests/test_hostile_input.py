"""Hostile requests: oversized, malformed, injected or smuggled input.

Each request is sent either with aiohttp's client or, where a client library
would clean the bytes up first, as raw bytes over a socket. Every case must end
in a 4xx, with the JSON error envelope unless aiohttp's own HTTP parser rejects
the bytes before any middleware runs, which responds in plain text (see
docs/robustness.md). The recording upstream shows what reached ScaiGrid; for
rejected requests that is nothing.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import base_config, bearer, mint

EVENTS = "/api/v1/scaicore/events"
EVENTS_UP = "/v1/modules/scaicore/events"
INVOKE = "/api/v1/scaicore/cores/core_a/invoke"
INVOKE_UP = "/v1/modules/scaicore/cores/core_a/invoke"
QUEUES_UP = "/v1/modules/scaiqueue/scopes/scope_a/queues"
BODY_LIMIT = 4096
# aiohttp's HTTP parser limit for the request line and each header line, as the
# app factory sets it (handler_args max_line_size and max_field_size).
LINE_LIMIT = 16384
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

PAGE = {"data": {"events": [], "next_cursor": None}}
INVOKED = {"data": {"output": {"ok": True}, "request_id": "r", "duration_ms": 1}}


@pytest.fixture
def token(rsa_key) -> str:
    return mint(rsa_key, permissions=["scaicore:view", "scaicore:manage"])


@pytest.fixture
async def client(make_gateway, upstream, jwks_server):
    upstream.route("GET", EVENTS_UP, json_body=PAGE)
    upstream.route("POST", INVOKE_UP, json_body=INVOKED)
    upstream.route("GET", QUEUES_UP, json_body={"data": []})
    raw = base_config(
        upstream.base_url,
        jwks_server.url,
        server={"max_body_bytes": BODY_LIMIT},
        plugins={"enabled": ["scaicore", "lookups"]},
    )
    return await make_gateway(raw)


async def error_of(response, status: int) -> dict[str, Any]:
    """Check an enveloped error response and return its ``detail``."""
    assert response.status == status
    assert response.content_type == "application/json"
    assert REQUEST_ID.fullmatch(response.headers.get("X-Request-ID", ""))
    body = await response.json()
    assert list(body) == ["detail"]
    return body["detail"]


# --- raw sockets -----------------------------------------------------------------


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def plain_text(self) -> bool:
        """Tell whether this is aiohttp's own parser error, not the envelope."""
        return self.headers.get("content-type", "").startswith("text/plain")

    @property
    def enveloped(self) -> bool:
        if not self.headers.get("content-type", "").startswith("application/json"):
            return False
        return "detail" in json.loads(self.body)


async def raw_exchange(client, data: bytes) -> RawAnswer:
    """Send ``data`` unchanged and read one response.

    The request must ask for ``Connection: close``.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(reader.readexactly(length), 10)
        return RawAnswer(int(status_line.split()[1]), headers, body)
    finally:
        writer.close()


def request_bytes(
    method: str, target: str, token: str, *extra: str, body: bytes = b""
) -> bytes:
    lines = [
        f"{method} {target} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Authorization: Bearer {token}",
        "Connection: close",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --- bodies over the limit ----------------------------------------------------------


async def test_declared_body_over_limit(client, upstream, token):
    body = json.dumps({"input": {"text": "x" * BODY_LIMIT}}).encode()
    response = await client.post(
        INVOKE,
        data=body,
        headers={**bearer(token), "Content-Type": "application/json"},
    )
    detail = await error_of(response, 413)
    assert detail["error"] == "payload_too_large"
    assert upstream.requests == []


async def test_chunked_body_over_limit(client, upstream, token):
    async def chunks():
        yield b'{"input": {"text": "'
        for _ in range(BODY_LIMIT // 512 + 2):
            yield b"x" * 512
        yield b'"}}'

    response = await client.post(
        INVOKE,
        data=chunks(),
        headers={**bearer(token), "Content-Type": "application/json"},
    )
    detail = await error_of(response, 413)
    assert detail["error"] == "payload_too_large"
    assert upstream.requests == []


async def test_raw_chunked_body_over_limit(client, upstream, token):
    chunk = b"x" * 1024
    body = b"".join(b"400\r\n" + chunk + b"\r\n" for _ in range(8)) + b"0\r\n\r\n"
    answer = await raw_exchange(
        client,
        request_bytes(
            "POST",
            INVOKE,
            token,
            "Content-Type: application/json",
            "Transfer-Encoding: chunked",
            body=body,
        ),
    )
    assert answer.status == 413
    assert answer.enveloped
    assert upstream.requests == []


async def test_declared_length_answered_before_body(client, upstream, token):
    """A declared length over the limit is refused without waiting for the body."""
    answer = await raw_exchange(
        client,
        request_bytes(
            "POST",
            INVOKE,
            token,
            "Content-Type: application/json",
            "Content-Length: 999999999",
        ),
    )
    assert answer.status == 413
    assert answer.enveloped
    assert upstream.requests == []


async def test_body_at_limit_accepted(client, upstream, token):
    prefix, suffix = b'{"input": {"t": "', b'"}}'
    body = prefix + b"x" * (BODY_LIMIT - len(prefix) - len(suffix)) + suffix
    response = await client.post(
        INVOKE, data=body, headers={**bearer(token), "Content-Type": "application/json"}
    )
    assert response.status == 200
    assert len(upstream.requests) == 1


# --- malformed JSON and text -----------------------------------------------------


async def test_deeply_nested_body_rejected(client, upstream, token):
    depth = 1500
    body = b'{"input": {"a": ' + b"[" * depth + b"]" * depth + b"}}"
    response = await client.post(
        INVOKE, data=body, headers={**bearer(token), "Content-Type": "application/json"}
    )
    detail = await error_of(response, 400)
    assert detail["error"] == "invalid_json"
    assert upstream.requests == []


async def test_nesting_just_over_cap_rejected(client, upstream, token):
    # The cap is 128 levels; the outer object and "input" take two.
    body = b'{"input": {"a": ' + b"[" * 127 + b"]" * 127 + b"}}"
    response = await client.post(
        INVOKE, data=body, headers={**bearer(token), "Content-Type": "application/json"}
    )
    detail = await error_of(response, 400)
    assert detail["error"] == "invalid_json"


async def test_nesting_under_cap_forwarded(client, upstream, token):
    body = b'{"input": {"a": ' + b"[" * 100 + b"]" * 100 + b"}}"
    response = await client.post(
        INVOKE, data=body, headers={**bearer(token), "Content-Type": "application/json"}
    )
    assert response.status == 200
    # Members are forwarded as the client wrote them, spaces included.
    assert upstream.last.body == b'{"input":' + body[len(b'{"input": ') : -1] + b"}"


@pytest.mark.parametrize(
    "body",
    [
        b'{"input": {"a": "\xff\xfe"}}',
        b'{"input": {"a": "\xed\xa0\x80"}}',
        b"\xc0\xaf",
    ],
    ids=["invalid_bytes", "encoded_surrogate", "overlong"],
)
async def test_invalid_utf8_body_rejected(body, client, upstream, token):
    response = await client.post(
        INVOKE, data=body, headers={**bearer(token), "Content-Type": "application/json"}
    )
    detail = await error_of(response, 400)
    assert detail["error"] == "invalid_json"
    assert upstream.requests == []


async def test_invalid_utf8_in_path_rejected(client, upstream, token):
    answer = await raw_exchange(
        client, request_bytes("POST", "/api/v1/scaicore/cores/%FF%FE/invoke", token)
    )
    assert answer.status == 422
    assert answer.enveloped
    assert upstream.requests == []


async def test_invalid_utf8_in_query_rejected(client, upstream, token):
    answer = await raw_exchange(
        client, request_bytes("GET", f"{EVENTS}?core_id=%FF%FE", token)
    )
    assert answer.status == 422
    assert answer.enveloped
    assert upstream.requests == []


# --- huge requests --------------------------------------------------------------


async def test_long_query_under_line_limit(client, upstream, token):
    response = await client.get(
        EVENTS, params={"cursor": "a" * 10_000}, headers=bearer(token)
    )
    detail = await error_of(response, 422)
    assert detail["errors"][0]["field"] == "cursor"
    assert upstream.requests == []


async def test_query_over_line_limit(client, upstream, token):
    """aiohttp's parser responds with a plain-text 400, before any middleware."""
    target = f"{EVENTS}?cursor={'a' * (LINE_LIMIT + 100)}"
    answer = await raw_exchange(client, request_bytes("GET", target, token))
    assert answer.status == 400
    assert answer.enveloped
    assert token not in answer.body.decode("latin-1")
    assert upstream.requests == []


async def test_header_over_line_limit(client, upstream, token):
    answer = await raw_exchange(
        client,
        request_bytes("GET", EVENTS, token, f"X-Padding: {'p' * (LINE_LIMIT + 100)}"),
    )
    assert answer.status == 400
    assert answer.enveloped
    assert token not in answer.body.decode("latin-1")
    assert upstream.requests == []


async def test_many_parameters_rejected(client, upstream, token):
    query = "&".join(f"p{index}=v" for index in range(1000))
    response = await client.get(f"{EVENTS}?{query}", headers=bearer(token))
    detail = await error_of(response, 422)
    assert len(detail["message"]) < 10_000
    assert upstream.requests == []


# --- repeated parameters ---------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    ["limit=5&limit=6", "core_id=a&core_id=b", "cursor=a&cursor=a", "limit=5&limit=5"],
)
async def test_repeated_parameter_rejected(query, client, upstream, token):
    response = await client.get(f"{EVENTS}?{query}", headers=bearer(token))
    detail = await error_of(response, 422)
    assert "more than once" in detail["errors"][0]["message"]
    assert upstream.requests == []


async def test_repeated_authorization_rejected(client, upstream, token):
    answer = await raw_exchange(
        client, request_bytes("GET", EVENTS, token, f"Authorization: Bearer {token}")
    )
    assert answer.status == 401
    assert answer.enveloped
    assert upstream.requests == []


@pytest.mark.parametrize(
    "value", ["\xff\xfe", "{token}\xff"], ids=["bytes_alone", "after_token"]
)
async def test_undecodable_authorization_rejected(value, client, upstream, token):
    """Header bytes that are not UTF-8 get the 401 of any malformed token."""
    await client.get(EVENTS, headers=bearer(token))
    answer = await raw_exchange(
        client, request_bytes("GET", EVENTS, value.format(token=token))
    )
    assert answer.status == 401
    assert json.loads(answer.body)["detail"]["error"] == "invalid_token"
    assert len(upstream.requests) == 1


# --- CR and LF in values that could reach a header ---------------------------------


@pytest.mark.parametrize(
    "target",
    [
        f"{EVENTS}?cursor=abc%0D%0AX-Injected:%201",
        f"{EVENTS}?cursor=abc%0AX-Injected:%201",
        f"{EVENTS}?core_id=core%0D%0AX-Injected:%201",
        "/api/v1/scaicore/cores/core%0D%0AX-Injected:%201/invoke",
        "/api/v1/scaiqueue/scopes/scope%0D%0AX-Injected:%201/queues",
        "/api/v1/scaicore/checkpoints/ck%0D%0A/resolve",
    ],
)
async def test_encoded_crlf_rejected(target, client, upstream, token):
    method = "POST" if target.endswith(("/invoke", "/resolve")) else "GET"
    answer = await raw_exchange(client, request_bytes(method, target, token))
    assert answer.status == 422
    assert answer.enveloped
    assert upstream.requests == []


@pytest.mark.parametrize(
    "header",
    [
        "X-Request-ID: abc\rX-Injected: 1",
        "X-Request-ID: abc\r\n X-Injected: 1",
        "traceparent: 00-\r0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    ],
    ids=["bare_cr", "obs_fold", "traceparent_cr"],
)
async def test_raw_crlf_in_header_rejected(header, client, upstream, token):
    answer = await raw_exchange(client, request_bytes("GET", EVENTS, token, header))
    assert 400 <= answer.status < 500
    assert answer.enveloped
    assert token not in answer.body.decode("latin-1")
    assert upstream.requests == []


@pytest.mark.parametrize(
    "value",
    ["abc def", "a" * 129, "ünïcode", "a,b", "a;b", "<script>", ""],
)
async def test_bad_request_id_replaced(value, client, upstream, token):
    response = await client.get(
        EVENTS, headers={**bearer(token), "X-Request-ID": value}
    )
    assert response.status == 200
    sent = upstream.last.headers["X-Request-ID"]
    assert REQUEST_ID.fullmatch(sent)
    assert sent != value
    assert response.headers["X-Request-ID"] == sent


async def test_request_id_kept_when_valid(client, upstream, token):
    response = await client.get(
        EVENTS, headers={**bearer(token), "X-Request-ID": "req-1.a:b_c"}
    )
    assert response.headers["X-Request-ID"] == "req-1.a:b_c"
    assert upstream.last.headers["X-Request-ID"] == "req-1.a:b_c"


@pytest.mark.parametrize(
    "value",
    [
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01, evil",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01 x",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-" + "0" * 32 + "-b7ad6b7169203331-01",
        "x" * 600,
    ],
)
async def test_bad_traceparent_not_forwarded(value, client, upstream, token):
    response = await client.get(EVENTS, headers={**bearer(token), "traceparent": value})
    assert response.status == 200
    assert "traceparent" not in upstream.last.header_names


# --- dot segments and slashes in ids ---------------------------------------------


@pytest.mark.parametrize(
    "segment",
    [
        "%2e%2e",
        "%2E%2E",
        "%2e",
        "..%2F",
        "..%2f..%2fadmin",
        "%2F",
        "a%2Fb",
        "%2e%2e%2f%2e%2e%2fv1%2fmodules",
        "..%5C..%5Cadmin",
        "%252e%252e",
        "%00",
        "a%20b",
    ],
)
async def test_path_id_tricks_rejected(segment, client, upstream, token):
    for template in (
        "/api/v1/scaicore/cores/{}/invoke",
        "/api/v1/scaiqueue/scopes/{}/queues",
    ):
        method = "POST" if template.endswith("/invoke") else "GET"
        body = b'{"input": {}}' if method == "POST" else b""
        extra = ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        answer = await raw_exchange(
            client,
            request_bytes(method, template.format(segment), token, *extra, body=body),
        )
        assert 400 <= answer.status < 500, (template, answer.status)
        assert answer.enveloped
    assert upstream.requests == []


@pytest.mark.parametrize(
    "target",
    [
        "/api/v1/scaicore/cores/../checkpoints",
        "/api/v1/scaicore/cores/./invoke",
        "/api/v1/scaiqueue/scopes/../../scaicore/events/queues",
        "/api/v1/scaicore/cores//invoke",
    ],
)
async def test_literal_dot_segments_rejected(target, client, upstream, token):
    answer = await raw_exchange(client, request_bytes("POST", target, token))
    assert 400 <= answer.status < 500
    assert answer.enveloped
    assert upstream.requests == []


# --- client headers that must not reach ScaiGrid ------------------------------------

STRIPPED = [
    "cookie",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "forwarded",
    "x-foo",
    "proxy-authorization",
    "te",
    "upgrade",
    "x-real-ip",
    "via",
    "origin",
    "referer",
]


async def test_client_headers_not_forwarded(client, upstream, token):
    response = await client.get(
        EVENTS,
        headers={
            **bearer(token),
            "Host": "evil.example",
            "Cookie": "session=abc; csrftoken=def",
            "X-Forwarded-For": "10.0.0.1",
            "X-Forwarded-Host": "evil.example",
            "X-Forwarded-Proto": "https",
            "Forwarded": "for=10.0.0.1;host=evil.example",
            "Connection": "keep-alive, X-Foo",
            "X-Foo": "hop-by-hop",
            "Proxy-Authorization": "Basic dXNlcjpwYXNz",
            "TE": "trailers",
            "X-Real-IP": "10.0.0.2",
            "Via": "1.1 evil",
            "Origin": "https://evil.example",
            "Referer": "https://evil.example/page",
        },
    )
    assert response.status == 200
    sent = upstream.last
    for name in STRIPPED:
        assert name not in sent.header_names, name
    assert sent.headers["Host"] == upstream.base_url.split("//", 1)[1]


async def test_upgrade_request_not_forwarded(client, upstream, token):
    answer = await raw_exchange(
        client,
        request_bytes(
            "GET",
            EVENTS,
            token,
            "Upgrade: websocket",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        ),
    )
    assert answer.status == 200
    sent = upstream.last
    assert "upgrade" not in sent.header_names
    assert "sec-websocket-key" not in sent.header_names


async def test_only_built_headers_sent(client, upstream, token):
    await client.get(
        EVENTS,
        headers={**bearer(token), "X-Custom": "1", "Accept-Language": "de"},
    )
    allowed = {
        "host",
        "authorization",
        "x-request-id",
        "accept",
        "accept-encoding",
        "user-agent",
        "content-length",
        "content-type",
        "traceparent",
    }
    assert set(upstream.last.header_names) <= allowed


async def test_client_authorization_not_echoed(client, upstream, token):
    """An invalid bearer value never comes back in the error."""
    secret = "not.a.jwt-but-secret-value"
    response = await client.get(EVENTS, headers=bearer(secret))
    text = await response.text()
    assert response.status == 401
    assert secret not in text
    assert upstream.requests == []


# --- smuggling and framing ---------------------------------------------------------


async def test_conflicting_length_headers_rejected(client, upstream, token):
    body = b'{"input": {}}'
    answer = await raw_exchange(
        client,
        request_bytes(
            "POST",
            INVOKE,
            token,
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Transfer-Encoding: chunked",
            body=body,
        ),
    )
    assert answer.status == 400
    assert answer.enveloped
    assert token not in answer.body.decode("latin-1")
    assert upstream.requests == []


async def test_duplicate_content_length_rejected(client, upstream, token):
    body = b'{"input": {}}'
    answer = await raw_exchange(
        client,
        request_bytes(
            "POST",
            INVOKE,
            token,
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            f"Content-Length: {len(body) + 5}",
            body=body,
        ),
    )
    assert answer.status == 400
    assert answer.enveloped
    assert token not in answer.body.decode("latin-1")
    assert upstream.requests == []


async def test_unknown_method_enveloped(client, upstream, token):
    answer = await raw_exchange(client, request_bytes("PATCH", EVENTS, token))
    assert answer.status == 405
    assert answer.enveloped
    assert upstream.requests == []


async def test_client_survives_garbage(client, upstream, token):
    """Binary garbage on one connection does not disturb the next request."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(bytes(range(256)) * 4)
    await writer.drain()
    await asyncio.wait_for(reader.read(), 10)
    writer.close()
    response = await client.get(EVENTS, headers=bearer(token))
    assert response.status == 200


async def test_slow_client_cannot_pin_upstream(client, upstream, token):
    """A half-sent body holds only its own connection; others are served."""
    _, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(
        request_bytes(
            "POST",
            INVOKE,
            token,
            "Content-Type: application/json",
            "Content-Length: 100",
        )
        + b'{"input": '
    )
    await writer.drain()
    try:
        response = await client.get(EVENTS, headers=bearer(token))
        assert response.status == 200
        assert [request.method for request in upstream.requests] == ["GET"]
    finally:
        writer.close()


async def test_aiohttp_client_error_is_not_500(client, token):
    """A body sent with a wrong Content-Type is still read as JSON or refused."""
    response = await client.post(
        INVOKE,
        data=b"input=1",
        headers={**bearer(token), "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status == 400
    assert isinstance(await response.json(), dict)


# --- bodies that cannot be read or converted ----------------------------------


@pytest.fixture
async def roomy(make_gateway, upstream, jwks_server):
    """The gateway with the default body limit, for bodies over 4 KiB."""
    upstream.route("POST", INVOKE_UP, json_body=INVOKED)
    return await make_gateway(base_config(upstream.base_url, jwks_server.url))


async def test_integer_beyond_digit_limit_rejected(roomy, upstream, token):
    body = b'{"input": {"n": ' + b"9" * 4301 + b"}}"
    response = await roomy.post(
        INVOKE,
        data=body,
        headers={**bearer(token), "Content-Type": "application/json"},
    )
    detail = await error_of(response, 400)
    assert detail["error"] == "invalid_json"
    assert "more than 4300 digits" in detail["message"]
    assert not [r for r in upstream.requests if r.method == "POST"]


async def test_integer_at_digit_limit_forwarded(roomy, upstream, token):
    digits = b"9" * 4300
    response = await roomy.post(
        INVOKE,
        data=b'{"input": {"n": ' + digits + b"}}",
        headers={**bearer(token), "Content-Type": "application/json"},
    )
    assert response.status == 200
    assert digits in upstream.last.body


async def test_body_not_matching_encoding_rejected(client, upstream, token):
    response = await client.post(
        INVOKE,
        data=b"abcde",
        headers={
            **bearer(token),
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
        },
    )
    detail = await error_of(response, 400)
    assert detail["error"] == "invalid_json"
    assert "Content-Encoding" in detail["message"]


async def test_client_leaving_mid_body_not_an_error(
    upstream, jwks_server, gateway_process, token
):
    # Under `scaiproxy serve` the handler is not cancelled when the client
    # leaves, so it meets the reset while it reads the body.
    upstream.route("POST", INVOKE_UP, json_body=INVOKED)
    config = base_config(upstream.base_url, jwks_server.url)
    config["logging"] = {"level": "info", "format": "json"}
    gateway = await gateway_process(config)

    request = (
        f"POST {INVOKE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: 100\r\n\r\n"
        '{"input":'
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(request)
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.close()

    events: list[dict[str, Any]] = []
    for _ in range(100):
        lines = gateway.log_path.read_text().splitlines()
        events = [json.loads(line) for line in lines if line.startswith("{")]
        accesses = [
            event
            for event in events
            if event["event"] == "request" and event.get("path") == INVOKE
        ]
        if accesses:
            break
        await asyncio.sleep(0.05)

    names = [event["event"] for event in events]
    assert "unhandled_error" not in names
    assert [access["status"] for access in accesses] == [499]
