"""The innermost handler of every plugin route: validate, call the plugin, envelope.

Path parameters, the query string and the JSON body are validated here, before
any upstream call; each problem becomes one entry of a 422 ``validation_error``.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError

from scaiproxy import jsonutil
from scaiproxy.config import ServerConfig, describe_error
from scaiproxy.errors import (
    INVALID_JSON,
    REQUEST_TIMEOUT,
    ProxyError,
    validation_error,
)
from scaiproxy.middleware import (
    PRINCIPAL,
    REQUEST_ID,
    UPSTREAM_CALLS,
    json_response,
    payload_too_large,
)
from scaiproxy.routes import Call, NoContent, RawJSON, RouteSpec, check_path_param
from scaiproxy.upstream import UpstreamCaller

if TYPE_CHECKING:
    from scaiproxy.auth import Principal
    from scaiproxy.credentials import Credential, CredentialResolver
    from scaiproxy.metrics import Metrics

log = structlog.get_logger("scaiproxy.dispatch")

# A rejected value of these fields is never echoed back, as it may be a secret.
_SECRET_FIELD = re.compile(r"(?i)key|token|secret|password")
# W3C Trace Context, version 00 layout: version-trace_id-parent_id-flags in
# lowercase hex; all-zero ids and version ff are invalid.
_TRACEPARENT = re.compile(
    r"(?P<version>[0-9a-f]{2})-(?P<trace_id>[0-9a-f]{32})-"
    r"(?P<parent_id>[0-9a-f]{16})-(?P<flags>[0-9a-f]{2})"
)
# JSON's own names for the values a body may decode to, for error messages.
_JSON_TYPE_NAMES = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "number",
    float: "number",
    type(None): "null",
}
_JSON_FIX = "Send a JSON object with Content-Type: application/json."


def make_handler(spec: RouteSpec) -> Any:
    """Build the aiohttp handler that serves ``spec``."""
    from scaiproxy.app import METRICS, PLUGIN_CONFIGS, RESOLVER, SETTINGS, UPSTREAM

    route_log = log.bind(route=spec.name, plugin=spec.plugin)
    path_params = spec.path_params
    queries = _QueryMemo(spec)
    shared = SharedRuns() if spec.coalesce else None

    def upstream_caller(
        request: web.Request, resolve: Any, credential: Credential | None = None
    ) -> UpstreamCaller:
        """Build the request's upstream caller; a credential given means the
        caller serves a shared run, whose GETs need no coalescing of their own."""
        upstream = UpstreamCaller(
            request.app[UPSTREAM],
            resolve,
            request[REQUEST_ID],
            spec.timeout_s or request.app[SETTINGS].upstream.timeout_s,
            spec.name,
            _traceparent(request),
            credential=credential,
            coalesce=credential is None,
            tenant_id=request[PRINCIPAL].tenant_id if spec.authenticated else None,
        )
        request[UPSTREAM_CALLS] = upstream
        return upstream

    def make_call(
        request: web.Request,
        params: dict[str, str],
        query: Any,
        body: Any,
        principal: Principal | None,
        upstream: UpstreamCaller,
    ) -> Call:
        return Call(
            request=request,
            route=spec,
            principal=principal,
            params=params,
            query=query,
            body=body,
            config=request.app[PLUGIN_CONFIGS].get(spec.plugin),
            upstream=upstream,
            log=route_log,
        )

    async def handle(request: web.Request) -> web.StreamResponse:
        app = request.app
        settings = app[SETTINGS]
        params = _path_params(path_params, request) if path_params else {}
        query = queries.validate(request)
        body = None
        if spec.body is not None:
            body = await _body(spec, request, settings.server)
        principal = request[PRINCIPAL] if spec.authenticated else None
        metrics = app[METRICS]
        resolver = app[RESOLVER]
        resolve = functools.partial(_resolve_credential, resolver, metrics, principal)
        if shared is None or not settings.upstream.coalesce_gets:
            upstream = upstream_caller(request, resolve)
            call = make_call(request, params, query, body, principal, upstream)
            if shared is None:
                return envelope(await spec.handler(call), spec.status)
            pending = spec.handler(call)
        else:
            # Everything a coalesced route's result depends on is in the key.
            credential = resolver.resolve_cached(principal)
            if credential is None:
                credential = await resolver.resolve(principal)
            metrics.child(metrics.credential_sources, credential.source).inc()
            key = (
                request.rel_url.raw_query_string,
                *params.values(),
                principal.tenant_id,
                credential.base_url,
                credential.digest,
            )
            run = shared.get(key)
            if run is None:
                upstream = upstream_caller(request, resolve, credential)
                call = make_call(request, params, query, None, principal, upstream)
                run = shared.start(key, spec.handler(call), upstream)
            else:
                metrics.child(metrics.coalesced, spec.name).inc()
                request[UPSTREAM_CALLS] = run.upstream
            pending = run.waiter()

        # A coalesced route's result may go to several requests, and one aiohttp
        # response, returned or raised as a redirect, can be sent only once.
        try:
            result = await pending
        except web.HTTPException as exc:
            if exc.status >= 400:
                raise
            result = exc
        if not isinstance(result, RawJSON) and isinstance(result, web.StreamResponse):
            raise TypeError(
                f"route {spec.name!r} coalesces, so its handler must return data, "
                f"not a response (got HTTP {result.status})"
            )
        return envelope(result, spec.status)

    handle.route_spec = spec  # type: ignore[attr-defined]
    return handle


async def _resolve_credential(
    resolver: CredentialResolver, metrics: Metrics, principal: Principal
) -> Credential:
    credential = await resolver.resolve(principal)
    metrics.child(metrics.credential_sources, credential.source).inc()
    return credential


class SharedRun:
    """One run of a coalesced route's handler, which identical requests share."""

    __slots__ = ("_waiters", "future", "upstream")

    def __init__(self, future: asyncio.Future[Any], upstream: UpstreamCaller) -> None:
        self.future = future
        #: The run's upstream calls, for the access event of every request served.
        self.upstream = upstream
        self._waiters: list[asyncio.Future[Any]] = []
        future.add_done_callback(self._settle_waiters)

    def waiter(self) -> asyncio.Future[Any]:
        """Return a future of the run's outcome for one waiting request.

        Cancelling it, as cancelling the request's task does, leaves the run
        going. One future per waiter costs less than ``asyncio.shield``, which
        adds a future and two callbacks per waiter.
        """
        waiter = self.future.get_loop().create_future()
        self._waiters.append(waiter)
        if self.future.done():
            # Settled already: the callback that settles waiters has run.
            self._settle_waiters(self.future)
        return waiter

    def _settle_waiters(self, future: asyncio.Future[Any]) -> None:
        for waiter in self._waiters:
            if waiter.done():
                continue
            if future.cancelled():
                waiter.cancel()
            elif (error := future.exception()) is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(future.result())
        self._waiters.clear()


class SharedRuns:
    """The handler runs of one coalesced route in flight, by what they depend on.

    A coalesced route's result depends only on its path parameters, its query
    string, the caller's tenant and the upstream credential. While a run for
    such a key is in flight, identical requests wait for its result instead of
    starting their own, so many canvases polling one page cost one run and one
    upstream call. Each run is a task of its own: the cancellation of the
    request that started it leaves the others waiting on it unharmed.
    """

    def __init__(self) -> None:
        self._runs: dict[tuple[Any, ...], SharedRun] = {}

    def get(self, key: tuple[Any, ...]) -> SharedRun | None:
        return self._runs.get(key)

    def start(
        self,
        key: tuple[Any, ...],
        work: Coroutine[Any, Any, Any],
        upstream: UpstreamCaller,
    ) -> SharedRun:
        """Run ``work`` as a task that requests with ``key`` share until it ends."""
        future = asyncio.ensure_future(work)
        run = SharedRun(future, upstream)
        self._runs[key] = run
        future.add_done_callback(functools.partial(self._finished, key))
        return run

    def _finished(self, key: tuple[Any, ...], future: asyncio.Future[Any]) -> None:
        self._runs.pop(key, None)
        # Retrieve the outcome even when every waiter was cancelled.
        error = None if future.cancelled() else future.exception()
        if isinstance(error, ProxyError):
            # Its frames hold the futures that hold it. Waiters drop them after
            # building their response, but when every waiter was cancelled (at
            # shutdown) only the cyclic collector would free the run's objects.
            # A ProxyError's traceback is never logged.
            error.__traceback__ = None

    def __len__(self) -> int:
        return len(self._runs)


def envelope(result: Any, status: int = 200) -> web.StreamResponse:
    """Wrap a handler's result as ``{"data": ...}``."""
    # RawJSON first: pages and lists are the common case, and StreamResponse,
    # a MutableMapping, takes the slower isinstance check of abstract classes.
    if isinstance(result, RawJSON):
        return json_response(status, result.enveloped())
    if isinstance(result, web.StreamResponse):
        return result
    if isinstance(result, NoContent):
        return web.Response(status=204)
    return json_response(status, b'{"data":' + jsonutil.dumps(result) + b"}")


def _path_params(names: tuple[str, ...], request: web.Request) -> dict[str, str]:
    params: dict[str, str] = {}
    errors = []
    for name in names:
        value = request.match_info.get(name, "")
        message = check_path_param(name, value)
        if message:
            errors.append({"field": name, "location": "path", "message": message})
        params[name] = value
    if errors:
        raise validation_error(errors)
    return params


def _traceparent(request: web.Request) -> str | None:
    values = request.headers.getall("traceparent", [])
    if len(values) != 1:
        return None
    match = _TRACEPARENT.fullmatch(values[0])
    if match is None or match["version"] == "ff":
        return None
    if set(match["trace_id"]) == {"0"} or set(match["parent_id"]) == {"0"}:
        return None
    return values[0]


class _QueryMemo:
    """Validated queries of one route, by raw query string.

    A Live Runs panel sends the same query string on every poll. When the
    route's query model is frozen, a query string that validated once maps to
    its model, and the next request with it skips validation. Only successful
    validations are kept, at most ``MAX_ENTRIES``, the oldest dropped first.
    """

    MAX_ENTRIES = 256

    def __init__(self, spec: RouteSpec) -> None:
        self._spec = spec
        model = spec.query
        self._enabled = model is None or bool(model.model_config.get("frozen"))
        self._entries: dict[str, BaseModel | None] = {}

    def validate(self, request: web.Request) -> BaseModel | None:
        if not self._enabled:
            return _query(self._spec, request)
        # The raw form: two query strings that decode alike may still parse apart.
        raw = request.rel_url.raw_query_string
        if raw in self._entries:
            return self._entries[raw]
        query = _query(self._spec, request)
        if len(self._entries) >= self.MAX_ENTRIES:
            del self._entries[next(iter(self._entries))]
        self._entries[raw] = query
        return query


def _query(spec: RouteSpec, request: web.Request) -> BaseModel | None:
    raw = request.query
    errors: list[dict[str, str]] = []
    fields = spec.query.model_fields if spec.query else {}
    values: dict[str, str] = {}
    seen: set[str] = set()
    for key in raw:
        if key in seen:
            continue
        seen.add(key)
        if key not in fields:
            allowed = ", ".join(fields) or "none"
            errors.append(
                {
                    "field": key[:64] or "(empty name)",
                    "location": "query",
                    "message": f"unknown query parameter; allowed: {allowed}",
                }
            )
            continue
        given = raw.getall(key)
        if len(given) > 1:
            errors.append(
                {
                    "field": key,
                    "location": "query",
                    "message": "given more than once; send it once",
                }
            )
            continue
        values[key] = given[0]
    if errors:
        raise validation_error(errors)
    if spec.query is None:
        return None
    try:
        return spec.query.model_validate(values)
    except ValidationError as exc:
        raise validation_error(_describe(exc, "query")) from None


async def _body(
    spec: RouteSpec, request: web.Request, server: ServerConfig
) -> BaseModel | None:
    if spec.body is None:
        return None
    declared = request.content_length
    if declared is not None and declared > server.max_body_bytes:
        raise payload_too_large(server.max_body_bytes)
    raw = await _read_body(request, server.body_timeout_s)
    if not raw.strip():
        raise ProxyError(400, INVALID_JSON, "The request body is empty.", fix=_JSON_FIX)
    document = _decode_body(raw)
    if not isinstance(document, dict):
        kind = _JSON_TYPE_NAMES.get(type(document), "value")
        raise ProxyError(
            400,
            INVALID_JSON,
            f"The request body is a JSON {kind}, not an object.",
            fix='Send a JSON object, such as {"key": "value"}.',
        )
    try:
        return spec.body.model_validate(document)
    except ValidationError as exc:
        raise validation_error(_describe(exc, "body", spec.body)) from None


async def _read_body(request: web.Request, timeout_s: float) -> bytes:
    """Read the whole body, or raise 408 when it is not complete in ``timeout_s``.

    Without this bound, a client that declares a Content-Length and then sends
    fewer bytes would hold the handler for as long as it keeps the connection.
    """
    try:
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except web.RequestPayloadError as exc:
        # A body that does not decode as its Content-Encoding declares, or one
        # cut short by the client closing the connection.
        log.info("request_body_unreadable", error=str(exc)[:200])
        raise ProxyError(
            400,
            INVALID_JSON,
            "The request body could not be read: it does not match its "
            "Content-Encoding, or the connection closed before its end.",
            fix="Send the body whole, with a Content-Encoding (gzip, deflate) "
            "that matches it or none.",
        ) from None
    except ConnectionResetError:
        log.info("request_body_incomplete", declared_bytes=request.content_length)
        raise ProxyError(
            400,
            INVALID_JSON,
            "The connection closed before the request body was complete.",
            fix="Send the whole body, with a Content-Length that matches it.",
        ) from None
    except TimeoutError:
        received = request.content.total_bytes
        log.info(
            "request_body_timeout",
            timeout_s=timeout_s,
            received_bytes=received,
            declared_bytes=request.content_length,
        )
        raise ProxyError(
            408,
            REQUEST_TIMEOUT,
            f"The request body was not complete within {timeout_s:g} s "
            f"({received} bytes received).",
            fix="Send the whole body within that time, with a Content-Length that "
            "matches it; operators set the limit in server.body_timeout_s.",
            headers={"Connection": "close"},
        ) from None


def _decode_body(raw: bytes) -> Any:
    try:
        return jsonutil.loads(raw, max_depth=jsonutil.MAX_REQUEST_DEPTH)
    except jsonutil.JSONSyntaxError as exc:
        cause = exc.__cause__
        if isinstance(cause, UnicodeDecodeError):
            message = f"The request body is not valid UTF-8 (at byte {cause.start})."
            fix = "Encode the body as UTF-8."
        elif isinstance(cause, RecursionError):
            # The decoder gives up on very deep documents before the depth check
            # runs, so both cases get the depth check's message.
            message = (
                "The request body is not valid JSON: nested deeper than "
                f"{jsonutil.MAX_REQUEST_DEPTH} levels."
            )
            fix = _JSON_FIX
        else:
            message = f"The request body is not valid JSON: {str(exc)[:200]}."
            fix = _JSON_FIX
        raise ProxyError(400, INVALID_JSON, message, fix=fix) from None


def _describe(
    exc: ValidationError, location: str, model: type[BaseModel] | None = None
) -> list[dict[str, str]]:
    entries = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or location
        secret = _SECRET_FIELD.search(field) is not None
        message = describe_error(error, show_input=not secret)
        if error["type"] == "extra_forbidden" and model and len(error["loc"]) == 1:
            message = f"unknown field; allowed: {', '.join(model.model_fields)}"
        elif error["type"] == "string_unicode":
            # pydantic's own message speaks of raw data that cannot be parsed.
            message = (
                "contains a lone surrogate escape such as \\ud800, which is "
                "valid JSON but not Unicode text; send a complete surrogate pair "
                "or the character itself"
            )
        entries.append({"field": field[:128], "location": location, "message": message})
    return entries
