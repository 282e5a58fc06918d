"""OpenTelemetry metrics under the semantic-convention names and units.

Gauges and counters are observable instruments read from snapshots at collection time.
OpenTelemetry has no observable histogram, so durations reach the SDK's histograms by
replay: each bridge gets its own bounded queue of raw observations from every ledger and
lock (filled when the ledger folds, never on the checkout path), each with the span
context its checkout ran under (for exemplars), and an observable
callback, which the SDK runs before it aggregates the synchronous instruments of the same
collection, records them. Nothing OpenTelemetry does runs on the application's checkout
path; observations past the queue bound (no collection for a long time) are counted in
the snapshot's `internal.otel_dropped`, not silently lost.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable
from typing import Any

from monitor.catalogue import LOCK_NAME, METRICS, POOL_NAME, SECONDS_BUCKETS, Metric
from monitor.exporters.samples import pool_samples

_METER_NAME = "pool-monitor"
_POOL_HISTOGRAMS = {
    "create_time": "db.client.connection.create_time",
    "wait_time": "db.client.connection.wait_time",
    "use_time": "db.client.connection.use_time",
}
_LOCK_HISTOGRAMS = {"wait": "app.lock.wait_time", "hold": "app.lock.hold_time"}

_lock = threading.Lock()
_bridges: list[OtelBridge] = []


class OtelBridge:
    """The instruments of one MeterProvider, and its own queues of observations."""

    def __init__(self, meter_provider: Any = None) -> None:
        from opentelemetry import metrics

        from monitor import locks
        from monitor.registry import on_every_monitor

        self.meter_provider = meter_provider
        provider = meter_provider or metrics.get_meter_provider()
        self.meter = provider.get_meter(_METER_NAME)
        self._histograms: dict[str, Any] = {}
        self._pool_queues: weakref.WeakKeyDictionary[Any, deque[tuple[str, float, Any]]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock_queue = locks.add_otel_queue()
        self._snapshots: tuple[float, list[dict[str, Any]]] = (0.0, [])
        for metric in METRICS:
            self._create(metric)
        on_every_monitor(self._add_monitor)

    def _add_monitor(self, pm: Any) -> None:
        self._pool_queues[pm] = pm.ledger.add_otel_queue()

    def _create(self, metric: Metric) -> None:
        meter = self.meter
        if metric.kind == "histogram":
            self._histograms[metric.name] = meter.create_histogram(
                metric.name,
                unit=metric.unit,
                description=metric.description,
                explicit_bucket_boundaries_advisory=list(SECONDS_BUCKETS),
            )
            return
        factory = {
            "counter": meter.create_observable_counter,
            "updowncounter": meter.create_observable_up_down_counter,
            "gauge": meter.create_observable_gauge,
        }[metric.kind]
        factory(
            metric.name,
            callbacks=[self._callback_for(metric)],
            unit=metric.unit,
            description=metric.description,
        )

    def _callback_for(self, metric: Metric) -> Any:
        from opentelemetry.metrics import Observation

        def callback(options: Any) -> Iterable[Any]:
            snapshots = self._pool_snapshots()
            if metric.name == "db.client.connection.count":
                self._replay()  # the first instrument collected: the ledgers just folded
            for m, attributes, value in pool_samples(snapshots):
                if m is metric:
                    yield Observation(value, attributes)

        return callback

    def _pool_snapshots(self) -> list[dict[str, Any]]:
        """Snapshots for one collection: every callback runs within a few milliseconds,
        so they share one read (which also folds the ledgers into this bridge's queues)."""
        from monitor.registry import monitors

        now = time.monotonic()
        taken, snapshots = self._snapshots
        if now - taken > 0.05:
            snapshots = [pm.snapshot() for pm in monitors()]
            self._snapshots = (now, snapshots)
        return snapshots

    def _replay(self) -> None:
        """Record this bridge's queued durations into the SDK histograms. A duration
        measured under a span is recorded with that span's context, so the SDK's exemplar
        filter and reservoir can keep its trace id, as if recorded inside the request."""
        from opentelemetry.trace import NonRecordingSpan, set_span_in_context

        for pm, queue in list(self._pool_queues.items()):
            attributes = {POOL_NAME: pm.name}
            for kind, value, ctx in _drain(queue):
                context = set_span_in_context(NonRecordingSpan(ctx)) if ctx is not None else None
                self._histograms[_POOL_HISTOGRAMS[kind]].record(value, attributes, context)
        for kind, name, value in _drain(self._lock_queue):
            self._histograms[_LOCK_HISTOGRAMS[kind]].record(value, {LOCK_NAME: name})


def _drain(queue: deque[Any]) -> Iterable[Any]:
    while True:
        try:
            yield queue.popleft()
        except IndexError:
            return


def instrument_otel(meter_provider: Any = None) -> OtelBridge:
    """Publish every instrumented pool through OpenTelemetry (`meter_provider`, or the
    global one). Once per provider; pools instrumented later are included."""
    with _lock:
        for bridge in _bridges:
            if bridge.meter_provider is meter_provider:
                return bridge
        bridge = OtelBridge(meter_provider)
        _bridges.append(bridge)
    return bridge
