"""Sizing advice from what the sidecar merges: a sliding window of each pool's totals.

Every full scan records, per pool, the merged checkouts, hold-time sum, wait-time
histogram, live process count and maximum size. Differences across the window give the
arrival rate and the mean hold (`monitor.sizing.advise` turns them into Erlang C's
answer); the per-scan differences feed the model-fit checks (bursty arrivals, hold time
rising with load). Computed when asked (`/api/advice`, a scrape), from memory only.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from monitor.sidecar.aggregate import RETIRED_POOL, View
from monitor.sizing import Advice, Target, advise, measured_wait

USE = "db.client.connection.use_time"
WAIT = "db.client.connection.wait_time"
MAX = "db.client.connection.max"
CHECKOUTS = "sqlalchemy.pool.checkouts"
#: Hold-time intervals (seconds) the rising-hold check compares.
INTERVAL_S = 10.0


@dataclass(frozen=True)
class Sample:
    at: float
    checkouts: float
    hold_sum: float
    wait_counts: tuple[float, ...]
    wait_sum: float
    processes: int
    max_connections: float | None


#: Samples kept per pool, whatever the window: one every `window / MAX_SAMPLES` seconds.
MAX_SAMPLES = 300
#: Per-process arrival increments kept per pool (for the burstiness check).
MAX_INCREMENTS = 2000


def _sample(pool: dict[str, Any], at: float) -> Sample:
    counters = pool.get("counters", {})
    hists = pool.get("histograms", {})
    use = hists.get(USE) or {}
    wait = hists.get(WAIT) or {}
    maximum = pool.get("gauges", {}).get(MAX)
    return Sample(
        at,
        float(counters.get(CHECKOUTS, 0) or 0),
        float(use.get("sum", 0.0)),
        tuple(wait.get("counts", ())),
        float(wait.get("sum", 0.0)),
        int(pool.get("processes", 0)),
        float(maximum) if isinstance(maximum, (int, float)) else None,
    )


class AdviceWindow:
    """The last `window_s` seconds of each pool's merged totals, and of each process's
    own arrivals between two of its documents (thread-safe: the scan thread records,
    request handlers read). Memory is bounded: at most `MAX_SAMPLES` samples and
    `MAX_INCREMENTS` increments per pool, pools no live process serves are dropped."""

    def __init__(self, window_s: float = 300.0, target: Target | None = None) -> None:
        self.window_s = window_s
        self.target = target or Target()
        self._samples: dict[str, deque[Sample]] = {}
        self._bounds: dict[str, tuple[float, ...]] = {}
        # per pool: (time, seconds, checkouts, process key) between two documents
        self._increments: dict[str, deque[tuple[float, float, float, Any]]] = {}
        self._last_doc: dict[Any, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def record(self, view: View, processes: Iterable[Any] = ()) -> None:
        """One full scan: `view`'s merged pools, and the aggregator's processes (their
        documents' own `written_at`: arrivals per process per interval without the
        scan's sampling jitter, which would pass for bursts)."""
        at = view.scanned_at
        every = self.window_s / MAX_SAMPLES
        served = {p["pool"] for p in view.pools if p.get("processes")} - {RETIRED_POOL}
        with self._lock:
            for pool in view.pools:
                name = pool["pool"]
                if name not in served:
                    continue
                samples = self._samples.setdefault(name, deque())
                sample = _sample(pool, at)
                if samples and sample.checkouts < samples[-1].checkouts:
                    samples.clear()  # a pool that restarted from zero: a new window
                if samples and at - samples[-1].at < every and len(samples) > 1:
                    samples[-1] = sample  # keep the newest, at most MAX_SAMPLES of them
                else:
                    samples.append(sample)
                while samples and at - samples[0].at > self.window_s:
                    samples.popleft()
                wait = pool.get("histograms", {}).get(WAIT) or {}
                self._bounds[name] = tuple(wait.get("bounds", ())) or self._bounds.get(name, ())
            self._record_increments(processes, served, at)
            for name in [n for n in self._samples if n not in served]:
                del self._samples[name]
                self._bounds.pop(name, None)
                self._increments.pop(name, None)

    def _record_increments(self, processes: Iterable[Any], served: set[str], at: float) -> None:
        seen = set()
        for proc in processes:
            if not getattr(proc, "live", False):
                continue
            doc = proc.doc
            written = float(doc["written_at"])
            for pool in doc.get("pools", ()):
                name = pool["pool"]
                if name not in served:
                    continue
                key = (proc.name, name, pool.get("monitor_id"))
                seen.add(key)
                checkouts = float(pool.get("counters", {}).get(CHECKOUTS, 0) or 0)
                last = self._last_doc.get(key)
                self._last_doc[key] = (written, checkouts)
                if last is None or written <= last[0] or checkouts < last[1]:
                    continue
                increments = self._increments.setdefault(name, deque(maxlen=MAX_INCREMENTS))
                increments.append((written, written - last[0], checkouts - last[1], key))
        for key in [k for k in self._last_doc if k not in seen]:
            del self._last_doc[key]
        for increments in self._increments.values():
            while increments and at - increments[0][0] > self.window_s:
                increments.popleft()

    def advice(self) -> list[Advice]:
        with self._lock:
            windows = {name: list(s) for name, s in self._samples.items()}
            bounds = dict(self._bounds)
            increments = {name: list(i) for name, i in self._increments.items()}
        out = []
        for name, samples in sorted(windows.items()):
            advice = _advise(
                name, samples, bounds.get(name, ()), increments.get(name, []), self.target
            )
            if advice is not None:
                out.append(advice)
        return out


def burstiness(increments: list[tuple[float, float, float, Any]], rate: float) -> float | None:
    """Index of dispersion of arrivals from each process's consecutive intervals: for
    Poisson arrivals at `rate` per process, (r₁ − r₂)² / (rate · (1/d₁ + 1/d₂)) averages 1
    (rᵢ the rate over an interval of dᵢ seconds); bursts raise it. Consecutive pairs only,
    so a slow change of the load does not count. None with fewer than 3 pairs."""
    if rate <= 0:
        return None
    last: dict[Any, tuple[float, float]] = {}
    terms = []
    for _, seconds, n, key in increments:
        if seconds <= 0:
            continue
        previous = last.get(key)
        last[key] = (seconds, n)
        if previous is not None:
            d1, n1 = previous
            terms.append((n1 / d1 - n / seconds) ** 2 / (rate * (1 / d1 + 1 / seconds)))
    return sum(terms) / len(terms) if len(terms) >= 3 else None


def _advise(
    name: str,
    samples: list[Sample],
    bounds: tuple[float, ...],
    increments: list[tuple[float, float, float, Any]],
    target: Target,
) -> Advice | None:
    if len(samples) < 2:
        return None
    first, last = samples[0], samples[-1]
    seconds = last.at - first.at
    if seconds <= 0:
        return None
    checkouts = last.checkouts - first.checkouts
    # The processes over the window, not only now: a worker that joined half-way served
    # half the time.
    processes = max(1, round(sum(s.processes for s in samples) / len(samples)))
    size = None
    if last.max_connections is not None and last.processes > 0:
        size = max(1, math.floor(last.max_connections / last.processes + 0.5))
    measured = None
    if len(first.wait_counts) == len(last.wait_counts) == len(bounds) + 1 and bounds:
        counts = [b - a for a, b in zip(first.wait_counts, last.wait_counts, strict=True)]
        measured = measured_wait(bounds, counts, last.wait_sum - first.wait_sum)
    rates, holds = _intervals(samples, processes)
    return advise(
        name,
        processes=processes,
        size=size,
        checkouts=checkouts,
        seconds=seconds,
        hold_seconds=last.hold_sum - first.hold_sum,
        target=target,
        measured_p_wait=measured[0] if measured else None,
        measured_mean_wait_s=measured[1] if measured else None,
        burstiness=burstiness(increments, checkouts / seconds / processes),
        interval_rates=rates,
        interval_holds=holds,
    )


def _intervals(samples: list[Sample], processes: int) -> tuple[list[float], list[float]]:
    """Per `INTERVAL_S` interval: arrival rate per process and mean hold."""
    rates: list[float] = []
    holds: list[float] = []
    start = samples[0]
    for sample in samples[1:]:
        if sample.at - start.at < INTERVAL_S:
            continue
        n = sample.checkouts - start.checkouts
        if n > 0:
            rates.append(n / (sample.at - start.at) / processes)
            holds.append((sample.hold_sum - start.hold_sum) / n)
        start = sample
    return rates, holds


POOL_LABEL = "db_client_connection_pool_name"

#: `pool_monitor_advice_*` gauges: (name suffix, help, Advice → value or None).
_GAUGES: tuple[tuple[str, str, Any], ...] = (
    (
        "processes",
        "Worker processes serving the pool now: the advice divides its load among them.",
        lambda a: a.processes,
    ),
    (
        "arrival_rate",
        "Checkouts per second per process over the advice window (λ).",
        lambda a: a.arrival_rate,
    ),
    (
        "mean_hold_seconds",
        "Mean time a checkout held its connection over the advice window (W).",
        lambda a: a.mean_hold_s,
    ),
    (
        "offered_load",
        "Connections in use on average per process, λW (Erlangs).",
        lambda a: a.offered_load,
    ),
    (
        "predicted_wait_probability",
        "Erlang C: probability that a checkout waits, at the pool's current size.",
        lambda a: a.current.p_wait if a.current else None,
    ),
    (
        "predicted_mean_wait_seconds",
        "Erlang C: mean wait per checkout at the current size (absent when unbounded).",
        lambda a: a.current.mean_wait_s if a.current else None,
    ),
    (
        "measured_wait_probability",
        "Share of the window's checkouts that waited 1 ms or more (from the wait histogram).",
        lambda a: a.measured_p_wait,
    ),
    (
        "measured_mean_wait_seconds",
        "Mean wait per checkout over the window (from the wait histogram).",
        lambda a: a.measured_mean_wait_s,
    ),
    (
        "recommended_max_connections",
        "Smallest per-process pool size meeting the target P(wait) and mean wait.",
        lambda a: a.recommended_size,
    ),
    (
        "model_warnings",
        "Reasons the model may not fit this pool now (see /api/advice for the words).",
        lambda a: len(a.warnings),
    ),
)


class AdviceCollector:
    """`pool_monitor_advice_*`: the window's advice per pool, computed at scrape time
    from memory (no I/O)."""

    def __init__(self, window: AdviceWindow) -> None:
        self._window = window

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        advice = self._window.advice()
        for suffix, doc, read in _GAUGES:
            family = GaugeMetricFamily(f"pool_monitor_advice_{suffix}", doc, labels=[POOL_LABEL])
            for a in advice:
                value = read(a)
                if value is not None and math.isfinite(value):
                    family.add_metric([a.pool], value)
            yield family

    def describe(self) -> list[Any]:
        return []


def advice_document(window: AdviceWindow, pg: Any) -> dict[str, Any]:
    """`/api/advice`: per pool, the window's advice; and this pod's connection budget
    against the server's (the sidecar sees one pod: the fleet's sum over replicas is
    `pool-monitor advise --prometheus`'s, or the `fleet:` recording rules')."""
    pools = window.advice()
    current = sum(a.size * a.processes for a in pools if a.size)
    recommended = sum((a.recommended_size or 0) * a.processes for a in pools if a.size)
    usable = None
    if getattr(pg, "up", False) and pg.max_connections is not None:
        usable = pg.max_connections - (pg.reserved_connections or 0)
    return {
        "window_s": window.window_s,
        "target": {"p_wait": window.target.p_wait, "mean_wait_s": window.target.mean_wait_s},
        "pools": [a.to_dict() for a in pools],
        "budget": {
            "pod_max_connections": current,
            "pod_recommended_connections": recommended,
            "server_usable_connections": usable,
            "pods_that_fit_at_current_size": usable // current if usable and current else None,
            "pods_that_fit_at_recommended_size": (
                usable // recommended if usable and recommended else None
            ),
        },
    }
