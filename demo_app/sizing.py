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


#: The validation's pool: small, so a few seconds per load show real queueing.
VALIDATION_SIZE = 4
VALIDATION_HOLD_S = 0.04
VALIDATION_LOADS = (1.0, 2.0, 3.0)


def validate(database_url: str, duration_s: float) -> list[Run]:
    """Drive a fresh pool of `VALIDATION_SIZE` at each of `VALIDATION_LOADS`."""
    import monitor

    engine = sa.create_engine(
        database_url, pool_size=VALIDATION_SIZE, max_overflow=0, pool_timeout=60
    )
    pm = monitor.instrument(
        engine, pool_name="sizing-validation", code_sites=False, long_held_threshold=0
    )
    try:
        warm(engine, VALIDATION_SIZE)
        return [
            drive(
                engine,
                pm,
                size=VALIDATION_SIZE,
                load=load,
                mean_hold_s=VALIDATION_HOLD_S,
                duration_s=duration_s,
                seed=i,
            )
            for i, load in enumerate(VALIDATION_LOADS)
        ]
    finally:
        monitor.uninstrument(engine)
        engine.dispose()


def pool_advice(
    before: dict[str, Any], after: dict[str, Any], seconds: float, workers: int
) -> list[dict[str, Any]]:
    """The demo's own pools over its run (merged snapshots of every worker at the start
    and the end): what `monitor.sizing` advises, with the measured waits."""
    from monitor.sizing import advise

    out = []
    for name in sorted(after):
        end, start = after[name], before.get(name) or {}
        checkouts = end["counters"][CHECKOUTS] - (start.get("counters") or {}).get(CHECKOUTS, 0)
        use_end, use_start = end["histograms"][USE], (start.get("histograms") or {}).get(USE)
        wait_end = end["histograms"][WAIT]
        wait_start = (start.get("histograms") or {}).get(WAIT)
        counts = list(wait_end["counts"])
        wait_sum = wait_end["sum"]
        if wait_start:
            counts = [a - b for a, b in zip(counts, wait_start["counts"], strict=True)]
            wait_sum -= wait_start["sum"]
        measured = measured_wait(wait_end["bounds"], counts, wait_sum)
        maximum = (end.get("gauges") or {}).get("db.client.connection.max")
        size = round(maximum / workers) if maximum else None
        advice = advise(
            name,
            processes=workers,
            size=size,
            checkouts=checkouts,
            seconds=seconds,
            hold_seconds=use_end["sum"] - (use_start["sum"] if use_start else 0.0),
            measured_p_wait=measured[0] if measured else None,
            measured_mean_wait_s=measured[1] if measured else None,
        )
        out.append(advice.to_dict())
    return out


def advice_markdown(rows: list[dict[str, Any]]) -> str:
    """`pool_advice()` rows as a Markdown table, then each pool's warnings."""

    def ms(v: float | None) -> str:
        return "–" if v is None else f"{v * 1000:.1f}"

    def share(v: float | None) -> str:
        return "–" if v is None else f"{v:.3f}"

    lines = [
        "| pool | size / worker | λ /s / worker | W ms | load | P(wait) predicted | measured "
        "| mean wait ms predicted | measured | advised size |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['pool']}` | {r['size'] or '–'} | {r['arrival_rate']:.1f} | "
            f"{r['mean_hold_s'] * 1000:.1f} | {r['offered_load']:.2f} | "
            f"{share(r['predicted_p_wait'])} | {share(r['measured_p_wait'])} | "
            f"{ms(r['predicted_mean_wait_s'])} | {ms(r['measured_mean_wait_s'])} | "
            f"{r['recommended_size'] if r['recommended_size'] is not None else '–'} |"
        )
    notes = [f"- `{r['pool']}`: {w}" for r in rows for w in r["warnings"]]
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"
