"""A fixed-bucket histogram with no lock of its own.

The hooks already hold their ledger's one short lock when they observe, so a second lock
per histogram (as prometheus_client's has) would double the hot-path locking.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping
from typing import Any

from prometheus_client.samples import Exemplar

from monitor.catalogue import SECONDS_BUCKETS


class Histogram:
    """Counts per bucket (non-cumulative, last one is +Inf), sum and count."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = SECONDS_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Record one value. Caller holds the owner's lock. `le` semantics: bound inclusive."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bounds": list(self.bounds),
            "counts": list(self.counts),
            "sum": self.sum,
            "count": sum(self.counts),
        }


def cumulative_buckets(data: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """Prometheus-style `(le, cumulative count)` pairs from a `to_dict()` result, as
    `(le, count, exemplar)` for a bucket with an exemplar (the ledger's `exemplars` list,
    one entry or None per bucket): prometheus_client writes it in the OpenMetrics format
    and leaves it out of the plain text one."""
    running = 0
    les = [*map(_format_le, data["bounds"]), "+Inf"]
    exemplars = data.get("exemplars") or ()
    out: list[tuple[Any, ...]] = []
    for index, (le, count) in enumerate(zip(les, data["counts"], strict=True)):
        running += count
        exemplar = exemplars[index] if index < len(exemplars) else None
        if exemplar is None:
            out.append((le, running))
        else:
            labels = {"trace_id": exemplar["trace_id"], "span_id": exemplar["span_id"]}
            out.append((le, running, Exemplar(labels, exemplar["value"], exemplar["timestamp"])))
    return out


def _format_le(bound: float) -> str:
    return repr(float(bound))
