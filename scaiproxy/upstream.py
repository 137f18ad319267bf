"""The upstream client: one pooled session, and the calls plugins make to ScaiGrid.

Every outcome of an upstream call becomes either a successful
:class:`UpstreamResponse` or a :class:`~scaiproxy.errors.ProxyError` with the
status the HTTP contract gives it: 429 with ScaiGrid's rate-limit headers,
ScaiGrid's own 4xx as ``upstream_error``, rejected keys as
``upstream_auth_failed``, anything else wrong as ``bad_gateway`` (502) or
``upstream_timeout`` (504).
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog
from multidict import CIMultiDictProxy
from yarl import URL

from scaiproxy import __version__, jsonutil
from scaiproxy.config import UpstreamConfig
from scaiproxy.credentials import Credential, credentials_route
from scaiproxy.errors import (
    BAD_GATEWAY,
    RATE_LIMITED,
    UPSTREAM_AUTH_FAILED,
    UPSTREAM_ERROR,
    UPSTREAM_TIMEOUT,
    ProxyError,
)
from scaiproxy.logs import redact_text

if TYPE_CHECKING:
    from scaiproxy.metrics import Metrics

log = structlog.get_logger("scaiproxy.upstream")

USER_AGENT = f"scaiproxy/{__version__}"
#: The names of the credential sources in messages.
CREDENTIAL_NAMES = {
    "user_jwt": "user token",
    "tenant_key": "tenant key",
    "env_key": "development key",
}
#: ScaiGrid statuses passed on to the caller as ``upstream_error``.
PASSED_STATUSES = frozenset({400, 401, 403, 404, 409, 422})
_RATE_LIMIT_PREFIX = "x-scaigrid-ratelimit-"
_RETRYABLE = (
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError,
    aiohttp.ClientPayloadError,
)


@dataclass
class UpstreamResponse:
    """A complete upstream response with a 2xx status, its body fully read."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    duration_ms: float
    request_id: str | None = None
    #: Results that handlers derive from this body, shared by coalesced callers.
    memo: dict[str, Any] = field(default_factory=dict)

    def json(self) -> Any:
        """Decode the body exactly, or raise 502 ``bad_gateway``."""
        if "json" not in self.memo:
            try:
                # The depth cap and the range of doubles keep the decoded value
                # safe to encode again.
                self.memo["json"] = jsonutil.loads(
                    self.body, max_depth=512, doubles=True
                )
            except jsonutil.JSONRangeError as exc:
                raise ProxyError(
                    502,
                    BAD_GATEWAY,
                    f"ScaiGrid responded with the number {exc.number}, which is "
                    "beyond the range of a double and cannot be passed on as a "
                    "JSON number.",
                    fix="A retry gets the same answer: the number is in ScaiGrid's "
                    "data, so report it to ScaiGrid's operators.",
                ) from None
            except jsonutil.JSONSyntaxError as exc:
                raise bad_gateway(
                    f"ScaiGrid responded with a body that is not JSON ({str(exc)[:100]})."
                ) from None
        return self.memo["json"]


def bad_gateway(message: str, **extra: Any) -> ProxyError:
    return ProxyError(
        502,
        BAD_GATEWAY,
        message,
        fix="Try again shortly; if it persists, check ScaiGrid's health.",
        **extra,
    )


class IdleDataError(aiohttp.ClientConnectionError):
    """Every pooled connection tried had received data while idle."""


class PoolGuardConnector(aiohttp.TCPConnector):
    """A connector that never reuses a connection which received data while idle.

    aiohttp (3.14.5) parses and queues a response that the upstream sends on a
    pooled connection while no request is in flight, and hands that queued
    response to the next request on the connection. A misbehaving or hostile
    upstream, or a body longer than its Content-Length whose tail arrives late,
    could so give one tenant's request another tenant's page. aiohttp checks
    ``should_close`` when a connection returns to the pool but not when it is
    taken out again, so this connector checks it then and closes the connection.
    Every pooled connection may have to go that way before a new one opens,
    and a new one is discarded only when the server spoke before the request
    was sent.
    """

    #: New connections to discard in a row before the call fails as 502.
    MAX_NEW_DISCARDED = 3

    async def connect(
        self, req: Any, traces: list[Any], timeout: aiohttp.ClientTimeout
    ) -> Any:
        # The pool has at most ``limit`` connections to discard; without a
        # limit (0, which upstream.max_connections never sets) 100 are tried.
        for _ in range((self.limit or 100) + self.MAX_NEW_DISCARDED):
            connection = await super().connect(req, traces, timeout)
            protocol = connection.protocol
            if protocol is None or not protocol.should_close:
                return connection
            # SECURITY: what arrived belongs to no request of ours.
            log.warning(
                "upstream_connection_discarded",
                host=req.url.host,
                reason="data received while the connection was idle",
            )
            connection.close()
        raise IdleDataError(
            f"every connection to {req.url.host} tried had received data before "
            "its request was sent"
        )


class UpstreamClient:
    """The process-wide session and the logic shared by every upstream call."""

    def __init__(
        self,
        config: UpstreamConfig,
        session: aiohttp.ClientSession,
        metrics: Metrics | None = None,
        base_path: str = "/api",
    ) -> None:
        self.config = config
        self.session = session
        self.metrics = metrics
        #: ``server.base_path``, for the route that the fix of a rejected key names.
        self.base_path = base_path
        self._in_flight: dict[
            tuple[str, bytes, str | None], asyncio.Future[UpstreamResponse]
        ] = {}

    @staticmethod
    def create_session(config: UpstreamConfig) -> aiohttp.ClientSession:
        connector = PoolGuardConnector(
            limit=config.max_connections,
            limit_per_host=config.max_connections,
            keepalive_timeout=30,
            ttl_dns_cache=300,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=True,
            cookie_jar=aiohttp.DummyCookieJar(),
            json_serialize=lambda value: jsonutil.dumps(value).decode(),
            skip_auto_headers=("User-Agent",),
        )
        # aiohttp resends a GET once by itself after a dropped connection, which
        # on top of _send's own retry would hit ScaiGrid up to four times.
        # NOTE: a private attribute (seen in aiohttp 3.14); its test_utils sets it.
        if hasattr(session, "_retry_connection"):
            session._retry_connection = False
        return session

    async def request(
        self,
        method: str,
        url: URL,
        *,
        credential: Credential,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout_s: float,
        route: str,
        coalesce: bool = True,
        tenant_id: str | None = None,
    ) -> UpstreamResponse:
        """Send one request, coalescing identical GETs of one tenant already in
        flight unless ``coalesce`` is false."""
        if method != "GET" or not coalesce or not self.config.coalesce_gets:
            return await self._send(
                method, url, credential, headers, body, timeout_s, route
            )

        # The credential and the tenant are part of the key, so callers never
        # share a call across credentials or tenants.
        key = (str(url), credential.digest, tenant_id)
        shared = self._in_flight.get(key)
        if shared is not None:
            if self.metrics:
                self.metrics.child(self.metrics.coalesced, route).inc()
            return await asyncio.shield(shared)
        shared = asyncio.ensure_future(
            self._send(method, url, credential, headers, body, timeout_s, route)
        )
        self._in_flight[key] = shared
        shared.add_done_callback(lambda _: self._in_flight.pop(key, None))
        # Retrieve the exception even if every waiter was cancelled.
        shared.add_done_callback(lambda task: task.cancelled() or task.exception())
        return await asyncio.shield(shared)

    async def _send(
        self,
        method: str,
        url: URL,
        credential: Credential,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout_s: float,
        route: str,
    ) -> UpstreamResponse:
        attempts = 2 if method == "GET" else 1
        started = time.perf_counter()
        # The retry shares the route's timeout, so both attempts end by the deadline.
        deadline = started + timeout_s
        for attempt in range(1, attempts + 1):
            timeout = aiohttp.ClientTimeout(
                total=max(deadline - time.perf_counter(), 0.001),
                sock_connect=self.config.connect_timeout_s,
            )
            try:
                response = await self._exchange(method, url, headers, body, timeout)
            except asyncio.TimeoutError:
                self._count_error(route, "timeout")
                log.warning(
                    "upstream_timeout",
                    route=route,
                    url=str(url.with_query(None)),
                    timeout_s=timeout_s,
                    attempt=attempt,
                )
                raise ProxyError(
                    504,
                    UPSTREAM_TIMEOUT,
                    f"ScaiGrid did not answer within {timeout_s:g} s.",
                    fix="Try again; long-running work may need a longer route "
                    "timeout. The time includes waiting for a free connection, so "
                    "many calls at once may need a higher upstream.max_connections.",
                ) from None
            except _TooLarge:
                self._count_error(route, "too_large")
                log.warning(
                    "upstream_response_too_large",
                    route=route,
                    url=str(url.with_query(None)),
                    max_response_bytes=self.config.max_response_bytes,
                )
                raise bad_gateway(
                    "ScaiGrid's response is larger than upstream.max_response_bytes "
                    f"({self.config.max_response_bytes} bytes)."
                ) from None
            except _RETRYABLE as exc:
                if attempt < attempts:
                    log.info("upstream_retry", route=route, error=type(exc).__name__)
                    continue
                raise self._failed(
                    route, url, exc, "connection", "The connection to ScaiGrid failed."
                ) from None
            except aiohttp.ClientResponseError as exc:
                # aiohttp's parser rejected the response: a bad status line or
                # header, conflicting lengths, an encoding it cannot decode.
                raise self._failed(
                    route,
                    url,
                    exc,
                    "bad_response",
                    "ScaiGrid's response is not valid HTTP, or uses a "
                    "Content-Encoding other than gzip or deflate.",
                ) from None
            except aiohttp.ClientError as exc:
                raise self._failed(
                    route, url, exc, "connection", "ScaiGrid could not be reached."
                ) from None
            break

        status, response_headers, payload = response
        duration_ms = (time.perf_counter() - started) * 1000
        if self.metrics:
            self.metrics.child(self.metrics.upstream_duration, route).observe(
                duration_ms / 1000
            )
            self.metrics.child(self.metrics.upstream_requests, route, str(status)).inc()
        upstream_request_id = _shown(response_headers.get("X-Request-ID"), credential)
        if 200 <= status < 300:
            return UpstreamResponse(
                status, response_headers, payload, duration_ms, upstream_request_id
            )
        raise self._error(status, response_headers, payload, credential, route)

    async def _exchange(
        self,
        method: str,
        url: URL,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout: aiohttp.ClientTimeout,
    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
        limit = self.config.max_response_bytes
        async with self.session.request(
            method,
            url,
            headers=headers,
            data=body,
            timeout=timeout,
            allow_redirects=False,
        ) as response:
            declared = response.content_length
            if declared is not None and declared > limit:
                raise _TooLarge()
            if declared is not None and not response.headers.get("Content-Encoding"):
                # The declared length is the body's length, and within the limit.
                return response.status, response.headers, await response.read()
            # content.read(n) returns what is buffered, not the whole body.
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise _TooLarge()
                chunks.append(chunk)
            return response.status, response.headers, b"".join(chunks)

    def _failed(
        self, route: str, url: URL, exc: Exception, kind: str, message: str
    ) -> ProxyError:
        """Count and log a failed exchange; return the 502 to raise.

        ``kind`` ``bad_response`` logs ``upstream_bad_response``, any other
        ``upstream_failed``.
        """
        self._count_error(route, kind)
        log.warning(
            "upstream_bad_response" if kind == "bad_response" else "upstream_failed",
            route=route,
            url=str(url.with_query(None)),
            error=f"{type(exc).__name__}: {str(exc)[:300]}",
        )
        return bad_gateway(message)

    def _count_error(self, route: str, kind: str) -> None:
        if self.metrics:
            self.metrics.upstream_errors.labels(route, kind).inc()

    def _error(
        self,
        status: int,
        headers: CIMultiDictProxy[str],
        payload: bytes,
        credential: Credential,
        route: str,
    ) -> ProxyError:
        code, message, upstream_request_id, retry_after = _scaigrid_error(payload)
        # SECURITY: ScaiGrid may echo the credential it was sent, and the caller
        # must never see a tenant key: every string shown passes through _shown.
        code = _shown(code, credential)
        message = _shown(message, credential, 500)
        upstream_request_id = _shown(
            upstream_request_id or headers.get("X-Request-ID"), credential
        )
        log.warning(
            "upstream_error_status",
            route=route,
            upstream_status=status,
            upstream_code=code,
            upstream_request_id=upstream_request_id,
            credential_source=credential.source,
        )

        if status == 429:
            self._count_error(route, "rate_limited")
            passed = {
                name: value
                for name, value in headers.items()
                if name.lower().startswith(_RATE_LIMIT_PREFIX)
                and _header_safe(value)
                and _shown(value, credential, 256) == value
            }
            retry = _retry_after(headers.get("Retry-After"), retry_after)
            if retry is not None:
                passed["Retry-After"] = retry
            return ProxyError(
                429,
                RATE_LIMITED,
                message or "ScaiGrid rate-limited this tenant.",
                fix=(
                    "Wait for the time in Retry-After, then try again."
                    if retry is not None
                    else "Wait a few seconds, then try again; ScaiGrid sent no "
                    "retry time."
                ),
                upstream_code=code,
                upstream_request_id=upstream_request_id,
                headers=passed,
            )

        if status in (401, 403) and not credential.is_user_token:
            self._count_error(route, "auth_failed")
            return ProxyError(
                502,
                UPSTREAM_AUTH_FAILED,
                f"ScaiGrid rejected the {CREDENTIAL_NAMES[credential.source]} "
                f"({credential.masked}) with HTTP {status}.",
                fix=(
                    "The key is wrong or revoked: a tenant admin stores a new one "
                    f"with {credentials_route(self.base_path)}."
                    if credential.source == "tenant_key"
                    else "The development key is wrong or revoked: set a valid "
                    "key in its environment variable and restart."
                ),
                upstream_status=status,
                upstream_request_id=upstream_request_id,
            )

        if status in PASSED_STATUSES:
            self._count_error(route, "client_error")
            return ProxyError(
                status,
                UPSTREAM_ERROR,
                message or f"ScaiGrid answered HTTP {status}.",
                upstream_code=code,
                upstream_request_id=upstream_request_id,
            )

        self._count_error(route, "server_error")
        error = bad_gateway(
            f"ScaiGrid answered HTTP {status}.",
            upstream_status=status,
            upstream_request_id=upstream_request_id,
        )
        retry = _retry_after(headers.get("Retry-After"), None)
        if status == 503 and retry is not None:
            error.headers["Retry-After"] = retry
        return error


class _TooLarge(aiohttp.ClientError):
    pass


def _header_safe(value: str) -> bool:
    return len(value) <= 256 and all(32 <= ord(ch) < 127 for ch in value)


#: The largest Retry-After passed on, in seconds: one day.
MAX_RETRY_AFTER_S = 86_400


def _retry_after(header: str | None, seconds: Any) -> str | None:
    """Return a valid ``Retry-After`` from ScaiGrid's header or its body's
    ``retry_after`` seconds, or ``None`` when neither is one.

    The header may be whole seconds or an HTTP date; seconds from the body must
    be a finite number of at least zero and are rounded up. Both are capped at
    one day, so a value such as ``1e999`` or ``-5`` never reaches the caller.
    """
    if header is not None:
        header = header.strip()
        if header.isascii() and header.isdigit():
            return str(min(int(header), MAX_RETRY_AFTER_S))
        if _header_safe(header):
            try:
                email.utils.parsedate_to_datetime(header)
            except (TypeError, ValueError, IndexError):
                pass
            else:
                return header
    if (
        isinstance(seconds, int | float)
        and not isinstance(seconds, bool)
        and math.isfinite(seconds)
        and seconds >= 0
    ):
        return str(min(math.ceil(seconds), MAX_RETRY_AFTER_S))
    return None


def _scaigrid_error(payload: bytes) -> tuple[str | None, str | None, str | None, Any]:
    """Read ScaiGrid's error envelope; anything else yields empty fields."""
    try:
        document = jsonutil.loads(payload[:65536]) if payload else None
    except jsonutil.JSONSyntaxError:
        return None, None, None, None
    if not isinstance(document, dict):
        return None, None, None, None
    error = document.get("error")
    meta = document.get("meta")
    code = message = request_id = retry_after = None
    if isinstance(error, dict):
        code = _text(error.get("code"))
        message = _text(error.get("message"))
        retry_after = error.get("retry_after")
    if isinstance(meta, dict):
        request_id = _text(meta.get("request_id"))
    return code, message, request_id, retry_after


def _text(value: Any) -> str | None:
    # Long enough for what is shown (500 characters at most) and for a secret
    # that straddles that limit, so _shown still finds all of it.
    return value[:4096] if isinstance(value, str) else None


def _shown(value: Any, credential: Credential, limit: int = 128) -> str | None:
    """Return a string from ScaiGrid made safe to show the caller and to log.

    The credential's own secret becomes its masked form, anything else shaped
    like a token or a key is redacted, and text that is not valid Unicode
    (lone surrogates, from bytes that are not UTF-8) gets U+FFFD. The limit
    applies last, so that a cut never hides part of a secret from the checks.
    """
    if not isinstance(value, str):
        return None
    value = value[:4096]
    secret = credential.secret
    if secret and secret in value:
        value = value.replace(secret, credential.masked)
    value = redact_text(value)
    if not value.isascii():
        value = value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return value[:limit]


def upstream_url(
    base_url: str, path: str, params: Mapping[str, Any] | None = None
) -> URL:
    """Build the URL of an upstream call; ``None`` values are left out of the query."""
    query = ()
    if params:
        query = tuple(
            (key, _query_value(value))
            for key, value in params.items()
            if value is not None
        )
    return _url(base_url, path, query)


@functools.lru_cache(maxsize=1024)
def _url(base_url: str, path: str, query: tuple[tuple[str, str], ...]) -> URL:
    # Polls build the same few URLs over and over, and yarl's encoding of each
    # costs more than the rest of the upstream call's set-up.
    url = URL(base_url + path, encoded=False)
    return url.with_query(query) if query else url


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class UpstreamCaller:
    """The upstream calls of one request, bound to its principal and route."""

    def __init__(
        self,
        client: UpstreamClient,
        resolve_credential: Any,
        request_id: str,
        timeout_s: float,
        route: str,
        traceparent: str | None,
        credential: Credential | None = None,
        coalesce: bool = True,
        tenant_id: str | None = None,
    ) -> None:
        self._client = client
        #: The caller's tenant; identical GETs of two tenants are never shared.
        self._tenant_id = tenant_id
        #: Whether identical GETs in flight may share this caller's calls. A
        #: shared run's caller is already shared, and per tenant.
        self._coalesce = coalesce
        self._resolve = resolve_credential
        self._request_id = request_id
        self._timeout_s = timeout_s
        self._route = route
        self._traceparent = traceparent
        #: The credential of the request's calls, once chosen.
        self.credential = credential
        self.last: UpstreamResponse | None = None
        self.last_status: int | None = None
        #: ScaiGrid's request id of the last call, failed calls included.
        self.last_request_id: str | None = None

    async def credential_for_call(self) -> Credential:
        """Choose this request's upstream credential, once, without calling ScaiGrid.

        Raises the 412 or 502 :class:`ProxyError` of the credential resolver.
        """
        if self.credential is None:
            self.credential = await self._resolve()
        return self.credential

    async def get(
        self, path: str, params: Mapping[str, Any] | None = None
    ) -> UpstreamResponse:
        return await self.request("GET", path, params=params)

    async def post(self, path: str, json: Any = None) -> UpstreamResponse:
        return await self.request("POST", path, body=jsonutil.dumps(json))

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: bytes | None = None,
    ) -> UpstreamResponse:
        """Send a request to ScaiGrid at ``path`` (relative to the tenant's base URL).

        ``path`` must be built from validated parts; ``params`` are encoded here,
        so values such as ``a+b/c==`` reach ScaiGrid unchanged.
        """
        # SECURITY: without a leading "/" the path would extend the base URL's
        # host, and "?" or "#" would smuggle a query past ``params``.
        if not path.startswith("/") or "?" in path or "#" in path:
            raise ValueError(f"invalid upstream path {path[:200]!r}")
        credential = await self.credential_for_call()
        url = upstream_url(credential.base_url, path, params)
        headers = {
            "Authorization": credential.authorization,
            "X-Request-ID": self._request_id,
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self._traceparent:
            headers["traceparent"] = self._traceparent
        try:
            response = await self._client.request(
                method,
                url,
                credential=credential,
                headers=headers,
                body=body,
                timeout_s=self._timeout_s,
                route=self._route,
                coalesce=self._coalesce,
                tenant_id=self._tenant_id,
            )
        except ProxyError as exc:
            self.last_status = exc.extra.get("upstream_status") or (
                exc.status if exc.status < 500 else None
            )
            self.last_request_id = exc.extra.get("upstream_request_id")
            raise
        self.last = response
        self.last_status = response.status
        self.last_request_id = response.request_id
        return response
