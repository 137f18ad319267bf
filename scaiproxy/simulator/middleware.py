"""Per-request plumbing: request ids, authentication, faults, errors and recording.

The simulator serves four areas on one port, selected by path prefix:
ScaiGrid (everything not listed below), the ScaiKey stand-in (``/scaikey``), the
ScaiVault stand-in (``/scaivault``) and the test controls (``/_sim``). Only
ScaiGrid requests are authenticated with ScaiGrid credentials and get the
configured latency, rate limit and error rate.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt
from aiohttp import web

from scaiproxy.simulator import errors
from scaiproxy.simulator.encoding import dumps, loads
from scaiproxy.simulator.errors import SimError, scaigrid_error_body
from scaiproxy.simulator.runtime import iso_timestamp

if TYPE_CHECKING:
    from scaiproxy.simulator.server import Simulator

logger = logging.getLogger("scaiproxy.simulator")

SIMULATOR_KEY: web.AppKey[Simulator] = web.AppKey("scaiproxy.simulator")

SCAIGRID = "scaigrid"
SCAIKEY = "scaikey"
SCAIVAULT = "scaivault"
CONTROL = "control"

#: Requests kept for ``GET /_sim/requests``, oldest dropped first.
MAX_RECORDED_REQUESTS = 1000

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_RATE_WINDOW_S = 60

# Header values that carry no secret and that gateway tests want to check.
_RECORDED_HEADERS = (
    "user-agent",
    "accept",
    "content-type",
    "x-request-id",
    "traceparent",
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Principal:
    """The tenant a ScaiGrid request acts for, and how it proved that."""

    tenant_id: str
    kind: str
    subject: str


def _request_key(name: str, value_type: type) -> Any:
    # aiohttp 3.14 added web.RequestKey and warns about plain string keys, which
    # older releases need.
    request_key = getattr(web, "RequestKey", None)
    return name if request_key is None else request_key(name, value_type)


PRINCIPAL_KEY = _request_key("scaiproxy.simulator.principal", Principal)
REQUEST_ID_KEY = _request_key("scaiproxy.simulator.request_id", str)


def area_of(path: str) -> str:
    for prefix, area in (
        ("/scaikey/", SCAIKEY),
        ("/scaivault/", SCAIVAULT),
        ("/_sim/", CONTROL),
    ):
        if path.startswith(prefix) or path == prefix[:-1]:
            return area
    return SCAIGRID


def json_response(
    value: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=dumps(value),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def error_response(area: str, error: SimError, request_id: str) -> web.Response:
    """Render ``error`` in the body shape of the area that raised it."""
    body: dict[str, Any]
    if area == SCAIVAULT:
        body = {"error": error.code, "message": error.message, "request_id": request_id}
    elif area == SCAIKEY:
        # OAuth 2.0 error members (RFC 6749, section 5.2).
        body = {"error": error.code, "error_description": error.message}
    else:
        body = scaigrid_error_body(error, request_id)
    headers = dict(error.headers)
    if error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    return json_response(body, error.status, headers)


def authorization_kind(header: str | None) -> str:
    """Classify an Authorization header without looking at the secret.

    Returns "none", "sgk" (a ScaiGrid API key), "jwt", or "other".
    """
    if not header:
        return "none"
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return "other"
    if token.startswith("sgk_"):
        return "sgk"
    if token.count(".") == 2:
        return "jwt"
    return "other"


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def mask_key(api_key: str) -> str:
    return f"sgk_…{api_key[-4:]}"


def _unauthorized(message: str) -> SimError:
    return SimError(
        401,
        errors.UNAUTHORIZED,
        message,
        headers={"WWW-Authenticate": 'Bearer realm="scaigrid", error="invalid_token"'},
    )


def authenticate(sim: Simulator, request: web.Request) -> Principal:
    """Map the bearer token to a tenant, or raise the 401."""
    token = bearer_token(request)
    if token is None:
        raise _unauthorized("Missing bearer token: send Authorization: Bearer <token>.")

    if token.startswith("sgk_"):
        # SECURITY: the key is looked up as a whole and never logged or echoed.
        tenant_id = sim.state.api_keys.get(token)
        if tenant_id is None:
            raise _unauthorized("Unknown or revoked API key.")
        return Principal(tenant_id, "sgk", f"api_key:{mask_key(token)}")

    try:
        verified = sim.scaikey.verify(token)
    except jwt.InvalidTokenError as exc:
        raise _unauthorized(f"Invalid access token: {exc}.") from None
    return Principal(verified.tenant_id, "jwt", verified.sub or "unknown")


class RateLimiter:
    """Counts ScaiGrid requests per tenant in fixed 60-second windows."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        # Per tenant: start of the current window and requests counted in it.
        self._windows: dict[str, tuple[float, int]] = {}

    def check(self, tenant_id: str, limit: int) -> dict[str, str]:
        """Count one request and return the rate-limit headers, or raise the 429.

        ``X-Scaigrid-Ratelimit-Reset`` is the Unix time at which the window ends.
        """
        now = self._clock()
        window_start = now - now % _RATE_WINDOW_S
        start, count = self._windows.get(tenant_id, (window_start, 0))
        if start != window_start:
            count = 0

        reset = int(window_start + _RATE_WINDOW_S)
        headers = {
            "X-Scaigrid-Ratelimit-Limit": str(limit),
            "X-Scaigrid-Ratelimit-Remaining": str(max(0, limit - count - 1)),
            "X-Scaigrid-Ratelimit-Reset": str(reset),
        }
        if count >= limit:
            retry_after = max(1, math.ceil(reset - now))
            raise SimError(
                429,
                errors.RATE_LIMITED,
                f"Rate limit of {limit} requests per minute exceeded for tenant "
                f"{tenant_id!r}; retry in {retry_after} s.",
                retry_after=retry_after,
                headers=headers,
            )
        self._windows[tenant_id] = (window_start, count + 1)
        return headers


def create_simulator_middleware(sim: Simulator) -> Middleware:
    """Build the one middleware that wraps every handler of the simulator."""

    @web.middleware
    async def simulator_middleware(
        request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        incoming_id = request.headers.get("X-Request-ID", "")
        if _REQUEST_ID.fullmatch(incoming_id):
            request_id = incoming_id
        else:
            request_id = f"req_{secrets.token_hex(8)}"
        request[REQUEST_ID_KEY] = request_id
        area = area_of(request.path)
        extra_headers: dict[str, str] = {}
        principal: Principal | None = None

        try:
            route_error = request.match_info.http_exception
            if area == SCAIGRID:
                if sim.options.latency_ms > 0:
                    await asyncio.sleep(sim.options.latency_ms / 1000)
                if route_error is None:
                    principal = authenticate(sim, request)
                    request[PRINCIPAL_KEY] = principal
                    extra_headers = _apply_faults(sim, principal)
            if route_error is not None:
                raise _route_error(route_error, request)
            response = await handler(request)
        except SimError as error:
            response = error_response(area, error, request_id)
        except web.HTTPException as exc:
            # aiohttp raises these itself, for example 413 from request.read().
            response = error_response(area, _from_http_exception(exc), request_id)
        except Exception:
            logger.exception(
                "unhandled error on %s %s, request %s",
                request.method,
                request.path,
                request_id,
            )
            error = SimError(500, errors.INTERNAL_ERROR, "Internal simulator error.")
            response = error_response(area, error, request_id)

        response.headers["X-Request-ID"] = request_id
        response.headers.update(extra_headers)
        if area != CONTROL:
            sim.recorded_requests.append(
                _request_record(request, request_id, principal, response.status)
            )
        return response

    return simulator_middleware


def _apply_faults(sim: Simulator, principal: Principal) -> dict[str, str]:
    """Apply the rate limit and the error rate; return headers for the response."""
    headers: dict[str, str] = {}
    limit = sim.options.rate_limit_per_minute
    if limit is not None:
        headers = sim.rate_limiter.check(principal.tenant_id, limit)
    rate = sim.options.error_rate
    if rate > 0 and (rate >= 1 or sim.fault_rng.random() < rate):
        error = SimError(
            500,
            errors.INTERNAL_ERROR,
            f"Simulated upstream failure (error_rate is {rate}).",
        )
        error.headers.update(headers)
        raise error
    return headers


def _route_error(exc: web.HTTPException, request: web.Request) -> SimError:
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return SimError(
            405,
            errors.METHOD_NOT_ALLOWED,
            f"Method {request.method} is not allowed on {request.path}; use {allowed}.",
            headers={"Allow": allowed},
        )
    return SimError(
        404, errors.NOT_FOUND, f"No route for {request.method} {request.path}."
    )


def _from_http_exception(exc: web.HTTPException) -> SimError:
    if exc.status == 413:
        return SimError(413, errors.PAYLOAD_TOO_LARGE, "The request body is too large.")
    code = exc.reason.lower().replace(" ", "_") if exc.reason else "http_error"
    return SimError(exc.status, code, exc.reason or "HTTP error.")


def _request_record(
    request: web.Request,
    request_id: str,
    principal: Principal | None,
    status: int,
) -> dict[str, Any]:
    return {
        "time": iso_timestamp(time.time()),
        "method": request.method,
        "path": request.path,
        # Raw, as sent: a cursor's "+" shows as "%2B" when the client encoded it.
        "query_string": request.rel_url.raw_query_string,
        "auth": authorization_kind(request.headers.get("Authorization")),
        "tenant_id": principal.tenant_id if principal else None,
        "status": status,
        "request_id": request_id,
        "headers": {
            name: request.headers[name]
            for name in _RECORDED_HEADERS
            if name in request.headers
        },
        "header_names": sorted({name.lower() for name in request.headers}),
    }


def new_request_log() -> deque[dict[str, Any]]:
    return deque(maxlen=MAX_RECORDED_REQUESTS)


async def read_json_object(request: web.Request, invalid_code: str) -> dict[str, Any]:
    """Decode the body as a JSON object, or raise a 400 with ``invalid_code``."""
    body = await request.read()
    try:
        value = loads(body)
    except (ValueError, RecursionError):
        # UnicodeDecodeError and json.JSONDecodeError are both ValueErrors.
        raise SimError(
            400, invalid_code, "The request body is not valid JSON."
        ) from None
    if not isinstance(value, dict):
        raise SimError(400, invalid_code, "The request body must be a JSON object.")
    return value
