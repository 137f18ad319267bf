"""Byte-level upstream faults and unreachable dependencies.

Each fault is played by a raw ``asyncio`` server on 127.0.0.1 that writes the
HTTP bytes itself, so the gateway meets hangs, resets, short bodies and broken
encodings as a real network delivers them. Every case must end in the status
the gateway documents (502 ``bad_gateway``, 504 ``upstream_timeout``, or 200 when the
body is usable) within the route's timeout. Afterwards no connection may be
checked out of the pool, and the next request must succeed.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import base_config, bearer, mint

from scaiproxy.app import SESSION

EVENTS = "/api/v1/scaicore/events"
INVOKE = "/api/v1/scaicore/cores/core_a/invoke"
ROUTE_TIMEOUT_S = 1.0
# Time allowed on top of the route timeout for the response to arrive.
MARGIN_S = 1.5
ENV_KEY = "sgk_" + "e" * 40
TENANT_KEY = "sgk_" + "t" * 40
VAULT_TOKEN = "vault-token-for-tests"

Fault = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# --- the raw upstream -------------------------------------------------------------


@dataclass
class RawUpstream:
    """A loopback HTTP/1.1 server whose responses are written byte by byte.

    While ``fault`` is ``None``, every request gets a valid ScaiGrid body for
    its path. Otherwise each request is handed to ``fault``, which owns the
    connection from then on, and the connection is closed afterwards.
    """

    fault: Fault | None = None
    heads: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None
    tasks: set[asyncio.Task] = field(default_factory=set)

    @property
    def base_url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.tasks.add(asyncio.current_task())
        try:
            while True:
                head = await _read_head(reader)
                if head is None:
                    return
                length = _content_length(head)
                if length:
                    await reader.readexactly(length)
                self.heads.append(head)
                fault = self.fault
                if fault is None:
                    writer.write(_normal_answer(head))
                    await writer.drain()
                    continue
                await fault(reader, writer)
                return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self.tasks.discard(asyncio.current_task())
            if not writer.transport.is_closing():
                writer.close()


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def _response(status: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status}"]
    merged = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    merged.update(headers or {})
    lines += [f"{name}: {value}" for name, value in merged.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


EMPTY_PAGE = b'{"data":{"events":[],"next_cursor":null}}'
INVOKE_ANSWER = b'{"data":{"output":{"ok":true},"request_id":"r1","duration_ms":3}}'


def _normal_answer(head: bytes) -> bytes:
    body = INVOKE_ANSWER if b"/invoke" in head.split(b"\r\n", 1)[0] else EMPTY_PAGE
    return _response("200 OK", body)


@pytest.fixture
async def raw_upstream():
    state = RawUpstream()
    state.server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
    yield state
    state.server.close()
    for task in list(state.tasks):
        task.cancel()
    await asyncio.gather(*state.tasks, return_exceptions=True)
    await state.server.wait_closed()


# --- the faults ---------------------------------------------------------------------


async def hang_before_status(reader, writer) -> None:
    # Returns when the gateway gives up and closes its end.
    await reader.read()


async def stall_mid_body(reader, writer) -> None:
    head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    writer.write(f"{head}Content-Length: 1000\r\n\r\n".encode())
    writer.write(b'{"data":{"events":[' + b" " * 80)
    await writer.drain()
    await reader.read()


async def reset_connection(reader, writer) -> None:
    sock = writer.get_extra_info("socket")
    # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def body_cut_short(reader, writer) -> None:
    head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    writer.write(f"{head}Content-Length: 1000\r\n\r\n".encode())
    writer.write(b'{"data":{"events":[],"next_cursor":null')
    await writer.drain()


async def gzip_that_does_not_decode(reader, writer) -> None:
    garbage = b"\x1f\x8b\x08\x00" + b"this is not deflate data" * 4
    writer.write(_response("200 OK", garbage, {"Content-Encoding": "gzip"}))
    await writer.drain()


async def gzip_that_decodes(reader, writer) -> None:
    packed = gzip.compress(EMPTY_PAGE)
    writer.write(_response("200 OK", packed, {"Content-Encoding": "gzip"}))
    await writer.drain()


async def unavailable_with_retry_after(reader, writer) -> None:
    body = json.dumps(
        {
            "status": "error",
            "error": {"code": "maintenance", "message": "down for maintenance"},
            "meta": {"request_id": "sg-503"},
        }
    ).encode()
    writer.write(_response("503 Service Unavailable", body, {"Retry-After": "7"}))
    await writer.drain()


async def bom_before_json(reader, writer) -> None:
    writer.write(_response("200 OK", b"\xef\xbb\xbf" + EMPTY_PAGE))
    await writer.drain()


async def no_content(reader, writer) -> None:
    writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    await writer.drain()


def _chunks(body: bytes, size: int = 7) -> list[bytes]:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return [f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in parts]


CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


async def chunked_valid(reader, writer) -> None:
    writer.write(CHUNKED_HEAD + b"".join(_chunks(EMPTY_PAGE)) + b"0\r\n\r\n")
    await writer.drain()


async def chunked_cut_short(reader, writer) -> None:
    parts = _chunks(EMPTY_PAGE)
    writer.write(CHUNKED_HEAD + b"".join(parts[: len(parts) // 2]))
    await writer.drain()


def big_page(total_bytes: int) -> bytes:
    """A valid events page of about ``total_bytes`` bytes of JSON."""
    event = {"id": "", "type": "flow.note", "payload": {"text": "x" * 900}}
    count = total_bytes // (len(json.dumps(event)) + 12)
    events = [dict(event, id=f"evt_{index:08d}") for index in range(count)]
    return json.dumps({"data": {"events": events, "next_cursor": None}}).encode()


TEN_MB = 10 * 1024 * 1024
_BIG_PAGE = big_page(TEN_MB)
# Under the default upstream.max_response_bytes (16 MiB), over this one.
LIMIT_BELOW_PAGE = 8 * 1024 * 1024


async def ten_megabytes(reader, writer) -> None:
    writer.write(_response("200 OK", _BIG_PAGE))
    await writer.drain()


async def ten_megabytes_chunked(reader, writer) -> None:
    writer.write(CHUNKED_HEAD)
    step = 256 * 1024
    for start in range(0, len(_BIG_PAGE), step):
        part = _BIG_PAGE[start : start + step]
        writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()


# --- helpers ---------------------------------------------------------------------


@pytest.fixture
def token(rsa_key) -> str:
    return mint(rsa_key, permissions=["scaicore:view", "scaicore:manage"])


def fault_config(upstream_url: str, jwks_url: str, **upstream: Any) -> dict[str, Any]:
    return base_config(
        upstream_url,
        jwks_url,
        upstream={
            "base_url": upstream_url,
            "timeout_s": ROUTE_TIMEOUT_S,
            "connect_timeout_s": ROUTE_TIMEOUT_S,
            **upstream,
        },
        plugins={
            "enabled": ["scaicore"],
            "scaicore": {"invoke_timeout_s": ROUTE_TIMEOUT_S},
        },
    )


def acquired(client) -> int:
    # NOTE: aiohttp (3.12 to 3.14) keeps connections that are handed out and not
    # yet released in this private set; it has no public counter.
    return len(client.app[SESSION].connector._acquired)


async def wait_released(client, timeout_s: float = 2.0) -> int:
    deadline = time.monotonic() + timeout_s
    while acquired(client) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return acquired(client)


async def send(client, method: str, token: str):
    if method == "GET":
        return await client.get(EVENTS, headers=bearer(token))
    return await client.post(INVOKE, json={"input": {"a": 1}}, headers=bearer(token))


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- upstream faults ----------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    fault: Fault
    method: str
    status: int
    error: str | None = None
    attempts: int = 1
    upstream: dict[str, Any] = field(default_factory=dict)


CASES = {
    "hang_get": Case(hang_before_status, "GET", 504, "upstream_timeout"),
    "hang_post": Case(hang_before_status, "POST", 504, "upstream_timeout"),
    "stall_mid_body": Case(stall_mid_body, "GET", 504, "upstream_timeout"),
    "reset_get": Case(reset_connection, "GET", 502, "bad_gateway", attempts=2),
    "reset_post": Case(reset_connection, "POST", 502, "bad_gateway"),
    "body_cut_short": Case(body_cut_short, "GET", 502, "bad_gateway", attempts=2),
    "gzip_broken": Case(gzip_that_does_not_decode, "GET", 502, "bad_gateway", 2),
    "gzip_valid": Case(gzip_that_decodes, "GET", 200),
    "ten_mb_under_limit": Case(ten_megabytes, "GET", 200),
    "ten_mb_over_limit": Case(
        ten_megabytes,
        "GET",
        502,
        "bad_gateway",
        upstream={"max_response_bytes": LIMIT_BELOW_PAGE},
    ),
    "ten_mb_chunked_over_limit": Case(
        ten_megabytes_chunked,
        "GET",
        502,
        "bad_gateway",
        upstream={"max_response_bytes": LIMIT_BELOW_PAGE},
    ),
    "unavailable": Case(unavailable_with_retry_after, "GET", 502, "bad_gateway"),
    "bom": Case(bom_before_json, "GET", 200),
    "no_content_get": Case(no_content, "GET", 502, "bad_gateway"),
    "no_content_post": Case(no_content, "POST", 502, "bad_gateway"),
    "chunked_valid": Case(chunked_valid, "GET", 200),
    "chunked_cut_short": Case(chunked_cut_short, "GET", 502, "bad_gateway", 2),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_fault_outcome(name, make_gateway, raw_upstream, jwks_server, token):
    case = CASES[name]
    raw = fault_config(raw_upstream.base_url, jwks_server.url, **case.upstream)
    client = await make_gateway(raw)
    raw_upstream.fault = case.fault

    started = time.monotonic()
    response = await send(client, case.method, token)
    body = await response.read()
    elapsed = time.monotonic() - started

    assert response.status == case.status, body[:300]
    assert response.content_type == "application/json"
    assert response.headers.get("X-Request-ID")
    assert elapsed < ROUTE_TIMEOUT_S + MARGIN_S
    document = json.loads(body)
    if case.error is None:
        assert isinstance(document["data"]["events"], list)
    else:
        assert document["detail"]["error"] == case.error
    assert len(raw_upstream.heads) == case.attempts


@pytest.mark.parametrize("name", list(CASES))
async def test_fault_leaves_pool_clean(
    name, make_gateway, raw_upstream, jwks_server, token
):
    case = CASES[name]
    raw = fault_config(raw_upstream.base_url, jwks_server.url, **case.upstream)
    client = await make_gateway(raw)
    raw_upstream.fault = case.fault
    await (await send(client, case.method, token)).read()

    assert await wait_released(client) == 0
    raw_upstream.fault = None
    after = await send(client, case.method, token)
    assert after.status == 200
    assert await wait_released(client) == 0


async def test_ten_mb_page_arrives_whole(
    make_gateway, raw_upstream, jwks_server, token
):
    client = await make_gateway(fault_config(raw_upstream.base_url, jwks_server.url))
    raw_upstream.fault = ten_megabytes
    response = await client.get(EVENTS, headers=bearer(token))
    document = await response.json()
    expected = json.loads(_BIG_PAGE)["data"]["events"]
    assert len(document["data"]["events"]) == len(expected)
    assert document["data"]["events"][-1] == expected[-1]


async def test_unavailable_keeps_retry_after(
    make_gateway, raw_upstream, jwks_server, token
):
    client = await make_gateway(fault_config(raw_upstream.base_url, jwks_server.url))
    raw_upstream.fault = unavailable_with_retry_after
    response = await client.get(EVENTS, headers=bearer(token))
    detail = (await response.json())["detail"]
    assert response.headers.get("Retry-After") == "7"
    assert detail["upstream_status"] == 503
    assert detail["upstream_request_id"] == "sg-503"


async def request_id_not_utf8(reader, writer) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    length = f"Content-Length: {len(EMPTY_PAGE)}\r\n".encode()
    writer.write(head + length + b"X-Request-ID: sg\xff\xfe\r\n\r\n" + EMPTY_PAGE)
    await writer.drain()


async def test_request_id_not_utf8_logged(
    make_gateway, raw_upstream, jwks_server, token, log_stream
):
    client = await make_gateway(fault_config(raw_upstream.base_url, jwks_server.url))
    raw_upstream.fault = request_id_not_utf8
    response = await client.get(EVENTS, headers=bearer(token))
    await asyncio.sleep(0)
    lines = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    [line] = [line for line in lines if line["event"] == "request"]
    assert response.status == 200
    assert line["upstream_request_id"].startswith("sg")


async def test_over_limit_names_limit(make_gateway, raw_upstream, jwks_server, token):
    raw = fault_config(
        raw_upstream.base_url, jwks_server.url, max_response_bytes=LIMIT_BELOW_PAGE
    )
    client = await make_gateway(raw)
    raw_upstream.fault = ten_megabytes
    response = await client.get(EVENTS, headers=bearer(token))
    detail = (await response.json())["detail"]
    assert "upstream.max_response_bytes" in detail["message"]


async def test_many_faults_in_a_row(make_gateway, raw_upstream, jwks_server, token):
    """Forty mixed faults, some concurrent, leave the pool empty and serving."""
    client = await make_gateway(fault_config(raw_upstream.base_url, jwks_server.url))
    faults = [reset_connection, body_cut_short, chunked_cut_short, stall_mid_body]
    for round_number in range(10):
        raw_upstream.fault = faults[round_number % len(faults)]
        answers = await asyncio.gather(
            *(send(client, method, token) for method in ("GET", "POST", "GET", "POST"))
        )
        assert {answer.status for answer in answers} <= {502, 504}
    assert await wait_released(client) == 0
    raw_upstream.fault = None
    assert (await send(client, "GET", token)).status == 200


# --- dependencies down ---------------------------------------------------------------


def jwks_lines(stream, name: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [line for line in lines if line.get("event") == name]


async def test_jwks_down_cached_keys_work(
    make_gateway, upstream, jwks_server, rsa_key, log_stream
):
    """The JWKS server goes away; tokens signed with a cached key still pass."""
    upstream.route("GET", "/v1/modules/scaicore/events", json_body={"data": []})
    raw = base_config(
        upstream.base_url,
        jwks_server.url,
        auth={"jwks_cache_ttl_s": 0.05, "jwks_refresh_interval_s": 0},
    )
    client = await make_gateway(raw)
    first = await client.get(
        EVENTS, headers=bearer(mint(rsa_key, permissions=["scaicore:view"]))
    )
    assert first.status == 200

    await jwks_server.server.close()
    await asyncio.sleep(0.1)
    fresh = mint(rsa_key, permissions=["scaicore:view"])
    second = await client.get(EVENTS, headers=bearer(fresh))

    assert second.status == 200
    assert len(jwks_lines(log_stream, "jwks_fetch_failed")) >= 1


async def test_jwks_unreachable_is_503(make_gateway, upstream, rsa_key):
    jwks_url = f"http://127.0.0.1:{closed_port()}/jwks.json"
    client = await make_gateway(base_config(upstream.base_url, jwks_url))
    token = mint(rsa_key, permissions=["scaicore:view"])
    response = await client.get(EVENTS, headers=bearer(token))
    detail = (await response.json())["detail"]
    assert response.status == 503
    assert detail["error"] == "auth_unavailable"
    assert response.headers.get("Retry-After")
    assert upstream.requests == []


async def test_jwks_hang_is_503_in_time(make_gateway, upstream, raw_upstream, rsa_key):
    raw_upstream.fault = hang_before_status
    raw = base_config(
        upstream.base_url,
        raw_upstream.base_url + "/jwks.json",
        auth={"jwks_timeout_s": 0.5},
    )
    client = await make_gateway(raw)
    started = time.monotonic()
    response = await client.get(EVENTS, headers=bearer(mint(rsa_key)))
    assert response.status == 503
    assert time.monotonic() - started < 0.5 + MARGIN_S
    assert upstream.requests == []


def key_mode_config(upstream_url: str, jwks_url: str, secrets: dict) -> dict:
    return base_config(
        upstream_url,
        jwks_url,
        auth={"upstream_credentials": "api_key"},
        secrets={"cache_ttl_s": 0, **secrets},
    )


async def test_vault_unreachable_is_502(make_gateway, upstream, jwks_server, token):
    upstream.route("GET", "/v1/modules/scaicore/events", json_body={"data": []})
    raw = key_mode_config(
        upstream.base_url,
        jwks_server.url,
        {
            "backend": "scaivault",
            "scaivault": {"base_url": f"http://127.0.0.1:{closed_port()}"},
        },
    )
    environ = {"SCAIVAULT_TOKEN": VAULT_TOKEN, "SCAIGRID_API_KEY": ENV_KEY}
    client = await make_gateway(raw, environ=environ)
    response = await client.get(EVENTS, headers=bearer(token))
    detail = (await response.json())["detail"]
    assert response.status == 502
    assert detail["error"] == "secret_store_unavailable"
    assert detail["backend"] == "scaivault"
    assert upstream.requests == []


async def test_vault_hang_is_502_in_time(
    make_gateway, upstream, raw_upstream, jwks_server, token
):
    raw_upstream.fault = hang_before_status
    raw = key_mode_config(
        upstream.base_url,
        jwks_server.url,
        {
            "backend": "scaivault",
            "scaivault": {"base_url": raw_upstream.base_url, "timeout_s": 0.5},
        },
    )
    environ = {"SCAIVAULT_TOKEN": VAULT_TOKEN, "SCAIGRID_API_KEY": ENV_KEY}
    client = await make_gateway(raw, environ=environ)
    started = time.monotonic()
    response = await client.get(EVENTS, headers=bearer(token))
    assert response.status == 502
    assert time.monotonic() - started < 0.5 + MARGIN_S
    assert upstream.requests == []


@pytest.mark.parametrize(
    "content",
    [b'{"tenants/acme/scaigrid_api_key": "sgk_', b"\xff\xfe not text", b"[1, 2]"],
    ids=["truncated", "not_utf8", "not_a_mapping"],
)
async def test_corrupt_secrets_file_is_502(
    content, make_gateway, upstream, jwks_server, token, tmp_path
):
    path = tmp_path / "secrets.json"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    raw = key_mode_config(
        upstream.base_url,
        jwks_server.url,
        {"backend": "file", "file": {"path": str(path)}},
    )
    client = await make_gateway(raw, environ={"SCAIGRID_API_KEY": ENV_KEY})
    response = await client.get(EVENTS, headers=bearer(token))
    detail = (await response.json())["detail"]
    assert response.status == 502
    assert detail["error"] == "secret_store_unavailable"
    assert detail["backend"] == "file"
    assert upstream.requests == []


async def test_store_down_in_auto_mode_is_502(
    make_gateway, upstream, jwks_server, token, tmp_path
):
    """With a user token, a broken store still fails rather than guessing."""
    path = tmp_path / "secrets.json"
    path.write_bytes(b"{broken")
    raw = base_config(
        upstream.base_url,
        jwks_server.url,
        secrets={"backend": "file", "cache_ttl_s": 0, "file": {"path": str(path)}},
    )
    client = await make_gateway(raw, environ={"SCAIGRID_API_KEY": ENV_KEY})
    response = await client.get(EVENTS, headers=bearer(token))
    assert response.status == 502
    assert upstream.requests == []


async def test_store_recovers(make_gateway, upstream, jwks_server, token, tmp_path):
    """Once the file is repaired, the tenant key from it is used, not the env key."""
    upstream.route("GET", "/v1/modules/scaicore/events", json_body={"data": []})
    path = tmp_path / "secrets.json"
    path.write_bytes(b"{broken")
    raw = key_mode_config(
        upstream.base_url,
        jwks_server.url,
        {"backend": "file", "file": {"path": str(path)}},
    )
    client = await make_gateway(raw, environ={"SCAIGRID_API_KEY": ENV_KEY})
    assert (await client.get(EVENTS, headers=bearer(token))).status == 502

    path.write_text(json.dumps({"tenants/acme/scaigrid_api_key": TENANT_KEY}))
    response = await client.get(EVENTS, headers=bearer(token))
    assert response.status == 200
    assert upstream.last.headers["Authorization"] == f"Bearer {TENANT_KEY}"


# --- responses that are not valid HTTP ----------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 4\r\n\r\nabcd",
        b"\x00\x01 not HTTP at all\r\n\r\n",
    ],
    ids=["status", "two_lengths", "brotli", "garbage"],
)
async def test_invalid_http_named_in_502(
    answer, make_gateway, raw_upstream, jwks_server, token, log_stream
):
    async def write_answer(reader, writer) -> None:
        writer.write(answer)
        await writer.drain()

    raw_upstream.fault = write_answer
    client = await make_gateway(base_config(raw_upstream.base_url, jwks_server.url))
    response = await client.get(EVENTS, headers=bearer(token))
    detail = (await response.json())["detail"]
    assert response.status == 502
    assert detail["error"] == "bad_gateway"
    assert "not valid HTTP" in detail["message"]
    assert '"upstream_bad_response"' in log_stream.getvalue()


# --- responses pushed on an idle pooled connection ---------------------------------


def _page_for(head: bytes) -> bytes:
    """Build an events page that names the query string of the request it
    responds to."""
    target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode()
    query = target.partition("?")[2]
    event = json.dumps({"answers": query}).encode()
    body = b'{"data":{"events":[' + event + b'],"next_cursor":null}}'
    return _response("200 OK", body)


async def test_pushed_response_never_reaches_next_request(
    make_gateway, raw_upstream, jwks_server, rsa_key, log_stream
):
    """A response that arrives while no request is in flight belongs to no one:
    the connection is dropped, and the next caller gets the response to its own
    query, even when it is another tenant."""

    async def answer_then_push_another(reader, writer) -> None:
        # Answer each request, then push a second, unrequested response 50 ms
        # later, while the gateway has the connection idle in its pool.
        head = raw_upstream.heads[-1]
        while head is not None:
            writer.write(_page_for(head))
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(_page_for(head))
            await writer.drain()
            head = await _read_head(reader)

    raw_upstream.fault = answer_then_push_another
    raw = base_config(raw_upstream.base_url, jwks_server.url)
    client = await make_gateway(raw)
    answers = []
    for tenant, limit in (("acme", 7), ("globex", 3), ("acme", 4)):
        token = mint(rsa_key, tenant_id=tenant, permissions=["scaicore:view"])
        response = await client.get(
            EVENTS, params={"limit": str(limit)}, headers=bearer(token)
        )
        assert response.status == 200
        answers.append((await response.json())["data"]["events"][0]["answers"])
        # Long enough for the pushed response to arrive while the connection idles.
        await asyncio.sleep(0.2)
    discarded = [
        line
        for line in log_stream.getvalue().splitlines()
        if '"upstream_connection_discarded"' in line
    ]
    assert answers == ["limit=7", "limit=3", "limit=4"]
    assert len(discarded) == 2



async def test_fresh_connection_after_pool_of_pushed_data(
    make_gateway, raw_upstream, jwks_server, rsa_key
):
    """Four pooled connections each received an unrequested response while
    idle. The next poll discards them all and gets a new connection."""

    async def answer_then_push(reader, writer) -> None:
        head = raw_upstream.heads[-1]
        while head is not None:
            await asyncio.sleep(0.1)
            writer.write(_page_for(head))
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(_page_for(head))
            await writer.drain()
            head = await _read_head(reader)

    raw_upstream.fault = answer_then_push
    client = await make_gateway(base_config(raw_upstream.base_url, jwks_server.url))
    headers = bearer(mint(rsa_key, permissions=["scaicore:view"]))

    async def poll(limit: int) -> int:
        response = await client.get(
            EVENTS, params={"limit": str(limit)}, headers=headers
        )
        await response.read()
        return response.status

    first = await asyncio.gather(*(poll(limit) for limit in (1, 2, 3, 4)))
    await asyncio.sleep(0.2)
    assert first == [200] * 4
    assert await poll(5) == 200
