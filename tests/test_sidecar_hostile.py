"""Hostile input to the sidecar ("Sidecar: hostile input cannot freeze, crash, bloat or
leak it"): each file the issue found freezing a view, breaking /metrics or lying about a
number is rejected and counted, while a good worker beside it is merged exactly; sites,
retained pools, holds and answers are bounded; a failing or stuck scan is seen; and 64
workers at the bounds stay within the chart's memory limit (a real sidecar process).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from monitor.sidecar import aggregate, api, files, schema
from monitor.sidecar.aggregate import Aggregator
from monitor.sidecar.config import SidecarConfig
from monitor.sidecar.metrics import Registries
from monitor.sidecar.runtime import Sidecar
from tests.test_sidecar_merge import Clock, by_pool, doc, pool, put

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _good(tmp_path: Path) -> None:
    put(tmp_path, 1, doc(1, [pool("api", 7)], 1000.0))


def _raw(document: dict[str, Any]) -> str:
    return json.dumps(document)


def _swap(old: str, new: str, holds: int = 0) -> bytes:
    """A good document of process 2 with the text `old` replaced by `new`."""
    text = _raw(doc(2, [pool("api", 3, holds=holds)], 1000.0))
    assert old in text
    return text.replace(old, new).encode()


def _with_counter(value: str) -> bytes:
    return _swap('"sqlalchemy.pool.checkouts": 3', f'"sqlalchemy.pool.checkouts": {value}')


HOSTILE: dict[str, tuple[bytes, str]] = {
    "deep nesting": (
        b'{"version": 1, "pools": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "corrupt",
    ),
    "age_s a string": (_swap('"age_s": 1.0', '"age_s": "1.0"', holds=1), "invalid"),
    "gauge a string": (
        _swap('"db.client.connection.max": 5', '"db.client.connection.max": "5"'),
        "invalid",
    ),
    "counter a list": (_with_counter("[1, 2]"), "invalid"),
    "counter 10**400": (_with_counter("1" + "0" * 400), "invalid"),
    "counter Infinity": (_with_counter("Infinity"), "invalid"),
    "counter NaN": (_with_counter("NaN"), "invalid"),
    "negative counter": (_with_counter("-1000000"), "invalid"),
    "unknown version": (_raw({**doc(2, [], 1000.0), "version": 9}).encode(), "unknown_version"),
    "empty": (b"", "truncated"),
    "a million holds": (
        _raw(doc(2, [{**pool("api", 3), "holds": [{}] * 1_000_000}], 1000.0)).encode(),
        "invalid",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_file_is_rejected_and_counted_and_the_good_one_merged(
    tmp_path: Path, clock: Clock, case: str
) -> None:
    body, reason = HOSTILE[case]
    _good(tmp_path)
    put(tmp_path, 2, body)
    agg = Aggregator(str(tmp_path), max_bytes=64 * 1024 * 1024, clock=clock)
    view = agg.scan()
    assert view.errors[reason] == 1, view.errors
    assert by_pool(view)["api"]["counters"]["sqlalchemy.pool.checkouts"] == 7
    registries = Registries(lambda: view, _NoPg())  # type: ignore[arg-type]
    text = registries.exposition().decode()
    values = [ln.rsplit(" ", 1)[1] for ln in text.splitlines() if ln and ln[0] != "#"]
    assert "sqlalchemy_pool_checkouts_total" in text
    assert not {"+Inf", "-Inf", "NaN"} & set(values)  # no number that lies
    clock.now += 1.0
    assert agg.scan().errors[reason] == 1  # once per version of the file, not per scan


def test_fifos_and_symlinks_never_block_a_scan(tmp_path: Path, clock: Clock) -> None:
    _good(tmp_path)
    fifo = tmp_path / "pool-monitor-h-2-1.json"
    os.mkfifo(fifo)  # a plain open() of it blocks until a writer comes: forever
    os.symlink(fifo, tmp_path / "pool-monitor-h-3-1.json")
    os.symlink(tmp_path / "pool-monitor-h-1-1.json", tmp_path / "pool-monitor-h-4-1.json")
    os.mkfifo(tmp_path / "pool-monitor-h-1-1.live")  # a live document that is a FIFO
    view = Aggregator(str(tmp_path), clock=clock).scan()
    assert view.errors["invalid"] == 4, view.errors  # FIFO, 2 symlinks, the FIFO live file
    assert by_pool(view)["api"]["counters"]["sqlalchemy.pool.checkouts"] == 7


def test_sites_per_pool_are_bounded_and_nothing_is_lost(tmp_path: Path, clock: Clock) -> None:
    """The issue's file of 100,000 sites is beyond any writer's `max_sites`: rejected. One
    within it still makes at most the sidecar's `max_sites` series per pool."""
    huge = {f"app.py:{i}:f": 1 for i in range(100_000)}
    put(tmp_path, 3, doc(3, [pool("api", 100_000, sites=huge)], 1000.0))
    sites = {f"app.py:{i}:f": 1 for i in range(5_000)}
    put(tmp_path, 1, doc(1, [pool("api", 5_000, sites=sites)], 1000.0))
    put(tmp_path, 2, doc(2, [pool("api", 5, sites={"late.py:1:g": 5})], 1000.0))
    agg = Aggregator(str(tmp_path), max_bytes=64 * 1024 * 1024, clock=clock, max_sites=50)
    view = agg.scan()
    assert view.errors["invalid"] == 1
    merged = by_pool(view)["api"]["counters"]["sqlalchemy.pool.site_checkouts"]
    assert len(merged) == 51 and merged["other"] >= 5_000 - 50
    assert sum(merged.values()) == 5_005  # every checkout is in some series
    kept = [site for site in merged if site != "other"]
    clock.now += 1.0
    put(tmp_path, 2, doc(2, [pool("api", 6, sites={"new.py:1:h": 6})], 1001.0))
    again = by_pool(agg.scan())["api"]["counters"]["sqlalchemy.pool.site_checkouts"]
    assert [site for site in again if site != "other"] == kept  # labels never change


def test_retained_pools_of_churning_workers_are_bounded_and_sums_kept(
    tmp_path: Path, clock: Clock
) -> None:
    """6,000 exited workers with distinct pool names (the issue: 168,000 series that were
    never pruned): at most `MAX_RETAINED_POOLS` names, the rest in one retired series,
    and the total over pools exact (Prometheus sums stay monotonic)."""
    agg = Aggregator(str(tmp_path), clock=clock, retain_dead_s=0.0)
    workers = aggregate.MAX_RETAINED_POOLS + 100
    for pid in range(1, workers + 1):
        put(tmp_path, pid, doc(pid, [pool(f"job-{pid}", 3)], clock.now, exited=True))
        if pid % 50 == 0:
            agg.scan()
            clock.now += 1.0
    for _ in range(2):  # every dead process compacted
        clock.now += 1.0
        view = agg.scan()
    assert not agg.procs
    names = [p["pool"] for p in view.pools]
    assert len(names) <= aggregate.MAX_RETAINED_POOLS + 1 and aggregate.RETIRED_POOL in names
    total = sum(p["counters"]["sqlalchemy.pool.checkouts"] for p in view.pools)
    assert total == 3 * workers
    retired = by_pool(view)[aggregate.RETIRED_POOL]["counters"]
    assert list(retired["sqlalchemy.pool.site_checkouts"]) == ["other"]


def test_holds_per_process_keep_the_oldest(tmp_path: Path, clock: Clock) -> None:
    many = schema.MAX_HOLDS_PER_PROCESS + 50
    put(
        tmp_path,
        1,
        doc(1, [pool("a", 1, holds=many // 2), pool("b", 1, holds=many - many // 2)], 1000.0),
    )
    view = Aggregator(str(tmp_path), clock=clock).scan()
    assert len(view.holds) == schema.MAX_HOLDS_PER_PROCESS
    oldest = max(h["age_s"] for h in view.holds)
    assert oldest == pytest.approx(1.0 + many // 2 - 1, abs=0.3)  # the oldest kept


def test_checkouts_answer_is_limited_and_sorted_server_side(tmp_path: Path, clock: Clock) -> None:
    put(tmp_path, 1, doc(1, [pool("api", 1, holds=30)], 1000.0))
    view = Aggregator(str(tmp_path), clock=clock).scan()
    rows = api.checkouts(view, _NoPg().view, now=1000.0, limit=5)  # type: ignore[arg-type]
    assert len(rows) == 5 and [r["age_s"] for r in rows] == sorted(
        (r["age_s"] for r in rows), reverse=True
    )
    assert rows[0]["age_s"] == max(h["age_s"] for h in view.holds)
    assert api.checkouts_limit(None) == api.CHECKOUTS_LIMIT
    for bad in ("0", "-1", "x", str(api.CHECKOUTS_MAX_LIMIT + 1)):
        with pytest.raises(ValueError, match="limit must be a whole number"):
            api.checkouts_limit(bad)


def test_a_failing_scan_is_counted_exported_and_makes_readyz_fail(tmp_path: Path) -> None:
    _good(tmp_path)
    sidecar = Sidecar(SidecarConfig(snapshot_dir=str(tmp_path), scan_interval=1.0))
    sidecar.scan()
    assert sidecar.readiness()[0] is True and sidecar.scan_errors == 0
    assert sidecar.aggregator is not None

    def broken() -> Any:
        raise RuntimeError("boom")

    sidecar.aggregator.scan = broken  # type: ignore[method-assign]
    sidecar.scan()
    sidecar.scan()
    assert sidecar.scan_errors == 2
    sidecar.last_scan_ok -= sidecar.scan_stale_after() + 1  # as if it had failed that long
    ready, body = sidecar.readiness()
    assert ready is False and body["scan_stuck"] is True and body["scan_errors"] == 2
    text = sidecar.registries.exposition().decode()
    assert "pool_monitor_sidecar_scan_errors_total 2.0" in text
    age = next(
        ln for ln in text.splitlines() if ln.startswith("pool_monitor_sidecar_last_scan_age")
    )
    assert float(age.split()[1]) > sidecar.scan_stale_after()


class _NoPg:
    """A PostgreSQL collector that is not configured (the metrics registry asks)."""

    def __init__(self) -> None:
        from monitor.sidecar.postgres import PostgresCollector

        self._real = PostgresCollector(None, 5.0)
        self.view = self._real.view

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _chart_memory_limit() -> int:
    values = yaml.safe_load((ROOT / "helm/pool-monitor/values.yaml").read_text())
    limit = values["sidecar"]["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    return int(limit[:-2]) * 1024 * 1024


def test_memory_of_64_workers_at_the_bounds_stays_under_the_chart_limit() -> None:
    """64 documents at the bounds: `MAX_POOLS` pools each with 200 sites in every
    site-labelled counter, `MAX_HOLDS_PER_PROCESS` holds with `MAX_TEXT`-long strings.
    A real sidecar scans them while /metrics, /api/pools and /api/checkouts (at its
    largest limit) are requested; its peak RSS (VmHWM) must stay under the chart's limit."""
    site_counters = files.SITE_COUNTERS
    with tempfile.TemporaryDirectory(prefix="pool-monitor-mem-") as directory:
        now = time.time()
        per_pool = schema.MAX_HOLDS_PER_PROCESS // schema.MAX_POOLS
        text = "x" * (schema.MAX_TEXT - 10)
        for w in range(64):
            pools = []
            for k in range(schema.MAX_POOLS):
                sites = {f"app/module_{i:03d}/handlers.py:{i}:handle_{i}": i for i in range(200)}
                p = pool(f"pool{k}", 1000, sites=sites, holds=per_pool, now=now)
                for name in site_counters:
                    p["counters"][name] = dict(sites)
                for h in p["holds"]:
                    h.update(site=text, thread=text, task=text)
                pools.append(p)
            put(Path(directory), 10_000 + w, doc(10_000 + w, pools, now, interval=3600))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [
            sys.executable,
            "-m",
            "monitor.cli",
            "sidecar",
            "--snapshot-dir",
            directory,
            "--listen",
            f"127.0.0.1:{port}",
        ]
        proc = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
            deadline = time.monotonic() + 120
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, "sidecar not ready"
                time.sleep(0.2)
            for _ in range(5):  # several full scans, each with every endpoint asked
                metrics = client.get("/metrics")
                client.get("/api/pools").raise_for_status()
                rows = client.get("/api/checkouts", params={"limit": api.CHECKOUTS_MAX_LIMIT})
                time.sleep(1.0)
            assert metrics.status_code == 200 and len(rows.json()) == api.CHECKOUTS_MAX_LIMIT
            assert int(rows.headers["X-Total-Count"]) == 64 * per_pool * schema.MAX_POOLS
            with open(f"/proc/{proc.pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            peak = int(status["VmHWM"].split()[0]) * 1024
        finally:
            proc.terminate()
            proc.wait(10)
    limit = _chart_memory_limit()
    print(
        f"\n[memory] 64 workers at the bounds: sidecar peak RSS {peak / 2**20:.0f} MiB "
        f"(chart limit {limit / 2**20:.0f} MiB)"
    )
    assert peak < limit
