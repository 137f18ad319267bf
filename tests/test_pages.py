"""The fast shape check of list pages against the exact walk.

``_exact_page`` accepts only pages of exactly the gateway's shape and returns
their ``data`` text unchanged. For anything else it returns ``None``, so that
the exact walk decides. Whatever it accepts must be valid JSON.
"""

from __future__ import annotations

import json

import pytest

from scaiproxy.pages import CheckedPages, _exact_page
from scaiproxy.routes import RawJSON

DEEP = b"[" * 3000 + b"]" * 3000


def page(events: bytes, cursor: bytes = b"null", extra: bytes = b"") -> bytes:
    return b'{"data":{"events":[' + events + b'],"next_cursor":' + cursor + extra + b"}}"


ACCEPTED = {
    "plain": page(b'{"a":1}'),
    "empty list": page(b""),
    "string cursor": page(b"", b'"c2VxOjE="'),
    "integer beyond 64 bits": page(b'{"n":123456789012345678901234567890}'),
    "number beyond double": page(b'{"n":1e400}'),
    "nested payload": page(b'{"p":{"q":[1,{"r":null}],"s":"\\u00e9\\n"}}'),
    "byte order mark": b"\xef\xbb\xbf" + page(b'{"a":1}'),
    "whitespace": b' \n{ "data" : {"events": [ {"a": 1} ], "next_cursor": null} }\n',
}

REJECTED = {
    "invalid escape": page(b'{"a":"\\x"}'),
    "leading zero": page(b'{"a":01}'),
    "bare minus": page(b'{"a":-}'),
    "exponent without digits": page(b'{"a":1e}'),
    "raw control character": page(b'{"a":"x\x01y"}'),
    "NaN literal": page(b'{"a":NaN}'),
    "trailing comma": page(b'{"a":1,}'),
    "truncated literal": page(b'{"a":tru}'),
    "short unicode escape": page(b'{"a":"\\u12"}'),
    "invalid UTF-8": page(b'{"a":"\xff"}'),
    "nested 3000 deep": page(b'{"a":' + DEEP + b"}"),
    "entry not an object": page(b"1"),
    "cursor a number": page(b"", b"5"),
    "extra member": page(b"", extra=b',"x":1'),
    "no cursor": b'{"data":{"events":[]}}',
    "envelope status": b'{"status":"ok","data":{"events":[],"next_cursor":null}}',
    "trailing text": page(b"") + b"x",
}


@pytest.mark.parametrize("body", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_accepted_page_passes_unchanged(body):
    data = _exact_page(body, "events")
    assert data is not None
    assert data in body
    # The result is valid JSON with the page's shape.
    decoded = json.loads(data)
    assert set(decoded) == {"events", "next_cursor"}


@pytest.mark.parametrize("body", REJECTED.values(), ids=REJECTED.keys())
def test_other_page_left_to_walk(body):
    assert _exact_page(body, "events") is None


def test_list_key_from_caller():
    body = b'{"data":{"checkpoints":[{"id":"c1"}],"next_cursor":null}}'
    assert _exact_page(body, "checkpoints") == body[8:-1]
    assert _exact_page(body, "events") is None


# Pages checked lately


def test_checked_page_reused_when_equal():
    pages = CheckedPages(1024)
    body = page(b'{"a":1}')
    value = RawJSON(b"x")
    pages.put("events", body, value)
    assert pages.get("events", bytes(body)) is value
    assert pages.get("checkpoints", body) is None


def test_checked_page_not_reused_when_bytes_differ():
    pages = CheckedPages(1024)
    pages.put("events", page(b'{"a":1}'), RawJSON(b"x"))
    assert pages.get("events", page(b'{"a":2}')) is None


def test_checked_pages_stay_under_budget():
    first, second = page(b'{"a":1}'), page(b'{"a":22}')
    pages = CheckedPages(3 * len(first) + 3 * len(second) - 1)
    pages.put("events", first, RawJSON(b"1"))
    pages.put("events", second, RawJSON(b"2"))
    assert pages.get("events", first) is None
    assert pages.get("events", second) is not None
    assert len(pages) == 1


def test_checked_page_over_budget_not_kept():
    pages = CheckedPages(10)
    pages.put("events", page(b""), RawJSON(b"x"))
    assert len(pages) == 0


def test_compact_page_is_its_own_envelope():
    body = b'{"data":{"events":[{"a":1}],"next_cursor":null}}'
    value = RawJSON.of_envelope(body)
    assert value.enveloped() is body
    assert value.encoded == b'{"events":[{"a":1}],"next_cursor":null}'


def test_of_envelope_rejects_other_bodies():
    with pytest.raises(ValueError, match="of the form"):
        RawJSON.of_envelope(b' {"data":[]}')


def test_own_envelope_counted_once():
    body = page(b'{"a":1}')
    pages = CheckedPages(1024)
    pages.put("events", body, RawJSON.of_envelope(body))
    assert pages.size == len(body)


def test_value_of_envelope_keeps_no_second_copy():
    """A page cache reads the value's bytes; the kept page must not grow."""
    body = page(b'{"a":1}')
    value = RawJSON.of_envelope(body)
    assert value.encoded == body[len(b'{"data":') : -1]
    assert value.encoded is not value.encoded
