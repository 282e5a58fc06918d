"""Arithmetic on pool snapshots: summing several processes' numbers into one pool.

Counters and histograms add up (per label value). Gauges add up too — the pod's pools
together hold `used` connections — except the age of the oldest checkout, which is the
oldest over every process. Everything here works in place on plain dicts, because the
sidecar merges every worker's file every second (see the benchmark in the tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Gauges that combine with max, not +.
MAX_GAUGES = frozenset({"sqlalchemy.pool.oldest_checkout_age"})

#: Gauges a pool reports as zero once no live process has it (capacity ones are omitted:
#: a pool nobody runs has no capacity, and 0 would read as "exhausted").
ZERO_GAUGES: dict[str, Any] = {
    "db.client.connection.count": {"idle": 0, "used": 0},
    "db.client.connection.pending_requests": 0,
    "sqlalchemy.pool.oldest_checkout_age": 0.0,
    "sqlalchemy.pool.long_held": 0,
}


def totals() -> dict[str, dict[str, Any]]:
    """An empty accumulator for one pool's counters and histograms."""
    return {"counters": {}, "histograms": {}}


def add_value(acc: dict[str, Any], name: str, value: Any) -> None:
    """acc[name] += value, for a number or a `{label value: number}` dict."""
    if isinstance(value, Mapping):
        into = acc.get(name)
        if not isinstance(into, dict):
            into = acc[name] = {}
        for key, v in value.items():
            into[key] = into.get(key, 0) + v
    else:
        current = acc.get(name, 0)
        acc[name] = (current if not isinstance(current, dict) else 0) + value


#: Seconds within which the slower of two exemplars of a bucket wins; a newer one by
#: more than this wins whatever its value (the workers' default `exemplar_window`), so a
#: worker that stopped serving traced requests does not keep its old exemplar on top.
EXEMPLAR_WINDOW_S = 15.0


def add_histogram(
    acc: dict[str, Any], name: str, hist: Mapping[str, Any], exemplars: bool = True
) -> None:
    """acc[name] += hist (same bounds: `files.validate` guarantees it). Per bucket, the
    slowest recent exemplar of all wins (`exemplars=False`: `hist`'s are left out)."""
    into = acc.get(name)
    if into is None:
        into = acc[name] = {
            "bounds": list(hist["bounds"]),
            "counts": list(hist["counts"]),
            "sum": hist["sum"],
            "count": sum(hist["counts"]),
        }
    else:
        counts = into["counts"]
        for i, c in enumerate(hist["counts"]):
            counts[i] += c
        into["sum"] += hist["sum"]
        into["count"] = sum(counts)
    offered = hist.get("exemplars") if exemplars else None
    if offered:
        kept = into.get("exemplars")
        if kept is None:
            into["exemplars"] = list(offered)
            return
        for i, candidate in enumerate(offered):
            if candidate is not None and _wins(candidate, kept[i]):
                kept[i] = candidate


def _wins(candidate: Mapping[str, Any], kept: Mapping[str, Any] | None) -> bool:
    """The exemplar of the latest `EXEMPLAR_WINDOW_S` slot of time wins, then the slowest
    in it: a total order, so the merged exemplar is the same whatever order the workers'
    documents are added in."""
    return kept is None or _rank(candidate) > _rank(kept)


def _rank(exemplar: Mapping[str, Any]) -> tuple[float, float, float, str, str]:
    slot = exemplar["timestamp"] // EXEMPLAR_WINDOW_S
    return (
        slot,
        exemplar["value"],
        exemplar["timestamp"],
        exemplar["trace_id"],
        exemplar["span_id"],
    )


def add_totals(
    acc: dict[str, dict[str, Any]], pool: Mapping[str, Any], exemplars: bool = True
) -> None:
    """Add one pool snapshot's counters and histograms into `acc` (see `totals()`).
    Retained totals (processes gone) take no exemplars: those requests are past."""
    counters = acc["counters"]
    for name, value in pool.get("counters", {}).items():
        add_value(counters, name, value)
    histograms = acc["histograms"]
    for name, hist in pool.get("histograms", {}).items():
        add_histogram(histograms, name, hist, exemplars)


def add_gauges(acc: dict[str, Any], gauges: Mapping[str, Any]) -> None:
    for name, value in gauges.items():
        if name in MAX_GAUGES:
            acc[name] = max(acc.get(name, value), value)
        else:
            add_value(acc, name, value)


def add_locks(acc: dict[str, dict[str, Any]], locks: Mapping[str, Mapping[str, Any]]) -> None:
    """`{metric: {lock name: histogram}}` summed into `acc`."""
    for metric, by_lock in locks.items():
        into = acc.setdefault(metric, {})
        for lock_name, hist in by_lock.items():
            add_histogram(into, lock_name, hist, exemplars=False)  # none are made for locks


def copy_totals(source: Mapping[str, Any]) -> dict[str, Any]:
    """A copy deep enough that adding into it leaves `source` alone."""
    out: dict[str, Any] = {}
    for name, value in source.items():
        if isinstance(value, Mapping) and "counts" in value:
            out[name] = {**value, "counts": list(value["counts"])}
            if value.get("exemplars") is not None:
                out[name]["exemplars"] = list(value["exemplars"])
        elif isinstance(value, Mapping):
            out[name] = copy_totals(value)
        else:
            out[name] = value
    return out


def high_water(old: Mapping[str, Any], new: dict[str, Any]) -> None:
    """Raise `new`'s counters and histogram buckets to at least `old`'s, in place.

    Within one monitor's series (same process, same `monitor_id`) counters only grow; a
    smaller value is a snapshot taken while a connection was between two lock-free steps
    of its return. Letting that through would make the merged counter dip, which
    Prometheus' rate() reads as a reset and turns into a spike the size of the counter."""
    new_c = new.get("counters", {})
    for name, old_value in old.get("counters", {}).items():
        value = new_c.get(name)
        if isinstance(old_value, Mapping):
            if not isinstance(value, dict):
                value = new_c[name] = {}
            for key, v in old_value.items():
                if value.get(key, 0) < v:
                    value[key] = v
        elif value is None or isinstance(value, dict) or value < old_value:
            new_c[name] = old_value
    new_h = new.get("histograms", {})
    for name, old_hist in old.get("histograms", {}).items():
        hist = new_h.get(name)
        if hist is None:
            new_h[name] = old_hist
            continue
        counts = hist["counts"]
        if any(c < o for c, o in zip(counts, old_hist["counts"], strict=True)):
            hist["counts"] = [max(c, o) for c, o in zip(counts, old_hist["counts"], strict=True)]
            hist["count"] = sum(hist["counts"])
        if hist["sum"] < old_hist["sum"]:
            hist["sum"] = old_hist["sum"]
