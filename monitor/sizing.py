"""How big a pool should be: Erlang C on the load we measured, and when not to trust it.

A pool of `c` connections serving checkouts that arrive at rate λ and hold a connection for
W seconds on average is, to a first approximation, an M/M/c queue with offered load
A = λW (Little's law: the mean number of connections in use). Erlang C gives the
probability that a checkout has to wait, and the mean wait; the smallest `c` meeting a
target follows. The model assumes independent (Poisson) arrivals and hold times that do
not depend on the load: `fit_warnings` says when the measurements contradict either, since
then a bigger pool is not the cure (a database that slows down under load holds every
connection longer; a burst needs headroom the average does not show).

Each worker process has its own pool, so the queue is per process: λ is the pool's
arrival rate divided among the processes that serve it, and `c` is one process's maximum
(`pool_size + max_overflow`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

#: The sizes searched for a recommendation; beyond this, advice says "more than".
MAX_SIZE = 1000
#: Checkouts a window needs before its numbers mean anything.
MIN_CHECKOUTS = 100
#: Index of dispersion of arrivals above which they are too bursty for the model.
BURSTY_DISPERSION = 3.0
#: Measured P(wait) this far from the prediction says the model does not fit.
MISFIT_P_WAIT = 0.15
#: Hold time at the busiest windows vs the quietest, above which load slows the holds.
RISING_HOLD_RATIO = 1.5


@dataclass(frozen=True)
class Target:
    """What "big enough" means: P(wait) and the mean wait below these."""

    p_wait: float = 0.01
    mean_wait_s: float = 0.005


@dataclass(frozen=True)
class Prediction:
    """Erlang C for one size: P(wait), the mean wait over all checkouts, and the mean
    wait of those that wait; infinite when the load reaches the size (no steady state)."""

    size: int
    utilisation: float
    p_wait: float
    mean_wait_s: float
    mean_wait_when_waiting_s: float


def erlang_c(size: int, load: float) -> float:
    """P(wait) for `size` servers and offered load `load` (Erlangs); 1 when load ≥ size.

    Through Erlang B's recurrence, B(k) = A·B(k−1) / (k + A·B(k−1)): no factorials, no
    overflow at any size, and exact to floating-point precision."""
    if size <= 0 or load >= size:
        return 1.0
    if load <= 0:
        return 0.0
    b = 1.0
    for k in range(1, size + 1):
        b = load * b / (k + load * b)
    return size * b / (size - load * (1 - b))


def predict(size: int, arrival_rate: float, mean_hold_s: float) -> Prediction:
    """Erlang C's answer for one process's pool of `size` connections."""
    load = arrival_rate * mean_hold_s
    p_wait = erlang_c(size, load)
    if size <= 0 or load >= size:
        return Prediction(size, math.inf if size <= 0 else load / size, 1.0, math.inf, math.inf)
    when_waiting = mean_hold_s / (size - load)
    return Prediction(size, load / size, p_wait, p_wait * when_waiting, when_waiting)


def smallest_size(
    arrival_rate: float,
    mean_hold_s: float,
    target: Target | None = None,
    max_size: int = MAX_SIZE,
) -> int | None:
    """The smallest size whose prediction meets `target`; None if none up to `max_size`."""
    target = target or Target()
    load = arrival_rate * mean_hold_s
    for size in range(max(1, math.floor(load) + 1), max_size + 1):
        p = predict(size, arrival_rate, mean_hold_s)
        if p.p_wait < target.p_wait and p.mean_wait_s < target.mean_wait_s:
            return size
    return None


def dispersion(counts: Sequence[float]) -> float | None:
    """Index of dispersion of arrivals per interval (variance / mean): 1 for Poisson
    arrivals, above for bursts. The variance is Allan's (half the mean squared difference
    of consecutive intervals), so a slow drift of the load over the window (a morning
    ramp) does not count as burstiness; None for fewer than 3 intervals or no arrivals."""
    if len(counts) < 3:
        return None
    mean = sum(counts) / len(counts)
    if mean <= 0:
        return None
    diffs = [(b - a) ** 2 for a, b in pairwise(counts)]
    return (sum(diffs) / len(diffs) / 2) / mean


def hold_growth(rates: Sequence[float], holds: Sequence[float]) -> tuple[float, float] | None:
    """Mean hold time in the busiest third of the intervals and in the quietest third
    (by arrival rate), or None with fewer than 6 intervals or no spread in the load."""
    pairs = sorted((r, h) for r, h in zip(rates, holds, strict=True) if r > 0)
    if len(pairs) < 6 or pairs[-1][0] < 1.5 * pairs[0][0]:
        return None
    third = len(pairs) // 3
    quiet = sum(h for _, h in pairs[:third]) / third
    busy = sum(h for _, h in pairs[-third:]) / third
    return quiet, busy


@dataclass
class Advice:
    """Sizing advice for one pool, per process, from one window of measurements."""

    pool: str
    processes: int
    size: int | None  # one process's max connections (None: not a sized pool)
    checkouts: float
    arrival_rate: float  # per process, checkouts per second
    mean_hold_s: float
    offered_load: float  # per process, Erlangs
    target: Target
    current: Prediction | None
    recommended_size: int | None
    measured_p_wait: float | None = None
    measured_mean_wait_s: float | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        current = self.current
        return {
            "pool": self.pool,
            "processes": self.processes,
            "size": self.size,
            "checkouts": self.checkouts,
            "arrival_rate": self.arrival_rate,
            "mean_hold_s": self.mean_hold_s,
            "offered_load": self.offered_load,
            "target": {"p_wait": self.target.p_wait, "mean_wait_s": self.target.mean_wait_s},
            "predicted_p_wait": current.p_wait if current else None,
            "predicted_mean_wait_s": _finite(current.mean_wait_s) if current else None,
            "utilisation": _finite(current.utilisation) if current else None,
            "recommended_size": self.recommended_size,
            "measured_p_wait": self.measured_p_wait,
            "measured_mean_wait_s": self.measured_mean_wait_s,
            "warnings": list(self.warnings),
        }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def advise(
    pool: str,
    *,
    processes: int,
    size: int | None,
    checkouts: float,
    seconds: float,
    hold_seconds: float,
    target: Target | None = None,
    measured_p_wait: float | None = None,
    measured_mean_wait_s: float | None = None,
    interval_counts: Sequence[float] = (),
    interval_rates: Sequence[float] = (),
    interval_holds: Sequence[float] = (),
    burstiness: float | None = None,
) -> Advice:
    """Advice from one window: `checkouts` made and `hold_seconds` held over `seconds`
    by `processes` processes whose pools have `size` connections each. The interval
    series (arrivals per interval, and rate and mean hold per interval) feed the checks
    of the model's assumptions."""
    target = target or Target()
    processes = max(1, processes)
    rate = checkouts / seconds / processes if seconds > 0 else 0.0
    hold = hold_seconds / checkouts if checkouts > 0 else 0.0
    current = predict(size, rate, hold) if size else None
    advice = Advice(
        pool=pool,
        processes=processes,
        size=size,
        checkouts=checkouts,
        arrival_rate=rate,
        mean_hold_s=hold,
        offered_load=rate * hold,
        target=target,
        current=current,
        recommended_size=smallest_size(rate, hold, target) if checkouts > 0 else None,
        measured_p_wait=measured_p_wait,
        measured_mean_wait_s=measured_mean_wait_s,
    )
    advice.warnings = fit_warnings(
        advice, interval_counts, interval_rates, interval_holds, burstiness
    )
    return advice


def fit_warnings(
    advice: Advice,
    interval_counts: Sequence[float] = (),
    interval_rates: Sequence[float] = (),
    interval_holds: Sequence[float] = (),
    burstiness: float | None = None,
) -> list[str]:
    """Why the model may not fit these measurements, in words a user can act on.
    `burstiness` is an index of dispersion measured elsewhere (the sidecar's, from each
    process's own intervals); without it, `interval_counts` give one."""
    out: list[str] = []
    if advice.checkouts < MIN_CHECKOUTS:
        out.append(
            f"only {advice.checkouts:.0f} checkouts in the window: too few to size from "
            f"(at least {MIN_CHECKOUTS})"
        )
    if advice.size is None:
        out.append("the pool has no maximum size (NullPool, StaticPool…): nothing to size")
    elif advice.offered_load >= advice.size:
        out.append(
            f"offered load {advice.offered_load:.2f} ≥ {advice.size} connections per process: "
            "checkouts queue without bound (expect pool timeouts); the model has no steady "
            "state here"
        )
    current, measured = advice.current, advice.measured_p_wait
    if (
        current is not None
        and measured is not None
        and advice.checkouts >= MIN_CHECKOUTS
        and abs(measured - current.p_wait) > MISFIT_P_WAIT
    ):
        out.append(
            f"measured P(wait) {measured:.3f} against {current.p_wait:.3f} predicted: the "
            "load does not fit the model here (bursts, or holds that change with load); "
            "trust the measurement"
        )
    index = burstiness if burstiness is not None else dispersion(interval_counts)
    if index is not None and index > BURSTY_DISPERSION:
        out.append(
            f"arrivals are bursty (index of dispersion {index:.1f}, 1 for independent "
            "arrivals): waits will exceed the prediction during bursts; size for the burst "
            "rate, not the mean"
        )
    growth = hold_growth(interval_rates, interval_holds)
    if growth is not None and growth[1] > RISING_HOLD_RATIO * growth[0]:
        out.append(
            f"hold time rises with load ({growth[0] * 1000:.1f} ms in the quietest third of "
            f"the window, {growth[1] * 1000:.1f} ms in the busiest): the database (or what "
            "the code does while holding) is the bottleneck, not the pool; a bigger pool "
            "would add load to it"
        )
    return out


#: A checkout that waited less than this did not queue (a free connection is handed out in
#: microseconds; opening a new one takes milliseconds, but so does any wait worth sizing).
WAITED_S = 0.001


def measured_wait(
    bounds: Sequence[float], counts: Sequence[float], wait_sum: float
) -> tuple[float, float] | None:
    """(share of checkouts that waited ≥ `WAITED_S`, mean wait) from a wait-time histogram
    (per-bucket counts, not cumulative, over the window); None without checkouts."""
    total = sum(counts)
    if total <= 0:
        return None
    waited = sum(c for i, c in enumerate(counts) if i > 0 and bounds[i - 1] >= WAITED_S)
    return waited / total, wait_sum / total
