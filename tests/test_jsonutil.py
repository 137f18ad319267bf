"""jsonutil: exact decoding, encoding fallbacks, object_spans, and malformed input
that always raises JSONSyntaxError."""

from __future__ import annotations

import json
import random

import pytest
from aiohttp import web
from conftest import base_config, bearer, mint

from scaiproxy import jsonutil
from scaiproxy.jsonutil import JSONSyntaxError, dumps, loads, object_spans

BIG = 123456789012345678901234567890

DOCUMENT = (
    '{"data": {"events": [{"id": "e1", "n": 123456789012345678901234567890, '
    '"name": "caf\\u00e9 \u2603", "nested": {"z": null, "a": [1, 2.50, -0.0]}}, '
    '{"id": "e2", "payload": {"execution_id": "x-1", "ok": true}}], '
    '"next_cursor": "a+b/c=="}, "status": "ok"}'
)


# --- decoding ----------------------------------------------------------------------


def test_big_int_exact():
    assert loads(b'{"n": 123456789012345678901234567890}') == {"n": BIG}


def test_big_negative_int_exact():
    assert loads("-98765432109876543210987654321") == -98765432109876543210987654321


def test_key_order_kept():
    assert list(loads('{"z": 1, "a": 2, "m": 3}')) == ["z", "a", "m"]


def test_unicode_decoded():
    assert loads('"caf\\u00e9 \u2603 \\ud83d\\ude00"'.encode()) == "café ☃ 😀"


def test_bom_dropped():
    assert loads(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}


@pytest.mark.parametrize(
    "text", ["NaN", "Infinity", "-Infinity", '{"a": NaN}', "[1, Infinity]"]
)
def test_nan_rejected(text):
    with pytest.raises(JSONSyntaxError):
        loads(text)


def test_invalid_utf8_rejected():
    with pytest.raises(JSONSyntaxError, match="UTF-8"):
        loads(b'{"a": "\xff"}')


def test_max_depth_rejects_deeper():
    with pytest.raises(JSONSyntaxError, match="deeper than 3"):
        loads("[[[[1]]]]", max_depth=3)


def test_max_depth_allows_equal():
    assert loads('[{"a": [1]}]', max_depth=3) == [{"a": [1]}]


def test_nesting_depth_counts_containers():
    assert jsonutil.nesting_depth({"a": [1, {"b": []}]}, 10) == 4
    assert jsonutil.nesting_depth(5, 10) == 0


def test_nesting_depth_handles_deep_values():
    value: list = []
    for _ in range(100_000):
        value = [value]
    assert jsonutil.nesting_depth(value, 200) == 201


def test_deep_document_is_syntax_error():
    with pytest.raises(JSONSyntaxError):
        loads("[" * 100_000 + "]" * 100_000)


# --- encoding ----------------------------------------------------------------------


def test_dumps_compact():
    assert dumps({"a": [1, "x"], "b": None}) == b'{"a":[1,"x"],"b":null}'


def test_dumps_big_int():
    assert dumps({"n": BIG}) == b'{"n":123456789012345678901234567890}'


def test_dumps_unicode_as_utf8():
    assert dumps({"name": "café ☃"}) == '{"name":"café ☃"}'.encode()


def test_dumps_lone_surrogate_escaped():
    encoded = dumps({"s": "\ud800x"})
    assert encoded == b'{"s":"\\ud800x"}'
    assert loads(encoded) == {"s": "\ud800x"}


def test_dumps_deep_value():
    value: list = [1]
    for _ in range(400):
        value = [value]
    assert loads(dumps(value)) == value


def test_round_trip_exact():
    value = loads(DOCUMENT)
    assert loads(dumps(value)) == value


# --- object_spans --------------------------------------------------------------------


def test_spans_cover_raw_text():
    members = object_spans(DOCUMENT)
    value, begin, end = members["status"]
    assert value == "ok"
    assert DOCUMENT[begin:end] == '"ok"'


def test_spans_descend():
    members = object_spans(DOCUMENT, {"data": {}})
    data, begin, end = members["data"]
    events, events_begin, events_end = data["events"]
    raw = DOCUMENT[events_begin:events_end]
    assert DOCUMENT[begin:end].startswith('{"events": [')
    assert raw.startswith('[{"id": "e1"')
    assert "123456789012345678901234567890" in raw
    assert "caf\\u00e9" in raw
    assert "2.50" in raw
    assert events[0]["n"] == BIG
    assert data["next_cursor"][0] == "a+b/c=="


def test_spans_keep_escapes_and_spacing():
    text = '{ "a" :  {"x":1.0,  "y":"\\u0041"} , "b":[ ] }'
    members = object_spans(text)
    _, begin, end = members["a"]
    assert text[begin:end] == '{"x":1.0,  "y":"\\u0041"}'
    _, begin, end = members["b"]
    assert text[begin:end] == "[ ]"


def test_spans_empty_object():
    assert object_spans("  {}  ") == {}


def test_spans_descend_into_non_object():
    members = object_spans('{"data": [1, 2]}', {"data": {}})
    assert members["data"][0] == [1, 2]


def test_spans_nested_descend():
    text = '{"a": {"b": {"c": 1}}}'
    members = object_spans(text, {"a": {"b": {}}})
    inner, begin, end = members["a"][0]["b"]
    assert inner["c"] == (1, text.index("1"), text.index("1") + 1)
    assert text[begin:end] == '{"c": 1}'


def test_spans_duplicate_key_last_wins():
    members = object_spans('{"a": 1, "a": 2}')
    assert members["a"][0] == 2


def test_spans_reject_nan():
    with pytest.raises(JSONSyntaxError):
        object_spans('{"a": NaN}')


MALFORMED = [
    "",
    " ",
    "[]",
    "null",
    '"text"',
    "{",
    '{"a"',
    '{"a":',
    '{"a": }',
    '{"a": 1,}',
    '{"a": 1 "b": 2}',
    "{a: 1}",
    "{'a': 1}",
    '{"a": 1} x',
    '{"a": 1}}',
    '{"a": tru}',
    '{"a": "unterminated}',
    '{"a": "\x01"}',
    '{"a": 01}',
    '{"a": [1, 2}',
    '{"a": {"b": 1]}',
    '{"a": ' + "[" * 50_000 + "]" * 50_000 + "}",
]


@pytest.mark.parametrize("text", MALFORMED)
def test_spans_malformed(text):
    with pytest.raises(JSONSyntaxError):
        object_spans(text, {"a": {}})


@pytest.mark.parametrize("text", MALFORMED[2:])
def test_loads_malformed_never_other_errors(text):
    try:
        value = loads(text)
    except JSONSyntaxError:
        return
    assert text.strip() in ("[]", "null", '"text"')
    assert value == json.loads(text)


def test_truncations_raise_syntax_error():
    """Every proper prefix of a valid object is rejected, by both decoders."""
    for end in range(len(DOCUMENT)):
        prefix = DOCUMENT[:end]
        with pytest.raises(JSONSyntaxError):
            object_spans(prefix, {"data": {}})
        with pytest.raises(JSONSyntaxError):
            loads(prefix)


def test_random_corruptions_raise_only_syntax_error():
    """Random byte edits either still decode or raise JSONSyntaxError."""
    generator = random.Random(20240501)
    data = DOCUMENT.encode()
    alphabet = b'{}[]:,"\\ 0123456789.eE+-tfnulrsa\xff\x00'
    decoders = (
        lambda raw: loads(raw),
        lambda raw: object_spans(jsonutil.decode_text(raw), {"data": {}}),
    )
    rejected = 0
    for _ in range(3000):
        edited = bytearray(data)
        for _ in range(generator.randint(1, 4)):
            position = generator.randrange(len(edited))
            action = generator.choice(("replace", "delete", "insert"))
            if action == "replace":
                edited[position] = generator.choice(alphabet)
            elif action == "delete":
                del edited[position]
            else:
                edited.insert(position, generator.choice(alphabet))
        for decode in decoders:
            try:
                decode(bytes(edited))
            except JSONSyntaxError:
                rejected += 1
    assert rejected > 3000


# --- messages that name the cause ------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": NaN}', "NaN is not allowed in JSON"),
        ("[1, Infinity]", "Infinity is not allowed in JSON"),
        ("[-Infinity]", "-Infinity is not allowed in JSON"),
        ("1" * 5000, "an integer has more than 4300 digits"),
        (DEEP, "arrays and objects are nested too deeply"),
        ('{"a" 1}', "Expecting ':' delimiter"),
    ],
    ids=["nan", "infinity", "minus-infinity", "digits", "deep", "syntax"],
)
def test_loads_message_names_cause(text, expected):
    with pytest.raises(JSONSyntaxError) as caught:
        loads(text)
    assert str(caught.value).startswith(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": NaN}', "NaN is not allowed in JSON"),
        ('{"a": [Infinity]}', "Infinity is not allowed in JSON"),
        ('{"a": ' + "1" * 5000 + "}", "an integer has more than 4300 digits"),
        ('{"a": ' + DEEP + "}", "arrays and objects are nested too deeply"),
        ('{"a" 1}', "expected ':' at offset 5"),
        ('{"a": 1 "b": 2}', "expected ',' or '}' at offset"),
    ],
    ids=["nan", "infinity", "digits", "deep", "colon", "comma"],
)
def test_spans_message_names_cause(text, expected):
    with pytest.raises(JSONSyntaxError) as caught:
        object_spans(text, {"a": {}})
    assert str(caught.value).startswith(expected)


def test_nan_message_not_digits():
    with pytest.raises(JSONSyntaxError) as caught:
        loads("NaN")
    assert "digits" not in str(caught.value)


def test_deep_keeps_recursion_cause():
    """The request-body decoder detects deep documents by this cause."""
    with pytest.raises(JSONSyntaxError) as caught:
        loads(DEEP)
    assert isinstance(caught.value.__cause__, RecursionError)


async def test_gateway_body_nan_message(make_gateway, upstream, jwks_server, rsa_key):
    client = await make_gateway(base_config(upstream.base_url, jwks_server.url))
    token = mint(rsa_key, permissions=["scaicore:manage"])

    response = await client.post(
        "/api/v1/scaicore/checkpoints/cp_1/resolve",
        data=b'{"resolution": NaN}',
        headers={**bearer(token), "Content-Type": "application/json"},
    )
    detail = (await response.json())["detail"]

    assert response.status == 400
    assert detail["error"] == "invalid_json"
    assert "NaN is not allowed in JSON" in detail["message"]
    assert "digits" not in detail["message"]
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"data": {"events": [{"n": NaN}], "next_cursor": null}}', "NaN"),
        (
            b'{"data": {"events": [' + DEEP.encode() + b'], "next_cursor": null}}',
            "nested too deeply",
        ),
    ],
    ids=["nan", "deep"],
)
async def test_gateway_page_message_names_cause(
    make_gateway, upstream, jwks_server, rsa_key, body, expected
):
    async def page(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    upstream.route("GET", "/v1/modules/scaicore/events", page)
    client = await make_gateway(base_config(upstream.base_url, jwks_server.url))
    token = mint(rsa_key, permissions=["scaicore:view"])

    response = await client.get("/api/v1/scaicore/events", headers=bearer(token))
    detail = (await response.json())["detail"]

    assert response.status == 502
    assert detail["error"] == "bad_gateway"
    assert expected in detail["message"]
    assert "digits" not in detail["message"]


def test_doubles_reject_out_of_range_number():
    with pytest.raises(jsonutil.JSONRangeError, match="1e400 is beyond the range"):
        jsonutil.loads(b'{"f": [1, 1e400]}', doubles=True)


def test_out_of_range_number_kept_without_doubles():
    # Request bodies are forwarded as their raw text, whatever their numbers.
    assert jsonutil.loads(b"[1e400]") == [float("inf")]


def test_dumps_never_writes_infinity():
    # A big integer sends the value to the standard library's encoder.
    with pytest.raises(ValueError):
        jsonutil.dumps([2**70, float("inf")])
