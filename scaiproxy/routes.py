"""Route specs that plugins return, and the call object their handlers receive."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import BaseModel

if TYPE_CHECKING:
    from scaiproxy.auth import Principal
    from scaiproxy.upstream import UpstreamCaller

METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})

#: The characters a path parameter may contain. ``.`` and ``..`` are rejected separately.
PATH_PARAM_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_placeholder = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

Handler = Callable[["Call"], Awaitable[Any]]


_ENVELOPE_START = b'{"data":'


class RawJSON:
    """A value that is already encoded as JSON and is sent as it is.

    A handler returns ``RawJSON(b'[...]')`` to place pre-encoded bytes in the
    ``data`` member of the envelope without decoding and encoding them again.
    """

    __slots__ = ("_encoded", "_enveloped")

    def __init__(self, encoded: bytes) -> None:
        self._encoded: bytes | None = encoded
        self._enveloped: bytes | None = None

    @classmethod
    def of_envelope(cls, enveloped: bytes) -> RawJSON:
        """Wrap a body that is ``{"data":<value>}`` already, byte for byte.

        The body itself becomes the response body, without a copy. The value's
        own bytes are cut from it only when :attr:`encoded` is read.
        """
        if not (enveloped.startswith(_ENVELOPE_START) and enveloped.endswith(b"}")):
            raise ValueError('expected a body of the form {"data":...}')
        value = cls.__new__(cls)
        value._encoded = None
        value._enveloped = enveloped
        return value

    @property
    def encoded(self) -> bytes:
        """The value's JSON text.

        A value wrapped with :meth:`of_envelope` cuts it from the envelope on
        every read and keeps no copy, so that it stays the size of one page.
        """
        if self._encoded is None:
            assert self._enveloped is not None
            return self._enveloped[len(_ENVELOPE_START) : -1]
        return self._encoded

    def enveloped(self) -> bytes:
        """Return ``{"data": <encoded>}``, built once per value.

        Callers that share one value, such as coalesced requests, share one
        response body instead of each copying the page.
        """
        if self._enveloped is None:
            self._enveloped = _ENVELOPE_START + self.encoded + b"}"
        return self._enveloped

    def __repr__(self) -> str:
        return f"RawJSON({len(self.encoded)} bytes)"


class NoContent:
    """Returned by a handler to respond 204 with an empty body."""


NO_CONTENT = NoContent()


@dataclass(frozen=True)
class RouteSpec:
    """One route a plugin serves, as returned by ``scaiproxy_routes``.

    ``path`` is relative to ``server.base_path``; ``{name}`` segments are path
    parameters, each checked against :data:`PATH_PARAM_PATTERN` before the
    handler runs. ``permission`` is the permission a caller needs (``None``: any
    authenticated caller); ``roles``, when set, lists roles of which the caller
    needs one. ``timeout_s`` overrides ``upstream.timeout_s`` for the route's
    upstream calls. ``query`` and ``body`` are pydantic models that validate the
    query string and the JSON body. They also describe the route in the OpenAPI
    document, with ``response`` as the JSON schema of the ``data`` member.

    ``coalesce`` marks an authenticated GET route whose result depends only on
    its path parameters, its query string, the caller's tenant and the upstream
    credential, never on who the caller is. Identical requests in flight then
    share one run of the handler (while ``upstream.coalesce_gets`` is on). Its
    handler must return data, not a response, and it takes no request body.
    """

    method: str
    path: str
    handler: Handler
    name: str
    permission: str | None = None
    roles: tuple[str, ...] = ()
    timeout_s: float | None = None
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    response: Mapping[str, Any] | None = None
    status: int = 200
    summary: str = ""
    description: str = ""
    tags: tuple[str, ...] = ()
    authenticated: bool = True
    coalesce: bool = False
    plugin: str = ""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"route {self.name!r}: unsupported method {self.method!r}")
        if not self.path.startswith("/"):
            raise ValueError(f"route {self.name!r}: path must start with '/'")
        # Only plain {name} parameters are validated before the handler runs, so
        # aiohttp's {name:regex} form is rejected here.
        rest = _placeholder.sub("", self.path)
        if "{" in rest or "}" in rest:
            raise ValueError(
                f"route {self.name!r}: path {self.path!r} may contain only "
                "{name} parameters of letters, digits and _"
            )
        names = self.path_params
        if len(set(names)) != len(names):
            raise ValueError(
                f"route {self.name!r}: path {self.path!r} repeats a parameter name"
            )
        if not self.name:
            raise ValueError(f"route {self.path!r}: a name is required")
        if self.coalesce and (self.method != "GET" or not self.authenticated):
            raise ValueError(
                f"route {self.name!r}: only authenticated GET routes can coalesce"
            )
        if self.coalesce and self.body is not None:
            # Waiting requests get the result of a run that read another body.
            raise ValueError(
                f"route {self.name!r}: a coalesced route cannot take a request "
                "body; remove body or coalesce"
            )

    @property
    def path_params(self) -> tuple[str, ...]:
        return tuple(_placeholder.findall(self.path))

    @property
    def shape(self) -> str:
        """The path with parameter names erased, to find colliding routes."""
        return _placeholder.sub("{}", self.path)


@dataclass
class Call:
    """Everything a route handler needs for one request."""

    request: web.Request
    route: RouteSpec
    principal: Principal
    params: dict[str, str]
    query: Any
    body: Any
    config: Any
    upstream: UpstreamCaller
    log: Any
    extra: dict[str, Any] = field(default_factory=dict)


def check_path_param(name: str, value: str) -> str | None:
    """Return an error message when a path parameter value is not allowed."""
    if value in (".", "..") or not PATH_PARAM_PATTERN.fullmatch(value):
        return (
            f"invalid {name} {value[:140]!r}: expected 1 to 128 characters from "
            "A-Z a-z 0-9 _ . : - (not '.' or '..')"
        )
    return None
