"""The error type that every simulated service raises, and ScaiGrid's error codes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# ScaiGrid error codes sent as ``error.code``.
UNAUTHORIZED = "unauthorized"
NOT_FOUND = "not_found"
METHOD_NOT_ALLOWED = "method_not_allowed"
CORE_NOT_FOUND = "core_not_found"
SCOPE_NOT_FOUND = "scope_not_found"
CHECKPOINT_NOT_FOUND = "checkpoint_not_found"
CHECKPOINT_ALREADY_RESOLVED = "checkpoint_already_resolved"
CHECKPOINT_NOT_PENDING = "checkpoint_not_pending"
INVALID_JSON = "invalid_json"
INVALID_CURSOR = "invalid_cursor"
VALIDATION_ERROR = "validation_error"
PAYLOAD_TOO_LARGE = "payload_too_large"
RATE_LIMITED = "rate_limited"
INTERNAL_ERROR = "internal_error"


class SimError(Exception):
    """An error response: status, machine-readable code and a sentence for people.

    Each service renders it in its own body shape. ``details`` is a list of
    ``{"field", "message"}`` entries for validation errors.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: list[dict[str, str]] | None = None,
        retry_after: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.retry_after = retry_after
        self.headers = dict(headers or {})

    def __repr__(self) -> str:
        return f"SimError({self.status}, {self.code!r}, {self.message!r})"


def invalid_field(field: str, message: str) -> SimError:
    """Build the 422 for one invalid query or body value."""
    return SimError(
        422,
        VALIDATION_ERROR,
        f"Invalid value for {field}: {message}",
        details=[{"field": field, "message": message}],
    )


def scaigrid_error_body(error: SimError, request_id: str) -> dict[str, Any]:
    """Build ScaiGrid's error envelope for ``error``."""
    detail: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.retry_after is not None:
        detail["retry_after"] = error.retry_after
    if error.details is not None:
        detail["details"] = error.details
    return {"status": "error", "error": detail, "meta": {"request_id": request_id}}
