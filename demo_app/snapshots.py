"""Arithmetic on `PoolMonitor.snapshot()` dicts: merge workers, diff over a window, quantiles.

The report's figures come from the monitor itself. A variant's figures are the difference
between the pool's snapshot after and before the variant (summed over every worker
process), so nothing else that ran earlier counts. Quantiles follow Prometheus'
`histogram_quantile` (linear interpolation inside a bucket), so the report and the
dashboards agree on what "p99" means.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from typing import Any

Snapshot = dict[str, Any]
Histogram = dict[str, Any]

USE_TIME = "db.client.connection.use_time"
WAIT_TIME = "db.client.connection.wait_time"
TIMEOUTS = "db.client.connection.timeouts"
CHECKOUTS = "sqlalchemy.pool.checkouts"
SITE_USE_TIME = "sqlalchemy.pool.site_use_time"
SITE_IDLE_TIME = "sqlalchemy.pool.site_idle_in_use_time"
SITE_CHECKOUTS = "sqlalchemy.pool.site_checkouts"
IDLE_IN_USE = "sqlalchemy.pool.idle_in_use_time"
CROSS_THREAD = "sqlalchemy.pool.cross_thread_uses"
CONCURRENT = "sqlalchemy.pool.concurrent_uses"


def empty_histogram(bounds: Iterable[float]) -> Histogram:
    bounds = list(bounds)
    return {"bounds": bounds, "counts": [0] * (len(bounds) + 1), "sum": 0.0, "count": 0}


def _is_histogram(value: Any) -> bool:
    return isinstance(value, Mapping) and "counts" in value and "bounds" in value


def _zero_like(value: Any) -> Any:
    if _is_histogram(value):
        return empty_histogram(value["bounds"])
    return {} if isinstance(value, Mapping) else 0


def _add(a: Any, b: Any, sign: int = 1) -> Any:
    """a + sign·b over numbers, histograms and {key: number} dicts (missing keys are 0)."""
    if a is None and b is None:
        return None
    if b is None:
        b = _zero_like(a)
    if a is None:
        a = _zero_like(b)
    if _is_histogram(a):
        return {
            "bounds": list(a["bounds"]),
            "counts": [x + sign * y for x, y in zip(a["counts"], b["counts"], strict=True)],
            "sum": a["sum"] + sign * b["sum"],
            "count": a["count"] + sign * b["count"],
        }
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        a = a if isinstance(a, Mapping) else {}
        b = b if isinstance(b, Mapping) else {}
        return {k: _add(a.get(k), b.get(k), sign) for k in {*a, *b}}
    return a + sign * b


def merge(snapshots: Iterable[Snapshot]) -> Snapshot | None:
    """One pool's snapshots from several worker processes, summed (holds concatenated)."""
    merged: Snapshot | None = None
    for snap in snapshots:
        if merged is None:
            merged = copy.deepcopy(snap)
            continue
        for section in ("gauges", "counters", "histograms"):
            mine, theirs = merged.get(section, {}), snap.get(section, {})
            merged[section] = {k: _add(mine.get(k), theirs.get(k)) for k in {*mine, *theirs}}
        merged["holds"] = [*merged.get("holds", []), *snap.get("holds", [])]
    return merged


def delta(after: Snapshot, before: Snapshot | None) -> Snapshot:
    """Counters and histograms accumulated between two snapshots; gauges as of `after`."""
    if before is None:
        return copy.deepcopy(after)
    out = copy.deepcopy(after)
    for section in ("counters", "histograms"):
        a, b = after.get(section, {}), before.get(section, {})
        out[section] = {k: _add(a.get(k), b.get(k), -1) for k in a}
    return out


def histogram_delta(after: Histogram | None, before: Histogram | None) -> Histogram | None:
    """Observations between two readings of one histogram (None if there are none)."""
    if after is None:
        return None
    return _add(after, before, -1)


def total(snapshot: Snapshot, counter: str) -> float:
    """A counter's value, summed over its label values when it has them."""
    value = snapshot.get("counters", {}).get(counter, 0)
    if isinstance(value, Mapping):
        return float(sum(value.values()))
    return float(value or 0)


def histogram(snapshot: Snapshot, name: str) -> Histogram | None:
    return snapshot.get("histograms", {}).get(name)


def mean(hist: Histogram | None) -> float | None:
    if not hist or not hist["count"]:
        return None
    return hist["sum"] / hist["count"]


def quantile(hist: Histogram | None, q: float) -> float | None:
    """Prometheus' histogram_quantile on a non-cumulative histogram."""
    if not hist or not hist["count"]:
        return None
    bounds, counts = hist["bounds"], hist["counts"]
    rank = q * hist["count"]
    seen = 0.0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(bounds):  # the +Inf bucket: the highest finite bound, as Prometheus does
                return float(bounds[-1])
            lower = 0.0 if i == 0 else float(bounds[i - 1])
            upper = float(bounds[i])
            return lower + (upper - lower) * (rank - seen) / n
        seen += n
    return float(bounds[-1])


def fraction_above(hist: Histogram | None, threshold: float) -> float | None:
    """Share of observations in buckets entirely above `threshold`."""
    if not hist or not hist["count"]:
        return None
    above = sum(
        n
        for lower, n in zip([0.0, *hist["bounds"]], hist["counts"], strict=True)
        if lower >= threshold
    )
    return above / hist["count"]


def sites(snapshot: Snapshot, function_prefix: str) -> dict[str, dict[str, float]]:
    """Per code site (`file:line:function`) whose function starts with `function_prefix`."""
    counters = snapshot.get("counters", {})
    use = counters.get(SITE_USE_TIME, {}) or {}
    idle = counters.get(SITE_IDLE_TIME, {}) or {}
    checkouts = counters.get(SITE_CHECKOUTS, {}) or {}
    out: dict[str, dict[str, float]] = {}
    for site in {*use, *checkouts}:
        function = site.rsplit(":", 1)[-1]
        if not function.startswith(function_prefix):
            continue
        n = checkouts.get(site, 0)
        if not n and not use.get(site):
            continue
        out[site] = {
            "checkouts": n,
            "use_time_s": use.get(site, 0.0),
            "idle_in_use_time_s": idle.get(site, 0.0),
            "mean_hold_s": (use.get(site, 0.0) / n) if n else math.nan,
        }
    return out


def gauges(snapshot: Snapshot) -> dict[str, float]:
    """used / idle / max / pending of one (merged) pool snapshot."""
    g = snapshot.get("gauges", {})
    count = g.get("db.client.connection.count", {}) or {}
    return {
        "used": count.get("used", 0),
        "idle": count.get("idle", 0),
        "max": g.get("db.client.connection.max", 0) or 0,
        "pending": g.get("db.client.connection.pending_requests", 0) or 0,
    }
