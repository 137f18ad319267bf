"""A small in-process cache of encoded responses, per route, URL and credential.

Plugins use it for lists that many callers of one tenant request again within
seconds: the lookups plugin for its catalogues, the ScaiCore plugin for event
and checkpoint pages when an operator enables it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scaiproxy.credentials import Credential
    from scaiproxy.routes import Call, RawJSON

CacheKey = tuple[str, str, str, bytes]


class ResponseCache:
    """Encoded bodies by route, upstream URL, tenant and credential hash, kept
    ``ttl_s``.

    At most ``max_entries`` bodies are kept; storing one more drops the entry
    stored longest ago. ``ttl_s == 0`` disables the cache.
    """

    def __init__(
        self,
        ttl_s: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[CacheKey, tuple[float, bytes]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    @staticmethod
    def key(route: str, url: str, tenant_id: str, credential: Credential) -> CacheKey:
        # SECURITY: the credential is part of the key as its SHA-256, so the
        # cache contains no token or key in the clear. The tenant is part of it
        # too: tenants on the one development key never share a body.
        return (route, url, tenant_id, credential.digest)

    def get(self, key: CacheKey) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if self._clock() >= expires:
            del self._entries[key]
            return None
        return value

    def put(self, key: CacheKey, value: bytes) -> None:
        if not self.enabled:
            return
        self._entries.pop(key, None)
        self._entries[key] = (self._clock() + self.ttl_s, value)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


async def through_cache(
    call: Call,
    cache: ResponseCache | None,
    path: str,
    params: Mapping[str, Any] | None,
    build: Callable[[], Awaitable[RawJSON]],
) -> RawJSON:
    """Return what ``build()`` makes, or the body cached for the same request.

    The key is the route, the upstream URL of ``path`` with ``params``, the
    caller's tenant and a hash of the call's credential, so no caller is ever
    served a body that was fetched for another tenant or with another user's
    credential. ``cache`` set to
    ``None`` or disabled calls ``build()`` every time.
    """
    if cache is None or not cache.enabled:
        return await build()

    from scaiproxy.app import METRICS
    from scaiproxy.routes import RawJSON
    from scaiproxy.upstream import upstream_url

    credential = await call.upstream.credential_for_call()
    url = str(upstream_url(credential.base_url, path, params))
    key = cache.key(call.route.name, url, call.principal.tenant_id, credential)
    encoded = cache.get(key)
    if encoded is not None:
        metrics = call.request.app[METRICS]
        metrics.child(metrics.cache_hits, call.route.name).inc()
        return RawJSON(encoded)
    result = await build()
    cache.put(key, result.encoded)
    return result
