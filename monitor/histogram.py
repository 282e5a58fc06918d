"""A fixed-bucket histogram with no lock of its own.

The hooks already hold their ledger's one short lock when they observe, so a second lock
per histogram (as prometheus_client's has) would double the hot-path locking.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

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


def cumulative_buckets(data: dict[str, Any]) -> list[tuple[str, int]]:
    """Prometheus-style `(le, cumulative count)` pairs from a `to_dict()` result."""
    running = 0
    out: list[tuple[str, int]] = []
    for bound, count in zip(data["bounds"], data["counts"][:-1], strict=True):
        running += count
        out.append((_format_le(bound), running))
    out.append(("+Inf", running + data["counts"][-1]))
    return out


def _format_le(bound: float) -> str:
    return repr(float(bound))
