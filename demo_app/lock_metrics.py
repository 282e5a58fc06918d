"""Read `monitor.lock`'s histograms back from this process's Prometheus registry.

App locks are not pool metrics, so they are not in `PoolMonitor.snapshot()`; the monitor
exports them as `app_lock_wait_time_seconds` / `app_lock_hold_time_seconds` (label
`lock_name`) in prometheus_client's default registry. Reading that registry gives the
report the very numbers a Prometheus scrape would see.
"""

from __future__ import annotations

import math

from prometheus_client import REGISTRY, CollectorRegistry

from demo_app.snapshots import Histogram

WAIT = "app_lock_wait_time_seconds"
HOLD = "app_lock_hold_time_seconds"


def lock_histogram(
    lock_name: str, series: str = WAIT, registry: CollectorRegistry = REGISTRY
) -> Histogram | None:
    """The (non-cumulative) histogram of one lock name, or None if never observed."""
    buckets: dict[float, float] = {}
    total_sum = total_count = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.labels.get("lock_name") != lock_name:
                continue
            if sample.name == f"{series}_bucket":
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
            elif sample.name == f"{series}_sum":
                total_sum += sample.value
            elif sample.name == f"{series}_count":
                total_count += sample.value
    if not buckets:
        return None
    ordered = sorted(buckets.items())
    bounds = [le for le, _ in ordered if not math.isinf(le)]
    cumulative = [value for _, value in ordered]
    if len(cumulative) == len(bounds):  # no +Inf bucket exposed: everything is below the top
        cumulative.append(cumulative[-1] if cumulative else 0.0)
    counts = [round(c - p) for c, p in zip(cumulative, [0.0, *cumulative[:-1]], strict=True)]
    return {"bounds": bounds, "counts": counts, "sum": total_sum, "count": int(total_count)}
