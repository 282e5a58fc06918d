"""Prometheus exposition: a collector in prometheus_client's registry, and an ASGI app.

The collector reads snapshots at scrape time, so `generate_latest()`, `make_asgi_app()`
and `start_http_server()` all just work, alongside the application's own metrics.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, make_asgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.core import (
    Metric as PromMetric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from monitor.catalogue import METRICS, Metric
from monitor.exporters.samples import Sample, lock_samples, pool_samples
from monitor.histogram import cumulative_buckets


def _family(metric: Metric) -> PromMetric:
    labels = list(metric.prometheus_labels)
    unit = "seconds" if metric.unit == "s" else ""
    if metric.kind == "histogram":
        return HistogramMetricFamily(
            metric.prometheus_name, metric.description, labels=labels, unit=unit
        )
    if metric.kind == "counter":
        return CounterMetricFamily(
            metric.prometheus_name.removesuffix("_total"),
            metric.description,
            labels=labels,
            unit=unit,
        )
    return GaugeMetricFamily(metric.prometheus_name, metric.description, labels=labels, unit=unit)


def families(samples: Iterable[Sample]) -> list[PromMetric]:
    """One family per catalogue metric that has samples, in catalogue order."""
    by_name: dict[str, PromMetric] = {}
    for metric, attributes, value in samples:
        family = by_name.get(metric.name)
        if family is None:
            family = by_name[metric.name] = _family(metric)
        label_values = [attributes.get(a, "") for a in metric.attributes]
        if metric.kind == "histogram":
            family.add_metric(label_values, cumulative_buckets(value), value["sum"])  # type: ignore[attr-defined]
        else:
            family.add_metric(label_values, value)  # type: ignore[attr-defined]
    order = {m.name: i for i, m in enumerate(METRICS)}
    return [by_name[name] for name in sorted(by_name, key=order.__getitem__)]


class MonitorCollector(Collector):
    """Collects every instrumented pool (and instrumented lock) of this process."""

    def __init__(
        self,
        pools: Callable[[], Iterable[Mapping[str, Any]]],
        locks: Callable[[], Mapping[str, Mapping[str, Any]]],
    ) -> None:
        self._pools = pools
        self._locks = locks

    def collect(self) -> Iterator[PromMetric]:
        samples = [*pool_samples(self._pools()), *lock_samples(self._locks())]
        yield from families(samples)

    def describe(self) -> list[PromMetric]:
        return []  # unchecked collector: families depend on what is instrumented


# Weak: a registry that is gone must not leave its id "registered" for a new one.
_registered: weakref.WeakKeyDictionary[CollectorRegistry, MonitorCollector] = (
    weakref.WeakKeyDictionary()
)


def _live_pool_snapshots() -> list[dict[str, Any]]:
    from monitor.registry import monitors

    return [pm.snapshot() for pm in monitors()]


def _live_lock_snapshot() -> Mapping[str, Mapping[str, Any]]:
    from monitor.locks import lock_snapshot

    return lock_snapshot()


def register(registry: CollectorRegistry = REGISTRY) -> MonitorCollector:
    """Register this process's collector in `registry`, once per registry."""
    collector = _registered.get(registry)
    if collector is None:
        collector = MonitorCollector(_live_pool_snapshots, _live_lock_snapshot)
        registry.register(collector)
        _registered[registry] = collector
    return collector


class MetricsApp:
    """prometheus_client's ASGI app, as an object rather than a function: Starlette's
    `Route` (so `app.add_route()` of Starlette and FastAPI) calls an object as an ASGI app,
    whereas it would call a function as `endpoint(request)`. Answers HEAD without a body."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._app = make_asgi_app(registry=registry)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        scope = _readable_accept(scope)
        if scope.get("method") == "HEAD":
            inner = send

            async def send(message: Any) -> None:
                if message["type"] == "http.response.body":
                    message = {**message, "body": b""}
                await inner(message)

        await self._app(scope, receive, send)


def _readable_accept(scope: Any) -> Any:
    """The scope with an `Accept` header prometheus_client cannot parse (it raises on
    `application/openmetrics-text; version=abc`) taken out: a bad header gets the plain
    text format, not a 500."""
    headers = scope.get("headers") or []
    for name, value in headers:
        if name.lower() == b"accept":
            try:
                choose_encoder(value.decode("latin-1"))
            except Exception:
                kept = [(n, v) for n, v in headers if n.lower() != b"accept"]
                return {**scope, "headers": kept}
    return scope


def metrics_app(registry: CollectorRegistry = REGISTRY) -> MetricsApp:
    """An ASGI app serving the Prometheus exposition, including everything else registered
    in `registry` (by default, the application's own metrics).

    `app.add_route("/metrics", metrics_app())` (Starlette, FastAPI) answers `/metrics`
    itself; `app.mount("/metrics", metrics_app())` answers `/metrics/` and redirects
    `/metrics` there (Starlette's Mount), which curl and many clients do not follow."""
    register(registry)
    return MetricsApp(registry)
