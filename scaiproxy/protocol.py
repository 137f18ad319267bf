"""The response to requests that aiohttp's HTTP parser rejects.

Such a request (a header line over the limit, a control byte in a header, an
unknown method) never reaches the app or its middleware. aiohttp 3.14 responds
to it itself, in plain text that quotes up to a whole header line back to the
sender, a bearer token included. The gateway swaps in a protocol class whose
response is the usual JSON error envelope with an ``X-Request-ID`` and no
quoted input.
"""

from __future__ import annotations

import uuid
from http import HTTPStatus
from typing import Any

from aiohttp import HttpVersion11, web_protocol, web_server
from aiohttp.http_exceptions import BadHttpMethod
from aiohttp.web import Response

from scaiproxy import jsonutil
from scaiproxy.middleware import SERVER_NAME


class GatewayRequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection protocol, with an enveloped error response that quotes
    nothing and idle connections that keep no response body."""

    async def finish_response(
        self, request: Any, resp: Any, start_time: float | None
    ) -> Any:
        """Send the response, then drop its body and the request's state.

        aiohttp keeps a keep-alive connection's last request and response
        referenced until the next request arrives. A Live Runs panel's
        connection idles between polls, so without this each open panel would
        keep a whole events page in memory.
        """
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            if isinstance(resp, Response):
                resp.body = None
            _clear_state(request)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> Response:
        request_id = uuid.uuid4().hex
        # The id is on the log line too, so the response's X-Request-ID finds it.
        extra = {"request_id": request_id}
        if self._request_count == 1 and isinstance(exc, BadHttpMethod):
            # Non-HTTP traffic on the port (TLS, scanners): not worth an INFO line.
            self.logger.debug("Error handling request", exc_info=exc, extra=extra)
        else:
            self.log_exception("Error handling request", exc_info=exc, extra=extra)
        if request.writer.output_size > 0:
            raise ConnectionError("the response was already partly sent")

        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
        if status >= 500:
            code, text = "internal_error", "The gateway failed to handle this request."
            fix = "Try again; if it persists, report the X-Request-ID to the operators."
        else:
            code = "bad_request"
            text = (
                f"The request is not valid HTTP ({phrase or status}): its request "
                "line, a header or the framing of its body is malformed, a line is "
                "longer than 16 KiB, there are more than 128 header lines, or its "
                "Content-Encoding is not gzip or deflate."
            )
            fix = "Send a well-formed HTTP/1.1 request."
        detail = {"error": code, "message": text, "fix": fix}
        response = Response(
            status=status,
            body=jsonutil.dumps({"detail": detail}),
            content_type="application/json",
            headers={"X-Request-ID": request_id, "Server": SERVER_NAME},
        )
        response.force_close()
        return response


async def expect_handler(request: Any) -> None:
    """Send ``100 Continue`` for ``Expect: 100-continue``, as aiohttp does, and
    ignore other expectations.

    aiohttp's own handler responds to any other expectation with a plain-text 417
    before the middleware runs: no envelope, no ``X-Request-ID``, no access
    event. RFC 9110 (section 10.1.1) lets a server ignore an expectation it
    does not support, so the request goes on to the middleware instead.
    """
    expect = request.headers.get("Expect", "")
    if request.version == HttpVersion11 and expect.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # The interim response is not part of the response proper.
        request.writer.output_size = 0


def _clear_state(request: Any) -> None:
    """Empty the request's mapping of per-request state.

    ``request.clear()`` goes through ``MutableMapping``'s generic method, one
    ``popitem()`` call per key; the dict behind the mapping empties in one call.
    """
    # NOTE: aiohttp (3.14) keeps the mapping in ``_state``; other versions fall
    # back to the generic method.
    state = getattr(request, "_state", None)
    if type(state) is dict:
        state.clear()
    else:
        request.clear()


def install() -> None:
    """Make aiohttp's servers in this process use :class:`GatewayRequestHandler`.

    aiohttp builds the protocol from the name ``RequestHandler`` in its
    ``web_server`` module and offers no parameter for it, so the name is
    replaced there. Every aiohttp server of the process is affected, which in a
    gateway process is the gateway itself.
    """
    # NOTE: relies on aiohttp internals: run with 3.14, source read for 3.12.
    web_server.RequestHandler = GatewayRequestHandler  # type: ignore[misc]
