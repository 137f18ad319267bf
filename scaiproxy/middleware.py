"""The shared middleware: tracing, errors and envelope, authentication and
the permission check, in that order, for every request.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from random import getrandbits
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from scaiproxy import jsonutil
from scaiproxy.auth import insufficient_scope
from scaiproxy.errors import (
    INTERNAL_ERROR,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    PAYLOAD_TOO_LARGE,
    ProxyError,
)
from scaiproxy.logs import REQUEST_LOG_FIELDS, access_line_writer, may_hold_secret

if TYPE_CHECKING:
    from scaiproxy.metrics import Metrics
    from scaiproxy.routes import RouteSpec

log = structlog.get_logger("scaiproxy.request")
# The stdlib logger behind ``log``: asking it for the level skips building the
# access event's fields when INFO is off.
_access_logger = logging.getLogger("scaiproxy.request")

REQUEST_ID_HEADER = "X-Request-ID"
SERVER_HEADER = "Server"
#: The Server header of every response; aiohttp's default names Python's and
#: aiohttp's versions.
SERVER_NAME = "scaiproxy"
#: The status logged when the client closed the connection before the response.
CLIENT_CLOSED_REQUEST = 499
#: The status logged for a request that the gateway's shutdown cut off; its
#: client sees the connection close without a response.
CUT_OFF_AT_SHUTDOWN = 503
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# Keys of per-request state in the aiohttp request mapping.
REQUEST_ID = web.RequestKey("request_id", str)
PRINCIPAL = web.RequestKey("principal", object)
# The request's upstream calls, for the access event. The Call itself is not
# stored: it refers to the request, and that cycle would leave every request to
# the cyclic garbage collector (14 to 23 % of the CPU time, measured under load).
UPSTREAM_CALLS = web.RequestKey("upstream_calls", object)


def route_spec(request: web.Request) -> RouteSpec | None:
    """Return the spec of the matched plugin route, ``None`` for other routes."""
    return getattr(request.match_info.handler, "route_spec", None)


def request_id_for(request: web.Request) -> str:
    """Keep a well-formed incoming ``X-Request-ID``, otherwise make a new one.

    An id that looks like a token or a key is replaced too: it would be echoed
    to the client and sent to ScaiGrid, while the log lines show it redacted.
    """
    values = request.headers.getall(REQUEST_ID_HEADER, ())
    if (
        len(values) == 1
        and _REQUEST_ID.fullmatch(values[0])
        and not may_hold_secret(values[0])
    ):
        return values[0]
    # 128 random bits as 32 hex digits, the shape of uuid4().hex. An id only
    # correlates log lines, so it need not be unpredictable, and the random
    # module costs no system call (it is reseeded in every forked worker).
    return f"{getrandbits(128):032x}"


def json_response(status: int, body: bytes, headers: Any = None) -> web.Response:
    return web.Response(
        status=status, body=body, content_type="application/json", headers=headers
    )


def error_response(error: ProxyError) -> web.Response:
    body = jsonutil.dumps({"detail": error.detail()})
    return json_response(error.status, body, error.headers)


def gateway_middleware(metrics: Metrics) -> Any:
    """Return the middleware that runs the shared steps of every request.

    1. Tracing binds the request id, and after the response writes one access
       event and the request metrics.
    2. Errors: every exception becomes the error envelope.
    3. Authentication and the permission check, for plugin routes that need them.

    The steps share one coroutine because each middleware layer, and each
    coroutine that a response passes through, costs time on every request.
    """
    from scaiproxy.app import DEV_PRINCIPAL, STATE, VERIFIER

    @web.middleware
    async def gateway(request: web.Request, handler: Any) -> web.StreamResponse:
        request_id = request_id_for(request)
        request[REQUEST_ID] = request_id
        spec = route_spec(request)
        # aiohttp runs each request in a task of its own, so this value ends
        # with the request, and the next request on the connection sets its own.
        log_fields = {"request_id": request_id}
        REQUEST_LOG_FIELDS.set(log_fields)
        started = time.perf_counter()
        status = 500
        cancelled = False
        try:
            try:
                if spec is not None and spec.authenticated:
                    app = request.app
                    principal = app.get(DEV_PRINCIPAL)
                    if principal is None:
                        principal = await app[VERIFIER].verify_header(request.headers)
                    _authorize(request, spec, principal, log_fields)
                response = await handler(request)
            except Exception as exc:  # noqa: BLE001 - _error_for maps each kind
                response = error_response(_error_for(request, exc))
            status = response.status
            if not response.prepared:
                headers = response.headers
                headers[REQUEST_ID_HEADER] = request_id
                headers[SERVER_HEADER] = SERVER_NAME
            return response
        except web.HTTPException as exc:
            # Only statuses below 400 get here: the others became an envelope.
            status = exc.status
            exc.headers[REQUEST_ID_HEADER] = request_id
            exc.headers[SERVER_HEADER] = SERVER_NAME
            raise
        except asyncio.CancelledError:
            status = CLIENT_CLOSED_REQUEST
            cancelled = True
            raise
        finally:
            duration = time.perf_counter() - started
            transport = request.transport
            disconnected = transport is None or transport.is_closing()
            if disconnected:
                # The client left before the response was sent: 499, as nginx logs it.
                status = CLIENT_CLOSED_REQUEST
            route = spec.name if spec else _system_route(request)
            if cancelled and request.app[STATE].get("stopping"):
                # The gateway's own shutdown cancelled the handler, not the client.
                status = CUT_OFF_AT_SHUTDOWN
                disconnected = False
                log.warning(
                    "request_cut_off",
                    route=route,
                    method=request.method,
                    path=request.path[:512],
                    duration_ms=round(duration * 1000, 3),
                )
            metrics.record_request(route, request.method, status, duration)
            _access_event(request, spec, route, status, duration, disconnected)

    return gateway


def _system_route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _access_event(
    request: web.Request,
    spec: RouteSpec | None,
    route: str,
    status: int,
    duration: float,
    disconnected: bool,
) -> None:
    if not _access_logger.isEnabledFor(logging.INFO):
        return
    fields: dict[str, Any] = {
        "method": request.method,
        "route": route,
        "path": request.path[:512],
        "status": status,
        "duration_ms": round(duration * 1000, 3),
    }
    if spec is not None:
        fields["plugin"] = spec.plugin
    principal = request.get(PRINCIPAL)
    if principal is not None:
        fields["tenant_id"] = principal.tenant_id
        fields["sub"] = principal.sub
    upstream = request.get(UPSTREAM_CALLS)
    if upstream is not None:
        if upstream.credential is not None:
            fields["credential_source"] = upstream.credential.source
        if upstream.last_status is not None:
            fields["upstream_status"] = upstream.last_status
        if upstream.last is not None:
            fields["upstream_duration_ms"] = round(upstream.last.duration_ms, 3)
        if upstream.last_request_id:
            fields["upstream_request_id"] = upstream.last_request_id[:128]
    writer = access_line_writer() or log
    if disconnected or status == CLIENT_CLOSED_REQUEST:
        writer.info("client_disconnected", **dict(fields))
    writer.info("request", **fields)


def _error_for(request: web.Request, exc: Exception) -> ProxyError:
    """Return the error to send for ``exc``; re-raise redirects and other
    HTTP exceptions below 400, which aiohttp sends as they are."""
    if isinstance(exc, ProxyError):
        error = exc
    elif isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        error = _from_http_exception(request, exc)
        _drop_tracebacks(exc)
    else:
        log.exception("unhandled_error", path=request.path[:512], exc_info=exc)
        _drop_tracebacks(exc)
        error = ProxyError(
            500,
            INTERNAL_ERROR,
            "The gateway failed to handle this request.",
            fix="Try again; if it persists, report the X-Request-ID to the operators.",
        )
    _drop_tracebacks(error)
    return error


def _drop_tracebacks(exc: BaseException | None) -> None:
    """Drop the frames of an exception that is already turned into a response.

    A traceback refers to frames whose locals often refer back to the exception.
    That cycle would leave the request's objects to the cyclic garbage collector.
    """
    for _ in range(8):
        if exc is None:
            return
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> ProxyError:
    if exc.status == 404:
        return ProxyError(
            404,
            NOT_FOUND,
            f"No route matches {request.method} {request.path[:200]}.",
            fix="GET /openapi.json lists the routes.",
        )
    if exc.status == 405 and isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return ProxyError(
            405,
            METHOD_NOT_ALLOWED,
            f"{request.method} is not allowed on {request.path[:200]}; use {allowed}.",
            fix=f"Send the request with {allowed}; GET /openapi.json lists each "
            "route's methods.",
            headers={"Allow": allowed},
        )
    if exc.status == 413:
        limit = request.app._client_max_size  # noqa: SLF001 - aiohttp keeps it here
        return payload_too_large(limit)
    return ProxyError(
        exc.status, f"http_{exc.status}", exc.reason or "The request failed."
    )


def payload_too_large(limit: int) -> ProxyError:
    return ProxyError(
        413,
        PAYLOAD_TOO_LARGE,
        f"The request body is larger than the limit of {limit} bytes.",
        fix="Send a smaller body; operators set the limit in server.max_body_bytes.",
        limit=limit,
    )


def _authorize(
    request: web.Request, spec: RouteSpec, principal: Any, log_fields: dict[str, Any]
) -> None:
    """Bind the verified caller and check the route's permission and roles."""
    request[PRINCIPAL] = principal
    log_fields["tenant_id"] = principal.tenant_id
    log_fields["sub"] = principal.sub
    if spec.permission and not principal.has_permission(spec.permission):
        raise insufficient_scope(spec.permission, base_path=_base_path(request))
    if spec.roles and not principal.roles.intersection(spec.roles):
        raise insufficient_scope(
            list(spec.roles), kind="role", base_path=_base_path(request)
        )


def _base_path(request: web.Request) -> str:
    from scaiproxy.app import SETTINGS

    return request.app[SETTINGS].server.base_path


def middlewares(metrics: Metrics) -> list[Any]:
    """Return the middleware chain, outermost first."""
    return [gateway_middleware(metrics)]
