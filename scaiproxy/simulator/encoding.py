"""JSON encoding that keeps integers beyond 64 bits exact."""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(value: Any) -> bytes:
    """Encode ``value`` as compact UTF-8 JSON.

    orjson is fast but rejects integers beyond 64 bits, so those values fall back
    to the standard library, which writes them digit for digit.
    """
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads(body: bytes) -> Any:
    """Decode a request body with the standard library, which keeps big integers.

    orjson would turn integers beyond 64 bits into floats, and the input of an
    invocation is echoed in its events. NaN and Infinity raise ValueError, like
    any other text that is not JSON.
    """
    return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
