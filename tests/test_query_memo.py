"""The per-route memo of validated query strings in dispatch."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request
from pydantic import BaseModel, ConfigDict

from scaiproxy.dispatch import _QueryMemo
from scaiproxy.errors import ProxyError
from scaiproxy.routes import RouteSpec


class FrozenQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    cursor: str | None = None
    limit: int = 50


class MutableQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cursor: str | None = None


async def _handler(call):
    return {}


def spec_for(model: type[BaseModel]) -> RouteSpec:
    return RouteSpec("GET", "/things", _handler, name="things", query=model)


def request(query: str):
    return make_mocked_request("GET", f"/api/v1/things?{query}")


def test_repeated_query_returns_same_model():
    memo = _QueryMemo(spec_for(FrozenQuery))
    first = memo.validate(request("limit=5&cursor=abc"))
    second = memo.validate(request("limit=5&cursor=abc"))
    assert first == FrozenQuery(limit=5, cursor="abc")
    assert second is first


def test_memo_keys_on_raw_query():
    memo = _QueryMemo(spec_for(FrozenQuery))
    encoded = memo.validate(request("cursor=a%26limit%3D9"))
    assert encoded.cursor == "a&limit=9"
    assert encoded.limit == 50
    # The same characters unencoded are two parameters, one of them repeated.
    bare = memo.validate(request("cursor=a&limit=9"))
    assert bare.cursor == "a"
    assert bare.limit == 9


def test_invalid_query_never_memoised():
    memo = _QueryMemo(spec_for(FrozenQuery))
    for _ in range(2):
        with pytest.raises(ProxyError) as caught:
            memo.validate(request("limit=abc"))
        assert caught.value.status == 422
    with pytest.raises(ProxyError):
        memo.validate(request("limit=5&limit=6"))
    assert memo.validate(request("limit=5")).limit == 5


def test_mutable_model_validated_every_time():
    memo = _QueryMemo(spec_for(MutableQuery))
    first = memo.validate(request("cursor=abc"))
    second = memo.validate(request("cursor=abc"))
    assert first == second
    assert second is not first


def test_memo_size_bounded():
    memo = _QueryMemo(spec_for(FrozenQuery))
    oldest = memo.validate(request("limit=1"))
    for limit in range(2, _QueryMemo.MAX_ENTRIES + 2):
        memo.validate(request(f"limit={limit}"))
    assert len(memo._entries) == _QueryMemo.MAX_ENTRIES
    # The oldest entry was dropped, so its query string is validated again.
    assert memo.validate(request("limit=1")) is not oldest
