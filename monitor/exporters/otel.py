"""OpenTelemetry metrics under the semantic-convention names and units.

Gauges and counters are observable instruments read from snapshots at collection time.
OpenTelemetry has no observable histogram, so durations reach the SDK's histograms by
replay: the hooks append raw values to a bounded queue (only once this bridge is
enabled), and an observable callback, which the SDK runs before it aggregates the
synchronous instruments of the same collection, records them. Nothing OpenTelemetry does
ever runs on the application's checkout path.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from monitor.catalogue import LOCK_NAME, POOL_NAME, SECONDS_BUCKETS, Metric
from monitor.exporters.samples import pool_samples

_METER_NAME = "pool-monitor"
_QUEUED = {"create_time": "db.client.connection.create_time",
           "wait_time": "db.client.connection.wait_time",
           "use_time": "db.client.connection.use_time"}  # fmt: skip

_lock = threading.Lock()
_bridges: list[OtelBridge] = []


class OtelBridge:
    """The instruments of one MeterProvider."""

    def __init__(self, meter_provider: Any = None) -> None:
        from opentelemetry import metrics

        provider = meter_provider or metrics.get_meter_provider()
        self.meter_provider = meter_provider
        self.meter = provider.get_meter(_METER_NAME)
        self._histograms: dict[str, Any] = {}
        from monitor.catalogue import METRICS

        for metric in METRICS:
            self._create(metric)

    def _create(self, metric: Metric) -> None:
        meter = self.meter
        if metric.kind == "histogram":
            self._histograms[metric.name] = meter.create_histogram(
                metric.name, unit=metric.unit, description=metric.description,
                explicit_bucket_boundaries_advisory=list(SECONDS_BUCKETS),
            )  # fmt: skip
            return
        factory = {"counter": meter.create_observable_counter,
                   "updowncounter": meter.create_observable_up_down_counter,
                   "gauge": meter.create_observable_gauge}[metric.kind]  # fmt: skip
        factory(metric.name, callbacks=[self._callback_for(metric)], unit=metric.unit,
                description=metric.description)  # fmt: skip

    def _callback_for(self, metric: Metric) -> Any:
        from opentelemetry.metrics import Observation

        def callback(options: Any) -> Iterable[Any]:
            snapshots = _pool_snapshots()
            if metric.name == "db.client.connection.count":
                self._replay(snapshots)  # first instrument collected: drain the queues
            for m, attributes, value in pool_samples(snapshots):
                if m is metric:
                    yield Observation(value, attributes)

        return callback

    def _replay(self, snapshots: list[dict[str, Any]]) -> None:
        """Record queued durations into the SDK histograms (pool and lock metrics)."""
        from monitor.instrument import monitors

        for pm in monitors():
            queue = pm.ledger.otel_queue
            if queue is None:
                continue
            attributes = {POOL_NAME: pm.name}
            while True:
                try:
                    kind, value = queue.popleft()
                except IndexError:
                    break
                self._histograms[_QUEUED[kind]].record(value, attributes)
        self._replay_locks()

    def _replay_locks(self) -> None:
        from monitor import locks

        queue = locks.otel_queue
        while queue:
            try:
                histogram, name, value = queue.popleft()
            except IndexError:
                break
            self._histograms[f"app.lock.{histogram}_time"].record(value, {LOCK_NAME: name})


_cache: tuple[float, list[dict[str, Any]]] = (0.0, [])


def _pool_snapshots() -> list[dict[str, Any]]:
    """Snapshots for one collection: every instrument's callback runs within a few
    milliseconds, so they share one read instead of taking one each."""
    global _cache
    import time

    from monitor.instrument import monitors

    now = time.monotonic()
    taken, snapshots = _cache
    if now - taken > 0.05:
        snapshots = [pm.snapshot() for pm in monitors()]
        _cache = (now, snapshots)
    return snapshots


def instrument_otel(meter_provider: Any = None) -> OtelBridge:
    """Publish every instrumented pool through OpenTelemetry (`meter_provider`, or the
    global one). Call once per provider; later `instrument()` calls are included."""
    from monitor import locks
    from monitor.instrument import enable_otel_queues
    from monitor.ledger import OTEL_QUEUE_LIMIT

    with _lock:
        for bridge in _bridges:
            if bridge.meter_provider is meter_provider:
                return bridge
        bridge = OtelBridge(meter_provider)
        _bridges.append(bridge)
    enable_otel_queues()
    locks.enable_otel_queue(OTEL_QUEUE_LIMIT)
    return bridge
