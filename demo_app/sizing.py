"""Erlang C checked against measurement: drive one pool at known loads, compare.

Open-loop Poisson arrivals (each checkout starts on schedule, whether or not earlier ones
got a connection, as requests arrive at a service) hold a connection for an exponential
time with a set mean, on a real pool of `size` connections. The monitor measures the
arrival rate, the mean hold and the wait-time histogram; `monitor.sizing` predicts P(wait)
and the mean wait from the measured rate and hold. The demo report and the tests print
the two side by side (`table`).
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from monitor.sizing import Prediction, measured_wait, predict

WAIT = "db.client.connection.wait_time"
USE = "db.client.connection.use_time"
CHECKOUTS = "sqlalchemy.pool.checkouts"


@dataclass(frozen=True)
class Run:
    """One load level: what was asked, what the monitor measured, what Erlang C says."""

    size: int
    target_load: float
    arrival_rate: float  # measured, per second
    mean_hold_s: float  # measured
    checkouts: int
    measured_p_wait: float
    measured_mean_wait_s: float
    predicted: Prediction

    @property
    def offered_load(self) -> float:
        return self.arrival_rate * self.mean_hold_s


def _totals(pm: Any) -> tuple[float, float, list[float], float, tuple[float, ...]]:
    snap = pm.snapshot()
    wait = snap["histograms"][WAIT]
    return (
        snap["counters"][CHECKOUTS],
        snap["histograms"][USE]["sum"],
        list(wait["counts"]),
        wait["sum"],
        tuple(wait["bounds"]),
    )


def drive(
    engine: sa.Engine,
    pm: Any,
    *,
    size: int,
    load: float,
    mean_hold_s: float,
    duration_s: float,
    seed: int = 0,
) -> Run:
    """Offer `load` Erlangs (rate = load / mean hold) to `engine`'s pool for `duration_s`,
    and measure through `pm` (the engine's monitor) only what happened in between."""
    rng = random.Random(seed)
    rate = load / mean_hold_s

    def request(hold_s: float) -> None:
        with engine.connect():
            time.sleep(hold_s)

    before = _totals(pm)
    started = time.perf_counter()
    # Enough threads that arrivals never queue for a thread, only for a connection.
    with ThreadPoolExecutor(max_workers=max(32, size * 8)) as pool:
        due = started
        while True:
            due += rng.expovariate(rate)
            if due - started >= duration_s:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(request, rng.expovariate(1.0 / mean_hold_s))
    elapsed = time.perf_counter() - started
    after = _totals(pm)
    checkouts = after[0] - before[0]
    counts = [b - a for a, b in zip(before[2], after[2], strict=True)]
    measured = measured_wait(after[4], counts, after[3] - before[3]) or (0.0, 0.0)
    arrival_rate = checkouts / elapsed
    hold = (after[1] - before[1]) / checkouts if checkouts else 0.0
    return Run(
        size=size,
        target_load=load,
        arrival_rate=arrival_rate,
        mean_hold_s=hold,
        checkouts=int(checkouts),
        measured_p_wait=measured[0],
        measured_mean_wait_s=measured[1],
        predicted=predict(size, arrival_rate, hold),
    )


def warm(engine: sa.Engine, size: int) -> None:
    """Open all `size` connections first: a connect inside the window would count as wait."""
    connections = [engine.connect() for _ in range(size)]
    for conn in connections:
        conn.close()


def table(runs: list[Run]) -> list[dict[str, Any]]:
    """The predicted-vs-measured rows, rounded for a report."""
    return [
        {
            "size": r.size,
            "offered_load": round(r.offered_load, 2),
            "arrival_rate": round(r.arrival_rate, 1),
            "mean_hold_ms": round(r.mean_hold_s * 1000, 1),
            "checkouts": r.checkouts,
            "p_wait_predicted": round(r.predicted.p_wait, 3),
            "p_wait_measured": round(r.measured_p_wait, 3),
            "mean_wait_ms_predicted": round(r.predicted.mean_wait_s * 1000, 2),
            "mean_wait_ms_measured": round(r.measured_mean_wait_s * 1000, 2),
        }
        for r in runs
    ]


def markdown(rows: list[dict[str, Any]]) -> str:
    """`table()` rows as a Markdown table."""
    head = (
        "| size | load (Erlangs) | λ /s | W ms | checkouts | P(wait) predicted | measured "
        "| mean wait ms predicted | measured |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    return head + "".join(
        f"| {r['size']} | {r['offered_load']} | {r['arrival_rate']} | {r['mean_hold_ms']} | "
        f"{r['checkouts']} | {r['p_wait_predicted']} | {r['p_wait_measured']} | "
        f"{r['mean_wait_ms_predicted']} | {r['mean_wait_ms_measured']} |\n"
        for r in rows
    )
