"""Logging: one access event per request, upstream failures at WARNING, aiohttp's
own records in the same JSON shape, and no credential in any line."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from typing import Any

import pytest
import structlog
from aiohttp import web
from conftest import base_config, bearer, mint

from scaiproxy import hookimpl
from scaiproxy.config import LoggingConfig
from scaiproxy.logs import (
    LineBatchingHandler,
    access_line_writer,
    configure_logging,
    redact_secrets,
    redact_text,
    utc_timestamp,
)

EVENTS = "/api/v1/scaicore/events"
EVENTS_UP = "/v1/modules/scaicore/events"
PAGE = {"data": {"events": [], "next_cursor": None}}
ENV_KEY = "sgk_" + "Z" * 36 + "9876"
COOKIE = "session=cookie-value-4f1d2c"
SHAPE = {"event", "level", "logger", "timestamp"}


@pytest.fixture
def stream() -> io.StringIO:
    output = io.StringIO()
    configure_logging(LoggingConfig(format="json", level="info"), stream=output)
    return output


@pytest.fixture
def debug_stream() -> io.StringIO:
    output = io.StringIO()
    configure_logging(LoggingConfig(format="json", level="debug"), stream=output)
    return output


def lines(output: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.getvalue().splitlines()]


def named(output: io.StringIO, event: str) -> list[dict[str, Any]]:
    return [line for line in lines(output) if line["event"] == event]


@pytest.fixture
def viewer(rsa_key) -> str:
    return mint(rsa_key, permissions=["scaicore:view"])


# --- the access event ---------------------------------------------------------


async def test_access_event_fields(gateway, upstream, viewer, stream):
    upstream.route("GET", EVENTS_UP, json_body=PAGE, headers={"X-Request-ID": "sg-77"})
    response = await gateway.get(EVENTS, headers=bearer(viewer))
    [event] = named(stream, "request")
    assert response.status == 200
    assert event["level"] == "info"
    assert event["logger"] == "scaiproxy.request"
    assert event["request_id"] == response.headers["X-Request-ID"]
    assert event["method"] == "GET"
    assert event["route"] == "scaicore.events"
    assert event["path"] == EVENTS
    assert event["status"] == 200
    assert event["plugin"] == "scaicore"
    assert event["tenant_id"] == "acme"
    assert event["sub"] == "user-1"
    assert event["credential_source"] == "user_jwt"
    assert event["upstream_status"] == 200
    assert event["upstream_request_id"] == "sg-77"
    assert isinstance(event["duration_ms"], float)
    assert isinstance(event["upstream_duration_ms"], float)
    assert event["upstream_duration_ms"] <= event["duration_ms"]


async def test_one_access_event_per_request(gateway, upstream, viewer, stream):
    upstream.route("GET", EVENTS_UP, json_body=PAGE)
    responses = [
        await gateway.get(EVENTS, headers=bearer(viewer)),
        await gateway.get(EVENTS),
        await gateway.get("/api/v1/nothing"),
        await gateway.get("/healthz"),
    ]
    events = named(stream, "request")
    assert [event["status"] for event in events] == [200, 401, 404, 200]
    assert [event["request_id"] for event in events] == [
        response.headers["X-Request-ID"] for response in responses
    ]
    assert all(event["level"] == "info" for event in events)


async def test_access_event_for_refused_request(gateway, stream):
    await gateway.get(EVENTS)
    [event] = named(stream, "request")
    assert event["status"] == 401
    assert event["route"] == "scaicore.events"
    assert "tenant_id" not in event
    assert "credential_source" not in event


async def test_access_event_for_upstream_error(gateway, upstream, viewer, stream):
    upstream.route(
        "GET",
        EVENTS_UP,
        json_body={
            "status": "error",
            "error": {"code": "not_found", "message": "gone"},
            "meta": {"request_id": "sg-404"},
        },
        status=404,
    )
    await gateway.get(EVENTS, headers=bearer(viewer))
    [event] = named(stream, "request")
    assert event["status"] == 404
    assert event["upstream_status"] == 404
    assert event["upstream_request_id"] == "sg-404"


async def test_request_context_not_leaked(gateway, upstream, viewer, stream):
    """Keep-alive requests on one connection each start from a clean context."""
    upstream.route("GET", EVENTS_UP, json_body=PAGE)
    await gateway.get(EVENTS, headers=bearer(viewer))
    await gateway.get("/healthz")
    healthz = named(stream, "request")[-1]
    assert healthz["route"] == "/healthz"
    assert "tenant_id" not in healthz
    assert "sub" not in healthz


class BindsAtStartup:
    """A plugin whose start-up binds a structlog context variable."""

    @hookimpl
    async def scaiproxy_startup(self, app: web.Application) -> None:
        structlog.contextvars.bind_contextvars(bound_at_startup="yes")


async def test_startup_context_not_on_requests(
    make_gateway, upstream, jwks_server, viewer, stream
):
    """Connections inherit the start-up task's context; requests must not."""
    raw = base_config(
        upstream.base_url,
        jwks_server.url,
        plugins={"enabled": ["scaicore", "binds"]},
    )
    try:
        client = await make_gateway(raw, plugins={"binds": BindsAtStartup()})
        await client.get("/healthz")
        await client.get(EVENTS, headers=bearer(viewer))
    finally:
        structlog.contextvars.clear_contextvars()
    requests = named(stream, "request")
    assert len(requests) == 2
    assert all("bound_at_startup" not in line for line in requests)


async def test_request_fields_on_handler_lines(gateway, upstream, viewer, stream):
    """A warning logged while serving a request carries its id and caller."""
    upstream.route("GET", EVENTS_UP, json_body={"unexpected": True})
    response = await gateway.get(EVENTS, headers=bearer(viewer))
    [warning] = named(stream, "upstream_bad_shape")
    assert response.status == 502
    assert warning["request_id"] == response.headers["X-Request-ID"]
    assert warning["tenant_id"] == "acme"
    assert warning["sub"] == "user-1"


# --- upstream failures --------------------------------------------------------


async def test_upstream_server_error_warned(gateway, upstream, viewer, stream):
    upstream.route(
        "GET", EVENTS_UP, json_body={}, status=500, headers={"X-Request-ID": "sg-500"}
    )
    await gateway.get(EVENTS, headers=bearer(viewer))
    [warning] = named(stream, "upstream_error_status")
    assert warning["level"] == "warning"
    assert warning["upstream_status"] == 500
    assert warning["upstream_request_id"] == "sg-500"
    assert warning["route"] == "scaicore.events"
    assert warning["request_id"] == named(stream, "request")[0]["request_id"]


async def test_upstream_timeout_warned(
    make_gateway, upstream, jwks_server, viewer, stream
):
    raw = base_config(upstream.base_url, jwks_server.url, upstream={"timeout_s": 0.2})
    client = await make_gateway(raw)

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.json_response(PAGE)

    upstream.route("GET", EVENTS_UP, slow)
    response = await client.get(EVENTS, headers=bearer(viewer))
    [warning] = named(stream, "upstream_timeout")
    assert response.status == 504
    assert warning["level"] == "warning"
    assert warning["route"] == "scaicore.events"


async def test_upstream_unreachable_warned(make_gateway, jwks_server, viewer, stream):
    raw = base_config("http://127.0.0.1:1", jwks_server.url)
    client = await make_gateway(raw)
    response = await client.get(EVENTS, headers=bearer(viewer))
    [warning] = named(stream, "upstream_failed")
    assert response.status == 502
    assert warning["level"] == "warning"
    assert "error" in warning


async def test_bad_shape_warned(gateway, upstream, viewer, stream):
    upstream.route("GET", EVENTS_UP, json_body={"data": 5})
    await gateway.get(EVENTS, headers=bearer(viewer))
    [warning] = named(stream, "upstream_bad_shape")
    assert warning["level"] == "warning"


# --- stdlib and aiohttp records -----------------------------------------------


def test_stdlib_record_same_shape(stream):
    logging.getLogger("aiohttp.server").error(
        "Error handling request from %s", "1.2.3.4"
    )
    [record] = lines(stream)
    assert set(record) == SHAPE
    assert record["event"] == "Error handling request from 1.2.3.4"
    assert record["level"] == "error"
    assert record["logger"] == "aiohttp.server"


def test_structlog_event_same_shape(stream):
    structlog.get_logger("scaiproxy.test").warning("something_happened")
    [record] = lines(stream)
    assert set(record) == SHAPE


async def test_aiohttp_own_record_is_json(gateway, debug_stream):
    """A malformed request line makes aiohttp log through the same chain."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.server.port)
    writer.write(b"NOT-HTTP Bearer " + JWT.encode() + b"\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    await asyncio.sleep(0.05)
    records = [line for line in lines(debug_stream) if line["logger"] == "aiohttp.server"]
    assert len(records) == 1
    assert SHAPE <= set(records[0])
    assert records[0]["status"] == 400
    assert JWT not in debug_stream.getvalue()


def test_stdlib_exception_rendered(stream):
    try:
        raise ValueError("bad thing")
    except ValueError:
        logging.getLogger("aiohttp.web").exception("Error handling request")
    [record] = lines(stream)
    assert record["level"] == "error"
    assert record["exception"][0]["exc_type"] == "ValueError"


def test_traceback_locals_left_out(stream):
    secret = "cookie-jar-value-" + "q" * 20
    try:
        raise RuntimeError("failed")
    except RuntimeError:
        structlog.get_logger("scaiproxy.test").exception("crash", hint=len(secret))
    text = stream.getvalue()
    assert "cookie-jar-value" not in text
    assert "locals" not in json.loads(text)["exception"][0]["frames"][0]


def test_level_filters(stream):
    structlog.get_logger("scaiproxy.test").debug("hidden")
    logging.getLogger("aiohttp.server").debug("hidden too")
    assert lines(stream) == []


def test_access_logger_quiet(stream):
    logging.getLogger("aiohttp.access").info("GET / 200")
    assert lines(stream) == []


def test_console_format_readable():
    output = io.StringIO()
    configure_logging(LoggingConfig(format="console"), stream=output)
    logging.getLogger("aiohttp.server").warning("plain line")
    configure_logging(LoggingConfig(format="json"), stream=io.StringIO())
    assert "plain line" in output.getvalue()
    assert not output.getvalue().startswith("{")


# --- no credential anywhere ---------------------------------------------------


def secrets_in(text: str, *secrets: str) -> list[str]:
    return [secret for secret in secrets if secret in text]


async def test_no_credential_in_logs(
    make_gateway, upstream, jwks_server, rsa_key, debug_stream
):
    token = mint(rsa_key, permissions=["scaicore:view", "scaicore:manage"])
    signature = token.rsplit(".", 1)[1]
    raw = base_config(
        upstream.base_url,
        jwks_server.url,
        auth={"upstream_credentials": "auto"},
    )
    client = await make_gateway(raw, environ={"SCAIGRID_API_KEY": ENV_KEY})
    key_raw = base_config(
        upstream.base_url, jwks_server.url, auth={"upstream_credentials": "api_key"}
    )
    key_client = await make_gateway(key_raw, environ={"SCAIGRID_API_KEY": ENV_KEY})

    headers = {**bearer(token), "Cookie": COOKIE}
    upstream.route("GET", EVENTS_UP, json_body=PAGE)
    await client.get(EVENTS, headers=headers)
    await key_client.get(EVENTS, headers=headers)
    await client.get(
        EVENTS, headers={"Authorization": f"Bearer {token}x", "Cookie": COOKIE}
    )
    await client.post(
        "/api/v1/scaicore/cores/c1/invoke",
        json={"input": {"api_key": ENV_KEY}},
        headers=headers,
    )
    upstream.route("GET", EVENTS_UP, json_body={"error": "no"}, status=401)
    await key_client.get(EVENTS, headers=headers)
    upstream.route("GET", EVENTS_UP, json_body={}, status=500)
    await client.get(EVENTS, headers=headers)

    text = debug_stream.getvalue()
    assert named(debug_stream, "request")
    assert secrets_in(text, token, signature, ENV_KEY, "cookie-value-4f1d2c") == []
    assert "sgk_…9876" in text


async def test_secret_field_not_echoed(make_gateway, upstream, jwks_server, rsa_key):
    """A rejected value of a field named like a secret stays out of the 422."""
    from pydantic import BaseModel

    from scaiproxy import RouteSpec, hookimpl

    class KeyBody(BaseModel):
        api_key: int

    class Keys:
        @hookimpl
        def scaiproxy_routes(self) -> list[RouteSpec]:
            async def store(call: Any) -> dict:
                return {}

            return [RouteSpec("POST", "/v1/keys", store, name="keys", body=KeyBody)]

    raw = base_config(upstream.base_url, jwks_server.url, plugins={"enabled": ["keys"]})
    client = await make_gateway(raw, plugins={"keys": Keys()})
    response = await client.post(
        "/api/v1/keys",
        json={"api_key": "hunter2-secret"},
        headers=bearer(mint(rsa_key)),
    )
    assert response.status == 422
    assert "hunter2-secret" not in await response.text()


# --- the redaction processor --------------------------------------------------


JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEifQ.c2lnbmF0dXJlLWJ5dGVz"


def test_redact_jwt_in_text():
    text = redact_text(f"rejected token {JWT} from client")
    assert JWT not in text
    assert "[redacted-jwt]" in text


def test_redact_sgk_key_keeps_last_four():
    text = redact_text(f"key={ENV_KEY};")
    assert ENV_KEY not in text
    assert "sgk_…9876" in text


def test_redact_short_sgk_key():
    assert redact_text("sgk_abcd1") == "sgk_…"


def test_redact_bearer_value():
    assert redact_text("Authorization: Bearer opaque-token-123") == (
        "Authorization: Bearer [redacted]"
    )


def test_redact_leaves_plain_text():
    assert redact_text("GET /api/v1/scaicore/events 200") == (
        "GET /api/v1/scaicore/events 200"
    )


def test_redact_processor_nested():
    event = redact_secrets(
        None,
        "info",
        {
            "event": f"saw {JWT}",
            "headers": {"auth": f"Bearer {JWT}"},
            "keys": [ENV_KEY],
        },
    )
    text = json.dumps(event, ensure_ascii=False)
    assert JWT not in text
    assert ENV_KEY not in text


def test_redaction_applied_to_events(stream):
    structlog.get_logger("scaiproxy.test").info(f"token {JWT}", note=f"key {ENV_KEY}")
    logging.getLogger("aiohttp.client").warning("sent %s", JWT)
    text = stream.getvalue()
    assert JWT not in text
    assert ENV_KEY not in text
    assert len(lines(stream)) == 2


def test_redaction_in_exception_text(stream):
    try:
        raise ValueError(f"could not verify {JWT}")
    except ValueError:
        structlog.get_logger("scaiproxy.test").exception("verify_failed")
    assert JWT not in stream.getvalue()


def test_configure_twice_one_handler():
    first, second = io.StringIO(), io.StringIO()
    configure_logging(LoggingConfig(format="json"), stream=first)
    configure_logging(LoggingConfig(format="json"), stream=second)
    logging.getLogger("aiohttp.server").warning("once")
    assert first.getvalue() == ""
    assert len(lines(second)) == 1


def test_flat_event_with_secret_redacted_by_field():
    event = {
        "event": "request",
        "path": "/api/v1/x",
        "note": "sent Bearer abc.def.ghi",
        "key": "sgk_abcdefghijklmnop1234",
        "status": 200,
    }
    redacted = redact_secrets(None, "info", dict(event))
    assert redacted["path"] == "/api/v1/x"
    assert redacted["note"] == "sent Bearer [redacted]"
    assert redacted["key"] == "sgk_…1234"
    assert redacted["status"] == 200


def test_flat_event_without_secret_unchanged():
    event = {"event": "request", "path": "/api/v1/x", "tenant_id": "acme", "n": 3}
    assert redact_secrets(None, "info", dict(event)) == event


def test_secret_split_across_fields_not_joined():
    # Two fields that would spell a key prefix only if joined without a separator.
    event = {"a": "xsgk", "b": "_abcdefghijklmnop"}
    assert redact_secrets(None, "info", dict(event)) == event


# The access-line writer


ACCESS_FIELDS = {
    "method": "GET",
    "route": "scaicore.events",
    "path": "/api/v1/scaicore/events",
    "status": 200,
    "duration_ms": 1.5,
    "upstream_request_id": "up-1",
}


def test_access_line_matches_structlog_chain(log_stream):
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id="rid-1", tenant_id="acme")
    try:
        structlog.get_logger("scaiproxy.request").info("request", **ACCESS_FIELDS)
        writer = access_line_writer()
        assert writer is not None
        writer.info("request", **dict(ACCESS_FIELDS))
    finally:
        structlog.contextvars.clear_contextvars()
    chain, direct = (json.loads(line) for line in log_stream.getvalue().splitlines())
    assert chain.pop("timestamp").endswith("Z")
    assert direct.pop("timestamp").endswith("Z")
    assert list(direct.items()) == list(chain.items())


def test_access_line_redacts_secrets(log_stream):
    writer = access_line_writer()
    writer.info("request", path="/x?key=sgk_abcdefghijklmnop1234", status=401)
    [line] = named(log_stream, "request")
    assert line["path"] == "/x?key=sgk_…1234"
    assert "abcdefghijklmnop" not in log_stream.getvalue()


class CountingStream(io.StringIO):
    """A stream that counts its writes, as the system calls of an unbuffered stderr."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


class ClosedStream(io.StringIO):
    def write(self, text: str) -> int:
        raise ValueError("I/O operation on closed file")


async def test_lines_of_one_iteration_written_in_one_write():
    stream = CountingStream()
    handler = LineBatchingHandler(stream)
    for number in range(20):
        handler.write_line(f"line {number}\n")
    assert stream.writes == 0
    await asyncio.sleep(0)
    assert stream.writes == 1
    assert stream.getvalue().splitlines() == [f"line {n}" for n in range(20)]
    handler.write_line("next\n")
    await asyncio.sleep(0)
    assert stream.writes == 2
    assert stream.getvalue().endswith("line 19\nnext\n")


async def test_queued_lines_written_before_a_record():
    stream = io.StringIO()
    handler = LineBatchingHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.write_line("access\n")
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "warning", None, None)
    handler.handle(record)
    assert stream.getvalue() == "access\nwarning\n"
    await asyncio.sleep(0)
    assert stream.getvalue() == "access\nwarning\n"


def test_line_outside_a_loop_written_at_once():
    stream = io.StringIO()
    LineBatchingHandler(stream).write_line("now\n")
    assert stream.getvalue() == "now\n"


async def test_flush_writes_queued_lines():
    # logging.shutdown flushes every handler at exit, so a normal shutdown
    # writes what the last iteration queued.
    stream = io.StringIO()
    handler = LineBatchingHandler(stream)
    handler.write_line("last\n")
    handler.flush()
    assert stream.getvalue() == "last\n"


async def test_closed_stream_drops_queued_lines_quietly():
    handler = LineBatchingHandler(ClosedStream())
    handler.write_line("lost\n")
    await asyncio.sleep(0)
    handler.flush()
    assert handler._queued == []


async def test_access_lines_from_requests_all_written(log_stream):
    writer = access_line_writer()
    for number in range(50):
        writer.info("request", path=f"/p/{number}", status=200)
    await asyncio.sleep(0)
    assert [line["path"] for line in named(log_stream, "request")] == [
        f"/p/{n}" for n in range(50)
    ]


def test_utc_timestamp_shape_and_value():
    import datetime
    import re

    before = datetime.datetime.now(datetime.UTC)
    text = utc_timestamp()
    after = datetime.datetime.now(datetime.UTC)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", text)
    stamp = datetime.datetime.fromisoformat(text)
    assert before - datetime.timedelta(microseconds=1) <= stamp <= after


def test_utc_timestamp_follows_the_second(monkeypatch):
    import time

    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.25)
    assert utc_timestamp() == "2027-01-15T08:00:00.250000Z"
    monkeypatch.setattr(time, "time", lambda: 1_800_000_001.999999)
    assert utc_timestamp() == "2027-01-15T08:00:01.999999Z"


def test_access_writer_follows_handler(log_stream):
    assert access_line_writer() is not None
    root = logging.getLogger()
    handler = next(h for h in root.handlers if getattr(h, "_scaiproxy", False))
    root.removeHandler(handler)
    try:
        assert access_line_writer() is None
    finally:
        root.addHandler(handler)


def test_console_format_has_no_access_writer():
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    configure_logging(LoggingConfig(level="info", format="console"), stream=stream)
    try:
        assert access_line_writer() is None
    finally:
        for handler in list(root.handlers):
            if getattr(handler, "_scaiproxy", False):
                root.removeHandler(handler)
        root.setLevel(level)
        structlog.reset_defaults()


async def test_lines_and_thread_records_all_written():
    import threading

    stream = io.StringIO()
    handler = LineBatchingHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))

    def emit_records() -> None:
        for number in range(2000):
            record = logging.LogRecord(
                "x", logging.WARNING, __file__, 1, f"record {number}", None, None
            )
            handler.handle(record)

    thread = threading.Thread(target=emit_records)
    # Switch threads as often as possible while both write.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        thread.start()
        for number in range(2000):
            handler.write_line(f"line {number}\n")
            if number % 50 == 0:
                await asyncio.sleep(0)
        thread.join()
    finally:
        sys.setswitchinterval(interval)
    handler.flush()
    written = stream.getvalue().splitlines()
    assert sorted(written) == sorted(
        [f"line {n}" for n in range(2000)] + [f"record {n}" for n in range(2000)]
    )
