"""Sizing advice (issue 15, part 2): Erlang C itself, the model-fit checks, and the advice
checked against measurement on a real pool driven at known loads, through the library, the
sidecar's window and `pool-monitor advise` against a real Prometheus."""

from __future__ import annotations

import io
import json
import math
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, start_http_server

import monitor
from dashboards.promharness import ScrapeTarget, running_prometheus
from demo_app import sizing as load
from monitor import advise as advise_cli
from monitor.exporters.prometheus import register
from monitor.exporters.snapshot import stop_all
from monitor.sidecar.advice import AdviceWindow, advice_document
from monitor.sidecar.aggregate import Aggregator
from monitor.sizing import (
    Target,
    advise,
    dispersion,
    erlang_c,
    hold_growth,
    measured_wait,
    predict,
    smallest_size,
)
from tests.conftest import require_binary
from tests.test_sidecar_e2e import free_port


# -- Erlang C ----------------------------------------------------------------------------
def _erlang_c_exact(size: int, load: Fraction) -> Fraction:
    """The textbook formula, in exact arithmetic."""
    top = load**size / math.factorial(size) * Fraction(size) / (size - load)
    return top / (sum(load**k / math.factorial(k) for k in range(size)) + top)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.fractions(min_value=0, max_value=1, max_denominator=1000))
def test_erlang_c_matches_the_textbook_formula(size: int, share: Fraction) -> None:
    load = share * size
    if load >= size:
        assert erlang_c(size, float(load)) == 1.0
        return
    assert erlang_c(size, float(load)) == pytest.approx(
        float(_erlang_c_exact(size, load)), abs=1e-9
    )


@given(st.integers(1, 200), st.floats(0.01, 0.99))
def test_more_connections_never_wait_more(size: int, utilisation: float) -> None:
    load = utilisation * size
    assert 0.0 <= erlang_c(size + 1, load) <= erlang_c(size, load) <= 1.0


def test_known_values_and_the_smallest_size() -> None:
    assert erlang_c(4, 2.0) == pytest.approx(4 / 23)  # the classic table's 0.1739
    p = predict(4, 50.0, 0.04)  # 2 Erlangs
    assert p.mean_wait_s == pytest.approx(4 / 23 * 0.04 / 2)
    assert p.utilisation == 0.5
    assert predict(4, 100.0, 0.04).mean_wait_s == math.inf  # 4 Erlangs on 4: unbounded
    target = Target(0.01, 0.005)
    size = smallest_size(60.0, 0.05, target)  # 3 Erlangs
    assert size == 9
    ok, short = predict(size, 60.0, 0.05), predict(size - 1, 60.0, 0.05)
    assert ok.p_wait < 0.01 and ok.mean_wait_s < 0.005
    assert not (short.p_wait < 0.01 and short.mean_wait_s < 0.005)
    assert smallest_size(10_000.0, 1.0, target, max_size=100) is None


def test_dispersion_tells_bursts_from_poisson_and_ignores_a_ramp() -> None:
    rng = random.Random(7)

    def poisson(mean: float) -> int:
        n, t = 0, rng.expovariate(1.0)
        while t < mean:
            n += 1
            t += rng.expovariate(1.0)
        return n

    steady = [poisson(50) for _ in range(300)]
    ramp = [poisson(20 + i) for i in range(300)]
    bursts = [poisson(400) if i % 10 == 0 else poisson(10) for i in range(300)]
    assert 0.7 < (dispersion(steady) or 0) < 1.4
    assert 0.7 < (dispersion(ramp) or 0) < 1.4
    assert (dispersion(bursts) or 0) > 10
    assert dispersion([1, 2]) is None and dispersion([0, 0, 0]) is None


def test_hold_growth_and_the_warnings_in_words() -> None:
    rates = [10, 11, 12, 40, 41, 42, 80, 81, 82]
    holds = [0.010, 0.010, 0.010, 0.015, 0.015, 0.015, 0.030, 0.030, 0.030]
    assert hold_growth(rates, holds) == pytest.approx((0.010, 0.030))
    assert hold_growth([10] * 9, holds) is None  # no spread in the load
    advice = advise(
        "api",
        processes=2,
        size=5,
        checkouts=12_000,
        seconds=300,
        hold_seconds=12_000 * 0.02,
        interval_counts=[400 if i % 10 == 0 else 10 for i in range(60)],
        interval_rates=rates,
        interval_holds=holds,
    )
    assert advice.arrival_rate == 20.0 and advice.mean_hold_s == pytest.approx(0.02)
    assert advice.offered_load == pytest.approx(0.4)
    assert advice.warnings[0].startswith("arrivals are bursty (index of dispersion ")
    assert advice.warnings[1] == (
        "hold time rises with load (10.0 ms in the quietest third of the window, 30.0 ms in "
        "the busiest): the database (or what the code does while holding) is the "
        "bottleneck, not the pool; a bigger pool would add load to it"
    )
    few = advise("api", processes=1, size=2, checkouts=50, seconds=10, hold_seconds=50 * 0.5)
    assert few.warnings == [
        "only 50 checkouts in the window: too few to size from (at least 100)",
        "offered load 2.50 ≥ 2 connections per process: checkouts queue without bound "
        "(expect pool timeouts); the model has no steady state here",
    ]
    assert few.to_dict()["predicted_mean_wait_s"] is None  # JSON has no infinity
    misfit = advise(
        "api", processes=1, size=4, checkouts=500, seconds=10, hold_seconds=500 * 0.04,
        measured_p_wait=0.6,
    )  # fmt: skip
    assert misfit.warnings == [
        "measured P(wait) 0.600 against 0.174 predicted: the load does not fit the model "
        "here (bursts, or holds that change with load); trust the measurement"
    ]


def test_burstiness_from_each_process_own_intervals_ignores_publication_jitter() -> None:
    """At 1,000 checkouts/s, documents written about once a second (±0.3 s): the
    scan-to-scan counts of the merged counter would read as wildly bursty; each
    process's own intervals (its `written_at`) read as what they are, Poisson."""
    from monitor.sidecar.advice import burstiness

    rng = random.Random(3)

    def increments(rate: float, bursty: bool) -> list[tuple[float, float, float, Any]]:
        out = []
        for worker in ("w1", "w2"):
            t = 0.0
            for i in range(200):
                seconds = 1.0 + rng.uniform(-0.3, 0.3)
                lam = rate * seconds * (8.0 if bursty and i % 10 == 0 else 1.0)
                n = max(0, round(rng.gauss(lam, math.sqrt(lam))))
                t += seconds
                out.append((t, seconds, float(n), worker))
        return sorted(out)

    steady = burstiness(increments(1000.0, False), 1000.0)
    assert steady is not None and 0.7 < steady < 1.4
    bursts = burstiness(increments(1000.0, True), 1700.0)
    assert bursts is not None and bursts > 10
    assert burstiness([(1.0, 1.0, 5.0, "w")] * 3, 5.0) is None  # too few pairs
    jittered = [
        sum(rng.gauss(1000 * 1.0, 31.6) for _ in range(1)) + rng.choice((-300, 0, 300))
        for _ in range(300)
    ]
    assert (dispersion(jittered) or 0) > 3  # what scan-to-scan counts would have said


def test_measured_wait_counts_waits_of_a_millisecond_or_more() -> None:
    bounds = [0.0005, 0.001, 0.0025, 0.005]
    # 90 immediate, 5 under 1 ms (not a wait), 3 up to 2.5 ms, 2 beyond 5 ms.
    assert measured_wait(bounds, [90, 5, 3, 0, 2], 0.05) == (0.05, 0.0005)
    assert measured_wait(bounds, [0, 0, 0, 0, 0], 0.0) is None


# -- against measurement -----------------------------------------------------------------
SIZE = 4
HOLD_S = 0.04
LOADS = (1.0, 2.0, 3.0)
DURATION_S = 8.0


@dataclass
class Measured:
    runs: list[load.Run]
    spans: list[tuple[float, float]]  # each run's unix start and end
    windows: list[dict[str, Any]]  # the sidecar window's advice at the end of each run
    prometheus_url: str
    prom: Any


@pytest.fixture(scope="module")
def measured(database_url: str) -> Iterator[Measured]:
    binary = require_binary("prometheus")
    snapdir = Path(tempfile.mkdtemp(prefix="pool-monitor-sizing-"))
    engine = sa.create_engine(database_url, pool_size=SIZE, max_overflow=0, pool_timeout=60)
    pm = monitor.instrument(
        engine,
        pool_name="sized",
        code_sites=False,
        long_held_threshold=0,
        snapshot_dir=str(snapdir),
        snapshot_interval=0.2,
    )
    registry = CollectorRegistry()
    register(registry)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    aggregator = Aggregator(str(snapdir))
    window = AdviceWindow(window_s=DURATION_S - 1.0)
    stop = threading.Event()

    def scan() -> None:
        while not stop.wait(0.25):
            window.record(aggregator.scan(), list(aggregator.procs.values()))

    scanner = threading.Thread(target=scan, daemon=True)
    try:
        with running_prometheus(
            [ScrapeTarget("sized", f"127.0.0.1:{port}")], rule_files={}, binary=binary
        ) as prom:
            load.warm(engine, SIZE)
            scanner.start()
            time.sleep(1.5)  # Prometheus sees the counters before the load starts
            runs, spans, windows = [], [], []
            for i, offered in enumerate(LOADS):
                started = time.time()
                runs.append(
                    load.drive(
                        engine,
                        pm,
                        size=SIZE,
                        load=offered,
                        mean_hold_s=HOLD_S,
                        duration_s=DURATION_S,
                        seed=i,
                    )
                )
                spans.append((started, time.time()))
                time.sleep(0.6)  # a snapshot and a scan after the last return
                windows.append(advice_document(window, None))
            time.sleep(2.5)  # two more scrapes
            print("\n" + load.markdown(load.table(runs)))
            yield Measured(runs, spans, windows, prom.url, prom)
    finally:
        stop.set()
        server.shutdown()
        thread.join(5)
        monitor.uninstrument(engine)
        engine.dispose()
        stop_all()
        shutil.rmtree(snapdir, ignore_errors=True)


def test_predicted_wait_matches_measured_wait(measured: Measured) -> None:
    """Erlang C from the measured rate and hold against the measured wait histogram.
    An 8 s run has a few hundred checkouts, and a mean wait is dominated by its few long
    queues: P(wait) within 0.12; the mean wait within a factor of 3 wherever the
    prediction is above 3 ms (several seeds and machine loads: 0.46 to 1.4)."""
    for run in measured.runs:
        assert run.checkouts > 0.6 * run.target_load / HOLD_S * DURATION_S
        assert abs(run.measured_p_wait - run.predicted.p_wait) < 0.12, load.table([run])
        if run.predicted.mean_wait_s > 0.003:
            ratio = run.measured_mean_wait_s / run.predicted.mean_wait_s
            assert 1 / 3 < ratio < 3.0, load.table([run])
    # And the model orders the loads as measurement does.
    p_waits = [r.measured_p_wait for r in measured.runs]
    assert p_waits == sorted(p_waits) and p_waits[-1] > 0.25


def test_the_sidecar_window_agrees_with_the_drive(measured: Measured) -> None:
    for run, document in zip(measured.runs, measured.windows, strict=True):
        [pool] = document["pools"]
        assert pool["pool"] == "sized" and pool["size"] == SIZE and pool["processes"] == 1
        assert pool["arrival_rate"] == pytest.approx(run.arrival_rate, rel=0.2)
        assert pool["mean_hold_s"] == pytest.approx(run.mean_hold_s, rel=0.2)
        assert pool["predicted_p_wait"] == pytest.approx(run.predicted.p_wait, abs=0.12)
        assert pool["recommended_size"] == smallest_size(
            pool["arrival_rate"], pool["mean_hold_s"], Target()
        )
    assert measured.windows[-1]["budget"]["pod_max_connections"] == SIZE


def _cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        status = advise_cli.main(list(argv))
    return status, out.getvalue()


def test_advise_from_prometheus_agrees_with_the_drive(measured: Measured) -> None:
    run = measured.runs[-1]
    start, end = measured.spans[-1]
    span = int(end - start) - 2
    status, out = _cli(
        "--prometheus", measured.prometheus_url, "--range", f"{span}s", "--step", "2s",
        "--end", f"{end - 1:.3f}", "--json",
    )  # fmt: skip
    assert status == 0
    document = json.loads(out)
    [pool] = document["pools"]
    assert pool["pool"] == "sized" and pool["size"] == SIZE and pool["processes"] == 1
    assert pool["arrival_rate"] == pytest.approx(run.arrival_rate, rel=0.25)
    assert pool["mean_hold_s"] == pytest.approx(run.mean_hold_s, rel=0.25)
    assert pool["predicted_p_wait"] == pytest.approx(run.predicted.p_wait, abs=0.15)
    assert pool["measured_p_wait"] == pytest.approx(run.measured_p_wait, abs=0.15)
    assert document["budget"]["fleet_max_connections"] == SIZE

    status, text = _cli(
        "--prometheus", measured.prometheus_url, "--range", f"{span}s", "--step", "2s",
        "--end", f"{end - 1:.3f}",
    )  # fmt: skip
    assert status == 0
    header, _, row = text.splitlines()[:3]
    assert header.split()[:4] == ["pool", "procs", "size", "λ/s/proc"]
    assert row.split()[:3] == ["sized", "1", "4"]
    assert "fleet: 4 connections at the current sizes" in text


def test_advise_says_what_is_wrong(measured: Measured) -> None:
    status, _ = _cli("--prometheus", measured.prometheus_url, "--selector", 'job="nope"')
    assert status == 1
    with pytest.raises(SystemExit):
        _cli("--prometheus", measured.prometheus_url, "--range", "5 minutes")
    with pytest.raises(SystemExit):
        _cli("--prometheus", measured.prometheus_url, "--range", "1m", "--step", "5m")


# -- the sidecar's route and series ------------------------------------------------------
async def test_sidecar_serves_advice_and_its_series(tmp_path: Path) -> None:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from monitor.sidecar.app import create_app
    from monitor.sidecar.config import SidecarConfig
    from monitor.sidecar.runtime import Sidecar
    from tests.test_sidecar_merge import doc, pool, put

    def write(checkouts: int) -> None:
        for pid in (1, 2):
            put(tmp_path, pid, doc(pid, [pool("api", checkouts, size=5)], time.time()))

    config = SidecarConfig(
        snapshot_dir=str(tmp_path), listen_host="127.0.0.1", advice_target_wait_s=0.002
    )
    sidecar = Sidecar(config)
    write(1000)
    sidecar.scan()
    time.sleep(0.5)
    write(3000)
    sidecar.scan()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(create_app(sidecar, manage=False)),
        base_url="http://127.0.0.1",
    ) as http:
        document = (await http.get("/api/advice")).json()
        metrics = (await http.get("/metrics")).text
    [api] = document["pools"]
    seconds = 4000 / 2 / api["arrival_rate"]  # both processes' 2,000 more checkouts
    assert 0.5 <= seconds < 5
    assert api["processes"] == 2 and api["size"] == 5 and api["checkouts"] == 4000
    assert api["mean_hold_s"] == pytest.approx(0.004)
    assert api["measured_p_wait"] == 0.0
    assert api["measured_mean_wait_s"] == pytest.approx(0.0001)
    assert api["recommended_size"] == smallest_size(api["arrival_rate"], 0.004, Target(0.01, 0.002))
    assert document["target"] == {"p_wait": 0.01, "mean_wait_s": 0.002}
    assert document["budget"]["pod_max_connections"] == 10
    samples = {
        s.name: s
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name.startswith("pool_monitor_advice_")
    }
    assert samples["pool_monitor_advice_processes"].value == 2
    assert samples["pool_monitor_advice_processes"].labels == {
        "db_client_connection_pool_name": "api"
    }
    assert samples["pool_monitor_advice_mean_hold_seconds"].value == pytest.approx(0.004)
    assert (
        samples["pool_monitor_advice_recommended_max_connections"].value
        == (api["recommended_size"])
    )
    assert samples["pool_monitor_advice_model_warnings"].value == len(api["warnings"])
