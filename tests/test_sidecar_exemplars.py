"""Exemplars end to end (issue 14): two traced worker processes and an untraced one on the
real PostgreSQL, the real `pool-monitor sidecar`, and a real Prometheus with exemplar
storage scraping it. `/api/v1/query_exemplars` must name the trace of the hold the test
made slow on purpose; where two workers offer an exemplar for one bucket, the slower wins;
an untraced pool has none; and a scraper that does not ask for OpenMetrics gets valid
plain text without them."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from dashboards.promharness import ScrapeTarget, running_prometheus
from tests.conftest import require_binary
from tests.helpers import spawn_sidecar, spawn_worker
from tests.test_sidecar_e2e import _readline, free_port, stop_sidecar, wait_for

ROOT = Path(__file__).resolve().parents[1]
USE = "db_client_connection_use_time_seconds"
POOL_LABEL = "db_client_connection_pool_name"
OPENMETRICS = "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5"
#: Each worker's holds: (seconds, traced). The slow one lands alone in le=0.5; in le=0.1
#: worker "b"'s 0.08 s must win over worker "a"'s 0.06 s in the merge.
HOLDS = {
    "a": [(0.3, True), (0.06, True), (0.001, False), (0.001, False)],
    "b": [(0.08, True), (0.001, False)],
    "plain": [(0.06, False), (0.001, False)],
}


def worker(argv: list[str]) -> int:
    """Hold connections as `spec["holds"]` says, under a span when traced, print the
    spans' ids, then wait to be told to exit (the snapshot files stay fresh)."""
    from opentelemetry.sdk.trace import TracerProvider

    import monitor

    spec = json.loads(argv[0])
    engine = sa.create_engine(spec["url"], pool_size=2)
    monitor.instrument(
        engine, pool_name=spec["pool"], snapshot_dir=spec["dir"], snapshot_interval=0.2
    )
    tracer = TracerProvider().get_tracer("exemplar-test")
    traces = []
    for seconds, traced in spec["holds"]:
        span = tracer.start_span("request") if traced else None
        token = None
        if span is not None:
            from opentelemetry import context, trace

            token = context.attach(trace.set_span_in_context(span))
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            time.sleep(seconds)
        if span is not None:
            context.detach(token)
            span.end()
            ctx = span.get_span_context()
            traces.append(
                {
                    "seconds": seconds,
                    "trace_id": f"{ctx.trace_id:032x}",
                    "span_id": f"{ctx.span_id:016x}",
                }
            )
    print(json.dumps(traces), flush=True)
    sys.stdin.readline()
    engine.dispose()
    return 0


class Pod:
    def __init__(self, http: httpx.Client, address: str, traces: dict[str, list[Any]]) -> None:
        self.http = http
        self.address = address
        self.traces = traces

    def trace(self, worker: str, seconds: float) -> dict[str, Any]:
        return next(t for t in self.traces[worker] if t["seconds"] == seconds)


@pytest.fixture(scope="module")
def pod(database_url: str) -> Iterator[Pod]:
    tmp = Path(tempfile.mkdtemp(prefix="pool-monitor-exemplars-"))
    snapdir = tmp / "snapshots"
    snapdir.mkdir()
    port = free_port()
    log = tmp / "sidecar.log"
    log_file = open(log, "wb")  # noqa: SIM115 - the process writes it until the end
    sidecar = spawn_sidecar(snapdir, port, log_file, "--scan-interval", "0.1")
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5)
    workers: dict[str, subprocess.Popen[str]] = {}
    try:
        traces = {}
        for name, holds in HOLDS.items():
            pool = "plain" if name == "plain" else "orders"
            spec = {"url": database_url, "dir": str(snapdir), "pool": pool, "holds": holds}
            workers[name] = spawn_worker("tests.test_sidecar_exemplars", spec)
        for name, proc in workers.items():
            traces[name] = json.loads(_readline(proc.stdout, 60))  # type: ignore[arg-type]

        def merged() -> bool:
            try:
                text = http.get("/metrics").text
            except httpx.TransportError:
                assert sidecar.poll() is None, log.read_text()
                return False
            return (
                'sqlalchemy_pool_checkouts_total{db_client_connection_pool_name="orders"} 6.0'
                in text
            )

        wait_for(merged, 30, "the sidecar to merge both traced workers")
        yield Pod(http, f"127.0.0.1:{port}", traces)
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                proc.communicate("exit\n", timeout=20)
        stop_sidecar(sidecar, http, log_file, tmp)


def _exemplars(text: str, pool: str) -> dict[str, Any]:
    """{le: exemplar} of the use-time histogram of `pool` in an OpenMetrics exposition."""
    [family] = [f for f in openmetrics_families(text) if f.name == USE]
    return {
        s.labels["le"]: s.exemplar
        for s in family.samples
        if s.labels.get(POOL_LABEL) == pool and s.exemplar is not None
    }


def test_openmetrics_exposition_has_the_merged_exemplars(pod: Pod) -> None:
    response = pod.http.get("/metrics", headers={"Accept": OPENMETRICS})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n") and response.text.count("# EOF") == 1
    orders = _exemplars(response.text, "orders")
    assert sorted(orders) == ["0.1", "0.5"]
    slow, a_fast, b_fast = pod.trace("a", 0.3), pod.trace("a", 0.06), pod.trace("b", 0.08)
    assert orders["0.5"].labels == {"trace_id": slow["trace_id"], "span_id": slow["span_id"]}
    assert 0.3 <= orders["0.5"].value < 0.5
    # Both workers offered one for le=0.1: the slower (b's 0.08 s) wins the merge.
    assert orders["0.1"].labels["trace_id"] == b_fast["trace_id"] != a_fast["trace_id"]
    assert 0.08 <= orders["0.1"].value <= 0.1
    assert _exemplars(response.text, "plain") == {}  # no span, no exemplar


def test_plain_text_for_scrapers_that_do_not_ask(pod: Pod) -> None:
    hostile = pod.http.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=abc"}
    )
    assert hostile.status_code == 200 and hostile.headers["content-type"].startswith("text/plain")
    response = pod.http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "trace_id" not in response.text and "# EOF" not in response.text
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    counts = {
        s.labels[POOL_LABEL]: s.value for s in families[USE].samples if s.name == f"{USE}_count"
    }
    assert counts == {"orders": 6.0, "plain": 2.0}


def test_prometheus_stores_the_slow_holds_trace(pod: Pod) -> None:
    binary = require_binary("prometheus")
    started = time.time()
    slow, b_fast = pod.trace("a", 0.3), pod.trace("b", 0.08)
    with running_prometheus(
        [ScrapeTarget("pool-monitor", pod.address)],
        rule_files={},
        features=("exemplar-storage",),
        binary=binary,
    ) as prom:
        query = f'{USE}_bucket{{{POOL_LABEL}="orders"}}'

        def stored() -> dict[str, list[dict[str, Any]]] | None:
            found = {
                series["seriesLabels"]["le"]: series["exemplars"]
                for series in prom.exemplars(query, started - 60, time.time() + 60)
            }
            return found if {"0.1", "0.5"} <= set(found) else None

        found = prom.wait_for(stored, "the exemplars of both buckets", timeout=30)
        assert {e["labels"]["trace_id"] for e in found["0.5"]} == {slow["trace_id"]}
        [exemplar] = {json.dumps(e, sort_keys=True): e for e in found["0.5"]}.values()
        assert exemplar["labels"] == {"trace_id": slow["trace_id"], "span_id": slow["span_id"]}
        assert 0.3 <= float(exemplar["value"]) < 0.5
        assert {e["labels"]["trace_id"] for e in found["0.1"]} == {b_fast["trace_id"]}
        plain = prom.exemplars(f'{USE}_bucket{{{POOL_LABEL}="plain"}}', started - 60, time.time())
        assert plain == []


# -- the merge and the schema, without processes -----------------------------------------
def _exemplar(value: float, at: float, n: int) -> dict[str, Any]:
    return {"value": value, "timestamp": at, "trace_id": f"{n:032x}", "span_id": f"{n:016x}"}


def _with_exemplars(document: dict[str, Any], exemplars: dict[int, dict[str, Any]]) -> None:
    hist = document["pools"][0]["histograms"]["db.client.connection.use_time"]
    hist["exemplars"] = [exemplars.get(i) for i in range(len(hist["counts"]))]


def test_merge_keeps_the_slowest_recent_exemplar_per_bucket() -> None:
    from monitor.sidecar import merge

    hist = {"bounds": [0.1], "counts": [1, 1], "sum": 0.3}
    acc: dict[str, Any] = {}
    merge.add_histogram(acc, "h", {**hist, "exemplars": [_exemplar(0.06, 1000.0, 1), None]})
    merge.add_histogram(acc, "h", {**hist, "exemplars": [_exemplar(0.08, 1001.0, 2), None]})
    merge.add_histogram(acc, "h", {**hist, "exemplars": [_exemplar(0.07, 1002.0, 3), None]})
    assert [e and e["trace_id"][-1] for e in acc["h"]["exemplars"]] == ["2", None]
    # Newer by more than the window: wins whatever its value.
    late = 1001.0 + merge.EXEMPLAR_WINDOW_S + 1
    merge.add_histogram(acc, "h", {**hist, "exemplars": [None, _exemplar(0.2, late, 4)]})
    merge.add_histogram(acc, "h", {**hist, "exemplars": [_exemplar(0.01, late, 5), None]})
    assert [e["trace_id"][-1] for e in acc["h"]["exemplars"]] == ["5", "4"]
    # Older than the kept one by more than the window: loses, however slow.
    merge.add_histogram(acc, "h", {**hist, "exemplars": [_exemplar(0.09, 1000.0, 6), None]})
    assert acc["h"]["exemplars"][0]["trace_id"][-1] == "5"
    assert acc["h"]["counts"] == [6, 6]
    copied = merge.copy_totals(acc)
    copied["h"]["exemplars"][0] = None
    assert acc["h"]["exemplars"][0] is not None  # a copy to add into, not a view


def test_exited_workers_counts_stay_but_their_exemplars_go(tmp_path: Path) -> None:
    from monitor.sidecar.aggregate import Aggregator
    from tests.test_sidecar_merge import Clock, by_pool, doc, pool, put

    clock = Clock()
    live = doc(1, [pool("api", 3)], 1000.0)
    _with_exemplars(live, {5: _exemplar(0.02, 999.0, 1)})
    gone = doc(2, [pool("api", 4)], 1000.0, exited=True)
    _with_exemplars(gone, {5: _exemplar(0.024, 999.5, 2), 7: _exemplar(0.09, 999.5, 2)})
    put(tmp_path, 1, live)
    path = put(tmp_path, 2, gone)
    agg = Aggregator(str(tmp_path), clock=clock, retain_dead_s=5.0)
    view = agg.scan()
    exemplars = by_pool(view)["api"]["histograms"]["db.client.connection.use_time"]["exemplars"]
    assert {i: e["trace_id"][-1] for i, e in enumerate(exemplars) if e} == {5: "2", 7: "2"}
    path.unlink()  # the exited worker's file is cleaned up: its totals are retained
    for _ in range(4):
        clock.now += 2.0
        put(tmp_path, 1, {**live, "written_at": clock.now})  # worker 1 lives on
        view = agg.scan()
    assert len(agg.procs) == 1
    api = by_pool(view)["api"]
    assert api["counters"]["sqlalchemy.pool.checkouts"] == 7
    exemplars = api["histograms"]["db.client.connection.use_time"]["exemplars"]
    assert {i: e["trace_id"][-1] for i, e in enumerate(exemplars) if e} == {5: "1"}


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        ({"trace_id": "<script>alert(1)</script>" + "0" * 7}, "trace_id"),
        ({"trace_id": "A" * 32}, "trace_id"),
        ({"span_id": "0" * 17}, "span_id"),
        ({"value": -1.0}, "value"),
        ({"timestamp": float("nan")}, "timestamp"),
    ],
)
def test_hostile_exemplars_are_rejected(
    tmp_path: Path, change: dict[str, Any], detail: str, caplog: pytest.LogCaptureFixture
) -> None:
    from monitor.sidecar.aggregate import Aggregator
    from tests.test_sidecar_merge import Clock, doc, pool, put

    document = doc(1, [pool("api", 3)], 1000.0)
    _with_exemplars(document, {5: {**_exemplar(0.02, 999.0, 1), **change}})
    put(tmp_path, 1, json.dumps(document, allow_nan=True).encode())
    view = Aggregator(str(tmp_path), clock=Clock()).scan()
    assert {k: n for k, n in view.errors.items() if n} == {"invalid": 1}
    assert view.pools == []
    [message] = [r.getMessage() for r in caplog.records if "skipping snapshot" in r.message]
    assert f"invalid: pools[0].histograms.db.client.connection.use_time.exemplars[5].{detail}" in (
        message
    )


def test_an_exemplar_list_of_the_wrong_length_is_rejected(tmp_path: Path) -> None:
    from monitor.sidecar import files
    from tests.test_sidecar_merge import doc, pool, put

    document = doc(1, [pool("api", 3)], 1000.0)
    hist = document["pools"][0]["histograms"]["db.client.connection.use_time"]
    hist["exemplars"] = [None, None]
    path = put(tmp_path, 1, document)
    with pytest.raises(files.Rejected, match=r"has 2 exemplars for 18 buckets"):
        files.read(str(path))


_EXEMPLARS = st.lists(
    st.tuples(st.floats(0, 10, allow_nan=False), st.floats(1e9, 1e9 + 120, allow_nan=False)),
    min_size=1,
    max_size=8,
)


@given(_EXEMPLARS, st.randoms())
def test_the_merged_exemplar_does_not_depend_on_the_order_of_workers(
    offered: list[tuple[float, float]], rng: Any
) -> None:
    from monitor.sidecar import merge

    def merged(order: list[int]) -> Any:
        acc: dict[str, Any] = {}
        for i in order:
            value, at = offered[i]
            hist = {"bounds": [], "counts": [1], "sum": value}
            merge.add_histogram(acc, "h", {**hist, "exemplars": [_exemplar(value, at, i + 1)]})
        return acc["h"]["exemplars"][0]

    order = list(range(len(offered)))
    shuffled = order[:]
    rng.shuffle(shuffled)
    assert merged(order) == merged(shuffled)
