"""Prometheus metrics, one registry per app so that tests start from zero.

Labels carry route names, statuses and credential sources only: never a tenant
id, a token or a key. With ``--workers N`` each worker process keeps its own
counters, and ``/metrics`` shows those of the worker that served it.

The counters and histograms are plain numbers that the event loop's thread
updates and the registry reads when ``/metrics`` is scraped. prometheus_client's
own types take a lock on every update, which cost more than the update itself
on the hot path, and the gateway updates its metrics from one thread only.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any

import prometheus_client.metrics
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.samples import Sample

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


class _CounterValue:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        # Unix time of the series' creation, exported as <name>_created.
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _HistogramValue:
    __slots__ = ("bounds", "counts", "created", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        # One count per bucket, and a last one for values above every bound.
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        # A bucket's bound is inclusive: bisect_left finds the first bound >= value.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


class Counter:
    """A labelled counter, registered with ``registry`` and read when scraped."""

    kind = "counter"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._values: dict[tuple[str, ...], Any] = {}
        registry.register(self)

    def labels(self, *values: Any, **named: Any) -> Any:
        """Return the value for one combination of label values, made on first use.

        As with prometheus_client, the values come by position or by label name,
        and each is converted with ``str()``.
        """
        if named:
            if values or set(named) != set(self.labelnames):
                raise ValueError(
                    f"{self.name} needs the label values {self.labelnames} by "
                    f"position or by name, got {sorted(named)} by name"
                )
            values = tuple(named[name] for name in self.labelnames)
        if len(values) != len(self.labelnames):
            raise ValueError(
                f"{self.name} needs {len(self.labelnames)} label values "
                f"{self.labelnames}, got {len(values)}"
            )
        values = tuple(str(value) for value in values)
        value = self._values.get(values)
        if value is None:
            value = self._values[values] = self._new_value()
        return value

    def _new_value(self) -> Any:
        return _CounterValue()

    def _family(self) -> Any:
        return CounterMetricFamily(
            self.name, self.documentation, labels=self.labelnames
        )

    def describe(self) -> Iterator[Any]:
        yield self._family()

    def collect(self) -> Iterator[Any]:
        family = self._family()
        created = _created_series_enabled()
        for labels, value in list(self._values.items()):
            family.add_metric(
                labels, value.value, created=value.created if created else None
            )
        yield family


class Histogram(Counter):
    """A labelled histogram over fixed buckets, read when scraped."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        buckets: Sequence[float],
    ) -> None:
        self.buckets = tuple(float(bound) for bound in buckets)
        super().__init__(name, documentation, labelnames, registry)

    def _new_value(self) -> Any:
        return _HistogramValue(self.buckets)

    def _family(self) -> Any:
        return HistogramMetricFamily(
            self.name, self.documentation, labels=self.labelnames
        )

    def collect(self) -> Iterator[Any]:
        family = self._family()
        created = _created_series_enabled()
        for labels, value in list(self._values.items()):
            cumulative = 0
            buckets = []
            for bound, count in zip(self.buckets, value.counts, strict=False):
                cumulative += count
                buckets.append((_bound_text(bound), cumulative))
            buckets.append(("+Inf", cumulative + value.counts[-1]))
            family.add_metric(labels, buckets, value.total)
            if created:
                series = dict(zip(self.labelnames, labels, strict=True))
                family.samples.append(
                    Sample(f"{self.name}_created", series, value.created)
                )
        yield family


def _bound_text(bound: float) -> str:
    # The exposition's spelling of a bucket bound: 0.005, 1.0, 120.0.
    return repr(float(bound))


def _created_series_enabled() -> bool:
    # prometheus_client's own types leave out the <name>_created series when
    # PROMETHEUS_DISABLE_CREATED_SERIES is set or disable_created_metrics() ran.
    # NOTE: that switch is a private module attribute (seen in prometheus_client
    # 0.26); without it the series are exported.
    return getattr(prometheus_client.metrics, "_use_created", True)


class Metrics:
    """The gateway's counters and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
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
            registry=self.registry,
            buckets=_LATENCY_BUCKETS,
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
            registry=self.registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.upstream_errors = Counter(
            "scaiproxy_upstream_errors",
            "Upstream failures, by route and kind (timeout, connection, "
            "bad_response, server_error, client_error, auth_failed, rate_limited, "
            "too_large, bad_shape).",
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
            "GET requests that shared a handler run or an upstream call already "
            "in flight.",
            ["route"],
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "scaiproxy_cache_hits",
            "Responses served from a plugin's short cache, by route.",
            ["route"],
            registry=self.registry,
        )

    def record_request(
        self, route: str, method: str, status: int, duration_s: float
    ) -> None:
        """Count one served request and observe its duration."""
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(route, method, str(status)),
                self.duration.labels(route),
            )
        children[0].inc()
        children[1].observe(duration_s)

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
