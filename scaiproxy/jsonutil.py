"""JSON encoding and decoding that keep upstream values exact.

orjson is used for encoding, but it turns integers beyond 64 bits into floats when
decoding and cannot encode them at all. Upstream bodies are therefore decoded with
the standard library (exact integers, key order kept), and encoding falls back to it
when orjson rejects a value. :func:`object_spans` finds the raw text of selected
members, so that event pages can be forwarded without re-encoding a single event.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

import orjson

#: Maximum nesting depth of arrays and objects in a request body.
MAX_REQUEST_DEPTH = 128


def _reject_constant(name: str) -> Any:
    raise JSONSyntaxError(f"{name} is not allowed in JSON")


def _double(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise JSONRangeError(text[:40])
    return value


# NaN and Infinity are not JSON, and clients that parse strictly would fail on them.
_decoder = json.JSONDecoder(parse_constant=_reject_constant)
# Values that are encoded again need numbers that a double holds: a float
# such as 1e400 would otherwise turn into the infinity that JSON cannot express.
_double_decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_double)
_TOO_DEEP = "arrays and objects are nested too deeply"
# Python converts at most 4,300 digits to an int (sys.get_int_max_str_digits)
# because longer ones cost quadratic time. Beyond that int() raises a bare
# ValueError whose message contains this phrase (CPython 3.11 and later).
_INT_LIMIT_PHRASE = "integer string conversion"
_scan_value = _decoder.scan_once
_scan_string = json.decoder.scanstring
_whitespace = re.compile(r"[ \t\n\r]*")


class JSONSyntaxError(ValueError):
    """The text is not the JSON that was expected."""


class JSONRangeError(JSONSyntaxError):
    """A number is beyond the range of a double, where the text had to fit one."""

    def __init__(self, number: str) -> None:
        super().__init__(f"the number {number} is beyond the range of a double")
        #: The number's JSON text, cut to 40 characters.
        self.number = number


def dumps(value: Any) -> bytes:
    """Encode ``value`` as compact UTF-8 JSON, exact for integers of any size."""
    try:
        return orjson.dumps(value)
    except TypeError:
        # orjson rejects integers beyond 64 bits, nesting deeper than 254 levels
        # and lone surrogates; the standard library encodes all three.
        # allow_nan=False: a non-finite float raises ValueError instead of
        # becoming the token Infinity, which is not JSON. (orjson writes null.)
        text = json.dumps(
            value, ensure_ascii=False, separators=(",", ":"), allow_nan=False
        )
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate (valid in JSON text, not in UTF-8) stays escaped.
            return json.dumps(value, separators=(",", ":"), allow_nan=False).encode(
                "ascii"
            )


def loads(
    data: bytes | str, max_depth: int | None = None, doubles: bool = False
) -> Any:
    """Decode JSON exactly: big integers stay integers, key order is kept.

    ``max_depth`` rejects documents whose arrays and objects nest deeper than
    that many levels, so that the value can later be encoded again safely.
    ``doubles`` rejects, with :class:`JSONRangeError`, a number with a fraction
    or exponent that a double cannot hold, such as ``1e400``. Such a number is
    valid JSON, but decoded it is infinity, which JSON cannot express.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        data = decode_text(bytes(data))
    try:
        value = (_double_decoder if doubles else _decoder).decode(data)
    except JSONSyntaxError:
        raise
    except (ValueError, RecursionError) as exc:
        raise _syntax_error(exc) from exc
    if max_depth is not None and nesting_depth(value, max_depth) > max_depth:
        raise JSONSyntaxError(f"nested deeper than {max_depth} levels")
    return value


def _syntax_error(exc: ValueError | RecursionError) -> JSONSyntaxError:
    """Describe why the standard library's decoder rejected a document."""
    if isinstance(exc, JSONSyntaxError):
        # Already described: NaN or Infinity, or a fault found by the walk.
        return exc
    if isinstance(exc, RecursionError):
        return JSONSyntaxError(_TOO_DEEP)
    if isinstance(exc, json.JSONDecodeError):
        return JSONSyntaxError(str(exc))
    if _INT_LIMIT_PHRASE in str(exc):
        return JSONSyntaxError(
            f"an integer has more than {sys.get_int_max_str_digits()} digits"
        )
    return JSONSyntaxError(str(exc))


def nesting_depth(value: Any, limit: int) -> int:
    """Measure how deeply arrays and objects nest in ``value``, up to ``limit + 1``.

    The walk uses an explicit stack, so no depth reached by a decoder can
    exhaust Python's recursion limit here.
    """
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def decode_text(data: bytes) -> str:
    """Decode UTF-8, dropping a leading byte order mark."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JSONSyntaxError(f"not valid UTF-8: {exc}") from exc
    if text.startswith("\ufeff"):
        text = text[1:]
    return text


def object_spans(
    text: str, descend: dict[str, Any] | None = None, start: int = 0
) -> dict[str, Any]:
    """Decode a JSON object member by member and record where each value lies.

    Returns ``{key: (value, begin, end)}`` where ``text[begin:end]`` is the raw
    text of the value. A key named in ``descend`` whose value is an object is
    walked the same way, and its entry becomes ``(members, begin, end)`` with
    ``members`` the nested mapping; ``descend[key]`` is the next level's
    ``descend``. Every other value is decoded by the standard library's C
    scanner, once. Raises :class:`JSONSyntaxError` when ``text`` is not an
    object, or has trailing data.
    """
    members, end = _walk_object(text, _skip(text, start), descend or {})
    if _skip(text, end) != len(text) and start == 0:
        raise JSONSyntaxError(f"extra data at offset {end}")
    return members


def _skip(text: str, index: int) -> int:
    return _whitespace.match(text, index).end()


def _walk_object(
    text: str, index: int, descend: dict[str, Any]
) -> tuple[dict[str, Any], int]:
    if text[index : index + 1] != "{":
        raise JSONSyntaxError(f"expected an object at offset {index}")
    members: dict[str, Any] = {}
    index = _skip(text, index + 1)
    if text[index : index + 1] == "}":
        return members, index + 1
    try:
        while True:
            if text[index : index + 1] != '"':
                raise JSONSyntaxError(f"expected a key at offset {index}")
            key, index = _scan_string(text, index + 1)
            index = _skip(text, index)
            if text[index : index + 1] != ":":
                raise JSONSyntaxError(f"expected ':' at offset {index}")
            begin = _skip(text, index + 1)
            if key in descend and text[begin : begin + 1] == "{":
                value, index = _walk_object(text, begin, descend[key] or {})
            else:
                value, index = _scan_value(text, begin)
            members[key] = (value, begin, index)
            index = _skip(text, index)
            separator = text[index : index + 1]
            index = _skip(text, index + 1)
            if separator == "}":
                return members, index
            if separator != ",":
                raise JSONSyntaxError(f"expected ',' or '}}' at offset {index}")
    except StopIteration as exc:
        raise JSONSyntaxError(f"invalid value at offset {exc.value}") from None
    except (ValueError, RecursionError) as exc:
        raise _syntax_error(exc) from None
