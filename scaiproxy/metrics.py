"""Prometheus metrics, one registry per app so that tests start from zero.

Labels carry route names, statuses and credential sources only: never a tenant
id, a token or a key. With ``--workers N`` each worker process keeps its own
counters, and ``/metrics`` shows those of the worker that served it.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The gateway's counters and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.requests = Counter(
            "scaiproxy_requests",
            "Requests answered, by route, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "scaiproxy_request_duration_seconds",
            "Time from request to response, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.upstream_requests = Counter(
            "scaiproxy_upstream_requests",
            "Upstream calls that got an answer, by route and upstream status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.upstream_duration = Histogram(
            "scaiproxy_upstream_duration_seconds",
            "Upstream call latency, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "scaiproxy_upstream_errors",
            "Upstream failures, by route and kind (timeout, connection, "
            "server_error, client_error, auth_failed, rate_limited, too_large, "
            "bad_shape).",
            ["route", "kind"],
            registry=self.registry,
        )
        self.credential_sources = Counter(
            "scaiproxy_credential_source",
            "Upstream credentials chosen, by source (user_jwt, tenant_key, env_key).",
            ["source"],
            registry=self.registry,
        )
        self.coalesced = Counter(
            "scaiproxy_coalesced_requests",
            "GET requests that shared an identical upstream call already in flight.",
            ["route"],
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "scaiproxy_cache_hits",
            "Responses served from a plugin's short cache, by route.",
            ["route"],
            registry=self.registry,
        )

    def child(self, metric: Any, *labels: str) -> Any:
        """Return ``metric.labels(*labels)``, cached: label lookups cost more
        than the increment itself. Labels are route names, methods, statuses
        and sources, so the cache stays small."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def render(self) -> bytes:
        return generate_latest(self.registry)
