"""One view over every worker process of the demo service, from the runner's side.

With `uvicorn --workers 2` each worker has its own pools and monitor, and a request reaches
whichever worker accepts the connection. The sampler asks `/demo/monitor` over a *fresh*
connection each time (no keep-alive, so the kernel spreads them over the workers), keeps
the latest answer per worker pid, and merges them. `fresh(after=t)` waits until every
worker has answered since `t`: that is how a variant's "after" snapshot is known to include
all of its requests. The same polling, run in the background, gives the pool-usage
timeline for the chart, and every exemplar the workers' histograms showed
(`exemplars`): each bucket keeps its slowest traced observation for the monitor's
`exemplar_window` (15 s) unless a slower one replaces it, so polls ten times a second see
each one, and the report finds each variant's slowest traced hold among them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from demo_app import snapshots
from demo_app.clients import ensure_loopback


@dataclass(frozen=True)
class WorkerSample:
    pid: int
    time: float
    pools: dict[str, dict[str, Any]]
    jobs: dict[str, dict[str, int]]


@dataclass
class TimelinePoint:
    time: float
    pools: dict[str, dict[str, float]]  # pool -> used / idle / max / pending, all workers


@dataclass
class Span:
    label: str
    start: float
    end: float | None = None


#: The histograms whose exemplars are kept.
EXEMPLAR_HISTOGRAMS = (snapshots.USE_TIME, snapshots.WAIT_TIME)


def exemplars_of(sample: WorkerSample) -> list[dict[str, Any]]:
    """The exemplars in one worker's snapshot, flattened: pool, histogram, pid, value,
    timestamp (unix), trace_id, span_id."""
    out = []
    for pool, snap in sample.pools.items():
        for name in EXEMPLAR_HISTOGRAMS:
            hist = (snap.get("histograms") or {}).get(name) or {}
            for exemplar in hist.get("exemplars") or ():
                if isinstance(exemplar, dict) and exemplar.get("trace_id"):
                    out.append({"pool": pool, "histogram": name, "pid": sample.pid, **exemplar})
    return out


@dataclass
class MonitorSampler:
    base_url: str
    workers: int
    latest: dict[int, WorkerSample] = field(default_factory=dict)
    timeline: list[TimelinePoint] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    #: Every distinct exemplar seen (see `exemplars_of`), oldest first.
    exemplars: list[dict[str, Any]] = field(default_factory=list)
    #: (time, merged snapshots) when every worker first answered: the run's start.
    baseline: tuple[float, dict[str, Any]] | None = None
    _seen: set[tuple[Any, ...]] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self._http = httpx.AsyncClient(
            base_url=ensure_loopback(self.base_url),
            timeout=httpx.Timeout(5.0),
            limits=httpx.Limits(max_keepalive_connections=0, max_connections=4),
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def poll(self) -> WorkerSample | None:
        """Ask one (kernel-chosen) worker; a busy or restarting worker just returns None."""
        try:
            response = await self._http.get("/demo/monitor")
            response.raise_for_status()
            data = response.json()
        except (httpx.HTTPError, ValueError):
            return None
        sample = WorkerSample(int(data["pid"]), float(data["time"]), data["pools"], data["jobs"])
        self.latest[sample.pid] = sample
        self.keep_exemplars(sample)
        self.timeline.append(TimelinePoint(sample.time, self.gauges()))
        return sample

    def keep_exemplars(self, sample: WorkerSample) -> None:
        for exemplar in exemplars_of(sample):
            key = tuple(exemplar.get(k) for k in ("pid", "pool", "histogram", "span_id"))
            key += (exemplar.get("timestamp"), exemplar.get("value"))
            if key not in self._seen:
                self._seen.add(key)
                self.exemplars.append(exemplar)

    async def fresh(self, after: float | None = None, timeout_s: float = 15.0) -> bool:
        """Poll until `workers` workers answered at or after `after` (default: now)."""
        after = time.time() if after is None else after
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            await self.poll()
            recent = [s for s in self.latest.values() if s.time >= after]
            if len(recent) >= self.workers:
                return True
            await asyncio.sleep(0.02)
        return False

    def _live(self) -> list[WorkerSample]:
        """The newest `workers` samples: a worker that was replaced drops out."""
        ordered = sorted(self.latest.values(), key=lambda s: s.time, reverse=True)
        return ordered[: self.workers]

    def merged(self) -> dict[str, snapshots.Snapshot]:
        """Every pool's snapshot summed over the live workers."""
        by_pool: dict[str, list[dict[str, Any]]] = {}
        for sample in self._live():
            for name, snap in sample.pools.items():
                by_pool.setdefault(name, []).append(snap)
        return {name: snapshots.merge(snaps) or {} for name, snaps in by_pool.items()}

    def newest_time(self) -> float:
        """When the newest live sample was taken (the time `merged()` is as of)."""
        return max((s.time for s in self._live()), default=time.time())

    def gauges(self) -> dict[str, dict[str, float]]:
        return {name: snapshots.gauges(snap) for name, snap in self.merged().items()}

    def jobs(self) -> dict[str, dict[str, int]]:
        """Background-job counters (`in_flight`, `ok`, `failed`) per variant, all workers."""
        out: dict[str, dict[str, int]] = {}
        for sample in self._live():
            for counter, per_variant in sample.jobs.items():
                if counter == "failure_types":
                    continue
                for variant, n in per_variant.items():
                    slot = out.setdefault(variant, {"in_flight": 0, "ok": 0, "failed": 0})
                    slot[counter] = slot.get(counter, 0) + n
        return out

    async def run(self, stop: asyncio.Event, interval_s: float = 0.1) -> None:
        """Sample in the background until `stop` is set (the pool-usage timeline)."""
        while not stop.is_set():
            await self.poll()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_s)

    def mark(self, label: str) -> Span:
        span = Span(label, time.time())
        self.spans.append(span)
        return span
