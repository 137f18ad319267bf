"""Opaque page cursors.

A cursor is standard base64 (not the URL-safe alphabet) of a fixed prefix, a
one-letter list kind, a position and a check byte. The prefix encodes to ``++//``
and the 13 bytes end in ``==`` padding, so every cursor contains ``+``, ``/`` and
``=``. A client that puts a cursor into a query string without percent-encoding it
turns ``+`` into a space and gets a 400 back.
"""

from __future__ import annotations

import base64
import binascii

EVENTS = "e"
CHECKPOINTS = "c"
SCOPES = "s"
MODELS = "m"

_PREFIX = b"\xfb\xef\xff"
_RAW_LENGTH = len(_PREFIX) + 1 + 8 + 1


class InvalidCursor(ValueError):
    """The cursor was not issued by this simulator for this list."""


def encode_cursor(kind: str, position: int) -> str:
    """Encode ``position`` (0 to 2**64 - 1) in a cursor for the list ``kind``."""
    raw = _PREFIX + kind.encode("ascii") + position.to_bytes(8, "big")
    return base64.b64encode(raw + bytes([_check_byte(raw)])).decode("ascii")


def decode_cursor(kind: str, cursor: str) -> int:
    """Return the position in ``cursor``; raise InvalidCursor if it is not ours."""
    try:
        raw = base64.b64decode(cursor.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise InvalidCursor("the cursor is not valid base64") from None
    if len(raw) != _RAW_LENGTH or not raw.startswith(_PREFIX):
        raise InvalidCursor("the cursor was not issued by this service")
    body, check = raw[:-1], raw[-1]
    if check != _check_byte(body):
        raise InvalidCursor("the cursor is damaged")
    if body[len(_PREFIX) : len(_PREFIX) + 1] != kind.encode("ascii"):
        raise InvalidCursor("the cursor belongs to a different list")
    return int.from_bytes(body[len(_PREFIX) + 1 :], "big")


def _check_byte(data: bytes) -> int:
    return (sum(data) * 31 + len(data)) & 0xFF
