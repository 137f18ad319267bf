"""A small in-process cache of encoded responses, per route, URL and credential.

Plugins use it for lists that many callers of one tenant request again within
seconds: the lookups plugin for its catalogues, the ScaiCore plugin for event
and checkpoint pages when an operator enables it.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable

CacheKey = tuple[str, str, bytes]


class ResponseCache:
    """Encoded bodies by route, upstream URL and credential hash, kept ``ttl_s``.

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
    def key(route: str, url: str, authorization: str) -> CacheKey:
        # SECURITY: the credential is part of the key, hashed so that the cache
        # contains no token or key in the clear.
        return (route, url, hashlib.sha256(authorization.encode()).digest())

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
