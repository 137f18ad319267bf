"""Error types and the error codes of the HTTP contract.

Handlers and middleware raise :class:`ProxyError`; the error middleware turns it
into ``{"detail": {"error": ..., "message": ..., ...}}`` with its status.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Error codes sent as ``detail.error``. Clients match on these strings.
INVALID_JSON = "invalid_json"
MISSING_TOKEN = "missing_token"
INVALID_TOKEN = "invalid_token"
AUTH_UNAVAILABLE = "auth_unavailable"
INSUFFICIENT_SCOPE = "insufficient_scope"
NOT_FOUND = "not_found"
METHOD_NOT_ALLOWED = "method_not_allowed"
MISSING_CREDENTIALS = "missing_credentials"
PAYLOAD_TOO_LARGE = "payload_too_large"
REQUEST_TIMEOUT = "request_timeout"
VALIDATION_ERROR = "validation_error"
RATE_LIMITED = "rate_limited"
UPSTREAM_ERROR = "upstream_error"
UPSTREAM_AUTH_FAILED = "upstream_auth_failed"
BAD_GATEWAY = "bad_gateway"
UPSTREAM_TIMEOUT = "upstream_timeout"
SECRET_STORE_UNAVAILABLE = "secret_store_unavailable"
SERVICE_UNAVAILABLE = "service_unavailable"
INTERNAL_ERROR = "internal_error"


class ProxyError(Exception):
    """An error returned to the client with a status and a structured detail."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        *,
        fix: str | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.fix = fix
        self.headers = dict(headers or {})
        self.extra = extra

    def detail(self) -> dict[str, Any]:
        """Build the ``detail`` object of the error envelope."""
        detail: dict[str, Any] = {"error": self.error, "message": self.message}
        if self.fix:
            detail["fix"] = self.fix
        detail.update(self.extra)
        return detail

    def __repr__(self) -> str:
        return f"ProxyError({self.status}, {self.error!r}, {self.message!r})"


#: Problems listed in one 422; a request with thousands of unknown query
#: parameters would otherwise get a response many times its own size.
MAX_LISTED_ERRORS = 20


def validation_error(errors: list[dict[str, str]]) -> ProxyError:
    """Build the 422 error for a list of ``{"field", "message"}`` entries.

    The first :data:`MAX_LISTED_ERRORS` entries are listed; ``unlisted``
    counts the rest.
    """
    listed = errors[:MAX_LISTED_ERRORS]
    unlisted = len(errors) - len(listed)
    fields = ", ".join(entry["field"] for entry in listed)
    if unlisted:
        fields += f" and {unlisted} more"
    extra: dict[str, Any] = {"errors": listed}
    if unlisted:
        extra["unlisted"] = unlisted
    return ProxyError(
        422,
        VALIDATION_ERROR,
        f"Invalid request: {fields}.",
        fix="Correct the listed fields and send the request again.",
        **extra,
    )


class ConfigError(Exception):
    """A configuration problem found at start-up, naming the key path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message

    def under(self, prefix: str) -> ConfigError:
        """Return the same error with its key placed under ``prefix``."""
        key = f"{prefix}.{self.key}" if self.key else prefix
        return ConfigError(key, self.message)
