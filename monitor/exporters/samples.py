"""Snapshots as samples: `(metric, attributes, value)` for every catalogue metric.

Both the Prometheus collector and the OpenTelemetry bridge iterate these, so the two
expositions carry the same metrics with the same attributes by construction.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from monitor.catalogue import LOCK_METRICS, POOL_METRICS, POOL_NAME, Metric

Sample = tuple[Metric, dict[str, str], Any]  # value: number, or a histogram dict


def _section(metric: Metric) -> str:
    if metric.kind == "histogram":
        return "histograms"
    return "counters" if metric.kind == "counter" else "gauges"


def pool_samples(snapshots: Iterable[Mapping[str, Any]]) -> Iterator[Sample]:
    """Samples for every pool metric of every pool snapshot."""
    for snap in snapshots:
        base = {POOL_NAME: str(snap["pool"])}
        for metric in POOL_METRICS:
            value = snap.get(_section(metric), {}).get(metric.name)
            if value is None:
                continue
            if metric.attribute is None or (metric.kind == "histogram" and "counts" in value):
                yield metric, base, value
            else:
                for attr_value, v in value.items():
                    yield metric, {**base, metric.attribute: str(attr_value)}, v


def lock_samples(locks: Mapping[str, Mapping[str, Any]]) -> Iterator[Sample]:
    """Samples for `app.lock.*` from `{metric name: {lock name: histogram dict}}`."""
    for metric in LOCK_METRICS:
        for lock_name, hist in locks.get(metric.name, {}).items():
            yield metric, {metric.attribute or "lock.name": str(lock_name)}, hist
