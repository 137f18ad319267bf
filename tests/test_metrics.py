"""The gateway's counters and histograms against prometheus_client's own types."""

from __future__ import annotations

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from scaiproxy import metrics

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 1, 120)
# Values on a bound, between bounds, below the first and above the last.
OBSERVED = (0.0, 0.001, 0.0011, 0.003, 0.005, 0.5, 1.0, 119.9, 120.0, 121.0, 7200.0)


def _without_created(text: bytes) -> list[str]:
    # The *_created samples are creation times, which differ between registries.
    return [line for line in text.decode().splitlines() if "_created" not in line]


def test_exposition_matches_prometheus_client():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counter = metrics.Counter("demo_requests", "Requests.", ["route", "status"], ours)
    histogram = metrics.Histogram(
        "demo_seconds", "Durations.", ["route"], ours, buckets=BUCKETS
    )
    reference_counter = prometheus_client.Counter(
        "demo_requests", "Requests.", ["route", "status"], registry=theirs
    )
    reference_histogram = prometheus_client.Histogram(
        "demo_seconds", "Durations.", ["route"], buckets=BUCKETS, registry=theirs
    )
    for index, value in enumerate(OBSERVED):
        route = "a" if index % 3 else "b"
        counter.labels(route, "200").inc()
        reference_counter.labels(route, "200").inc()
        histogram.labels(route).observe(value)
        reference_histogram.labels(route).observe(value)
    counter.labels("a", "502").inc(2)
    reference_counter.labels("a", "502").inc(2)

    assert _without_created(generate_latest(ours)) == _without_created(
        generate_latest(theirs)
    )


def _series(text: bytes) -> list[str]:
    # Every line but the sample values, which for *_created are creation times.
    lines = text.decode().splitlines()
    return [line if line.startswith("#") else line.rpartition(" ")[0] for line in lines]


def _demo_registries() -> tuple[CollectorRegistry, CollectorRegistry]:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    metrics.Counter("demo_requests", "Requests.", ["route"], ours).labels("a").inc()
    metrics.Histogram(
        "demo_seconds", "Durations.", ["route"], ours, buckets=BUCKETS
    ).labels("a").observe(0.2)
    prometheus_client.Counter(
        "demo_requests", "Requests.", ["route"], registry=theirs
    ).labels("a").inc()
    prometheus_client.Histogram(
        "demo_seconds", "Durations.", ["route"], buckets=BUCKETS, registry=theirs
    ).labels("a").observe(0.2)
    return ours, theirs


def test_created_series_match_prometheus_client():
    ours, theirs = _demo_registries()
    exposed = _series(generate_latest(ours))
    assert 'demo_requests_created{route="a"}' in exposed
    assert 'demo_seconds_created{route="a"}' in exposed
    assert exposed == _series(generate_latest(theirs))


def test_created_series_follow_disable_switch(monkeypatch):
    monkeypatch.setattr(prometheus_client.metrics, "_use_created", False)
    ours, theirs = _demo_registries()
    exposed = _series(generate_latest(ours))
    assert not any("_created" in line for line in exposed)
    assert exposed == _series(generate_latest(theirs))


def test_labels_by_name_or_value():
    counter = metrics.Counter(
        "demo_requests", "Demo.", ["route", "status"], CollectorRegistry()
    )
    by_position = counter.labels("a", "200")
    assert counter.labels(route="a", status="200") is by_position
    assert counter.labels(status="200", route="a") is by_position
    # Values are converted with str(), so 200 and "200" are one series.
    assert counter.labels("a", 200) is by_position


def test_wrong_label_names_rejected():
    counter = metrics.Counter("demo_total", "Demo.", ["route"], CollectorRegistry())
    with pytest.raises(ValueError, match="by position or by name"):
        counter.labels(path="a")
    with pytest.raises(ValueError, match="by position or by name"):
        counter.labels("a", route="a")


def test_sample_values_readable_from_registry():
    gateway = metrics.Metrics()
    gateway.child(gateway.requests, "scaicore.events", "GET", "200").inc()
    gateway.child(gateway.requests, "scaicore.events", "GET", "200").inc()
    gateway.child(gateway.duration, "scaicore.events").observe(0.002)
    labels = {"route": "scaicore.events", "method": "GET", "status": "200"}
    assert gateway.registry.get_sample_value("scaiproxy_requests_total", labels) == 2
    count = gateway.registry.get_sample_value(
        "scaiproxy_request_duration_seconds_count", {"route": "scaicore.events"}
    )
    assert count == 1


def test_wrong_label_count_rejected():
    counter = metrics.Counter("demo_total", "Demo.", ["route"], CollectorRegistry())
    with pytest.raises(ValueError, match="needs 1 label values"):
        counter.labels("a", "b")


def test_duplicate_name_rejected():
    registry = CollectorRegistry()
    metrics.Counter("demo_requests", "Demo.", ["route"], registry)
    with pytest.raises(ValueError):
        metrics.Counter("demo_requests", "Demo.", ["route"], registry)
