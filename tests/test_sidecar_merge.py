"""The sidecar's merge (issue 5, part 2): exact sums, counters that never go down when
processes die, pause, restart a series or race, and bad files skipped and counted.

Documents here are synthetic (their exact shape is the writer's, see test_snapshot), so
every expected number is known; a fake clock drives freshness.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from monitor.catalogue import SECONDS_BUCKETS
from monitor.exporters import snapshot
from monitor.sidecar import files
from monitor.sidecar.aggregate import Aggregator, View

NB = len(SECONDS_BUCKETS) + 1


def hist(counts: dict[int, int], total: float) -> dict[str, Any]:
    c = [0] * NB
    for i, n in counts.items():
        c[i] = n
    return {"bounds": list(SECONDS_BUCKETS), "counts": c, "sum": total, "count": sum(c)}


def pool(
    name: str,
    checkouts: int,
    *,
    used: int = 0,
    idle: int = 0,
    size: int = 5,
    oldest: float = 0.0,
    sites: dict[str, int] | None = None,
    holds: int = 0,
    monitor_id: int = 1,
    now: float = 1000.0,
) -> dict[str, Any]:
    sites = sites or {"app.py:1:f": checkouts}
    return {
        "version": 1,
        "pool": name,
        "pool_class": "QueuePool",
        "monitor_id": monitor_id,
        "gauges": {
            "db.client.connection.count": {"idle": idle, "used": used},
            "db.client.connection.max": size,
            "db.client.connection.idle.max": size,
            "db.client.connection.pending_requests": 0,
            "sqlalchemy.pool.overflow": 0,
            "sqlalchemy.pool.oldest_checkout_age": oldest,
            "sqlalchemy.pool.long_held": 0,
        },
        "counters": {
            "db.client.connection.timeouts": 1,
            "sqlalchemy.pool.checkouts": checkouts,
            "sqlalchemy.pool.invalidations": {"hard": 1, "soft": 0},
            "sqlalchemy.pool.sql_time": checkouts * 0.5,
            "sqlalchemy.pool.site_checkouts": sites,
            "pool_monitor.errors": 0,
        },
        "histograms": {
            "db.client.connection.use_time": hist({3: checkouts}, checkouts * 0.004),
            "db.client.connection.wait_time": hist({0: checkouts}, checkouts * 0.0001),
        },
        "holds": [
            {
                "age_s": 1.0 + i,
                "started_at": now - 1.0 - i,
                "site": f"app.py:{i}:h",
                "thread": "MainThread",
                "task": None,
                "backend_pid": 100 + i,
            }
            for i in range(holds)
        ],
    }


def doc(
    pid: int,
    pools: list[dict[str, Any]],
    written_at: float,
    *,
    interval: float = 1.0,
    exited: bool = False,
    lock_waits: int = 0,
    serving: bool = True,
    process: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "version": 1,
        "process": {
            "hostname": "h",
            "pid": pid,
            "start_time": 1.0,
            "argv0": "w",
            **(process or {}),
        },
        "written_at": written_at,
        "interval": interval,
        "exited": exited,
        "serving": serving,
        "writer": {"writes": 1, "errors": 0},
        "pools": pools,
        "locks": {
            "app.lock.wait_time": {"store": hist({1: lock_waits}, lock_waits * 0.001)},
            "app.lock.hold_time": {"store": hist({2: lock_waits}, lock_waits * 0.002)},
        },
    }


def put(directory: Path, pid: int, document: dict[str, Any] | bytes) -> Path:
    """Write like the worker does: temp file, then rename."""
    path = directory / f"pool-monitor-h-{pid}-1.json"
    tmp = directory / f".{path.name}.tmp"
    tmp.write_bytes(document if isinstance(document, bytes) else json.dumps(document).encode())
    os.replace(tmp, path)
    return path


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def by_pool(view: View) -> dict[str, dict[str, Any]]:
    return {p["pool"]: p for p in view.pools}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def agg(tmp_path: Path, clock: Clock) -> Aggregator:
    return Aggregator(str(tmp_path), clock=clock, retain_dead_s=60)


def test_three_processes_sum_exactly(tmp_path: Path, agg: Aggregator) -> None:
    put(
        tmp_path,
        1,
        doc(
            1,
            [
                pool(
                    "api",
                    10,
                    used=2,
                    idle=1,
                    oldest=3.0,
                    holds=2,
                    sites={"a.py:1:f": 4, "b.py:2:g": 6},
                ),
                pool("bg", 5, used=1),
            ],
            1000,
            lock_waits=3,
        ),
    )
    put(
        tmp_path,
        2,
        doc(
            2,
            [pool("api", 20, used=1, idle=2, oldest=7.5, holds=1, sites={"a.py:1:f": 20})],
            999.5,
            lock_waits=4,
        ),
    )
    put(
        tmp_path,
        3,
        doc(
            3,
            [pool("api", 30, used=0, idle=3, sites={"c.py:3:h": 30}), pool("bg", 7, used=2)],
            999.9,
        ),
    )
    view = agg.scan()
    api, bg = by_pool(view)["api"], by_pool(view)["bg"]
    c = api["counters"]
    assert c["sqlalchemy.pool.checkouts"] == 60
    assert c["db.client.connection.timeouts"] == 3
    assert c["sqlalchemy.pool.invalidations"] == {"hard": 3, "soft": 0}
    assert c["sqlalchemy.pool.site_checkouts"] == {"a.py:1:f": 24, "b.py:2:g": 6, "c.py:3:h": 30}
    assert c["sqlalchemy.pool.sql_time"] == pytest.approx(30.0)
    use = api["histograms"]["db.client.connection.use_time"]
    assert use["counts"][3] == 60 and use["count"] == 60
    assert use["sum"] == pytest.approx(0.24)
    g = api["gauges"]
    assert g["db.client.connection.count"] == {"idle": 6, "used": 3}
    assert g["db.client.connection.max"] == 15
    assert g["sqlalchemy.pool.oldest_checkout_age"] == 7.5  # max, not sum
    # Oldest first, aged from their start by the sidecar's clock, but never more than
    # AGE_SLACK_S past what their document vouches for: pid 2 wrote at 999.5, so its hold
    # (started 999.0) is 0.75 s old, not 1.0, at 1000.0: it may have ended since.
    ages = [(h["process"]["pid"], h["age_s"]) for h in api["holds"]]
    assert ages == [(1, 2.0), (1, 1.0), (2, pytest.approx(0.75))]
    assert api["holds"][0]["pool"] == "api" and api["processes"] == 3
    assert bg["counters"]["sqlalchemy.pool.checkouts"] == 12
    assert bg["gauges"]["db.client.connection.count"]["used"] == 3
    assert view.locks["app.lock.wait_time"]["store"]["count"] == 7
    assert view.locks["app.lock.hold_time"]["store"]["counts"][2] == 7
    assert [p["state"] for p in view.processes] == ["live"] * 3


def test_dead_process_keeps_counters_and_loses_gauges_then_is_compacted(
    tmp_path: Path, agg: Aggregator, clock: Clock
) -> None:
    put(tmp_path, 1, doc(1, [pool("api", 10, used=2, holds=2)], 1000))
    dead = put(tmp_path, 2, doc(2, [pool("api", 5, used=3, holds=1)], 1000))
    assert by_pool(agg.scan())["api"]["gauges"]["db.client.connection.count"]["used"] == 5
    clock.now = 1003.5  # pid 2 silent for > 3 intervals; pid 1 keeps writing
    put(tmp_path, 1, doc(1, [pool("api", 11, used=1, holds=1)], 1003.4))
    view = agg.scan()
    api = by_pool(view)["api"]
    assert api["counters"]["sqlalchemy.pool.checkouts"] == 16
    assert api["gauges"]["db.client.connection.count"]["used"] == 1
    assert [h["process"]["pid"] for h in api["holds"]] == [1]
    assert {p["pid"]: p["state"] for p in view.processes} == {1: "live", 2: "dead"}
    dead.unlink()  # the workers prune it after a minute: nothing changes
    assert by_pool(agg.scan())["api"]["counters"]["sqlalchemy.pool.checkouts"] == 16
    clock.now = 1070.0  # past retain_dead_s: folded into the retained total, memory freed
    put(tmp_path, 1, doc(1, [pool("api", 12)], 1069.9))
    view = agg.scan()
    assert [p["pid"] for p in view.processes] == [1]
    assert by_pool(view)["api"]["counters"]["sqlalchemy.pool.checkouts"] == 17
    use = by_pool(view)["api"]["histograms"]["db.client.connection.use_time"]
    assert use["count"] == 17


def test_every_worker_gone_reports_zero_use_and_keeps_counters(
    tmp_path: Path, agg: Aggregator, clock: Clock
) -> None:
    put(tmp_path, 1, doc(1, [pool("api", 4, used=2, holds=2)], 1000, exited=True))
    view = agg.scan()
    api = by_pool(view)["api"]
    assert api["processes"] == 0 and api["holds"] == []
    assert api["gauges"]["db.client.connection.count"] == {"idle": 0, "used": 0}
    assert "db.client.connection.max" not in api["gauges"]
    assert api["counters"]["sqlalchemy.pool.checkouts"] == 4
    assert view.processes[0]["state"] == "exited"


def test_standby_master_counts_but_adds_no_capacity(tmp_path: Path, agg: Aggregator) -> None:
    """A preforking master (`"serving": false`) keeps its counters in the merge, but its
    pool's max and idle connections are no capacity; an idle worker's are."""
    put(tmp_path, 1, doc(1, [pool("api", 3, idle=1, size=5)], 1000, serving=False))
    put(tmp_path, 2, doc(2, [pool("api", 10, used=1, idle=1, size=5, holds=1)], 1000))
    put(tmp_path, 3, doc(3, [pool("api", 0, size=5)], 1000))  # up, never used yet
    view = agg.scan()
    api = by_pool(view)["api"]
    assert api["gauges"]["db.client.connection.max"] == 10
    assert api["gauges"]["db.client.connection.count"] == {"idle": 1, "used": 1}
    assert api["counters"]["sqlalchemy.pool.checkouts"] == 13
    assert api["processes"] == 2 and [h["process"]["pid"] for h in api["holds"]] == [2]
    assert {p["pid"]: p["state"] for p in view.processes} == {1: "standby", 2: "live", 3: "live"}


def _start_ticks(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return stat[stat.rindex(")") + 2 :].split()[19]


@pytest.mark.skipif(snapshot.pid_namespace() is None, reason="needs Linux /proc")
def test_gone_process_in_our_pid_namespace_is_dead_at_once(tmp_path: Path, agg: Aggregator) -> None:
    """Without waiting three intervals: a pid in our namespace that is free, a zombie or
    another process (start ticks differ) is dead. A pid from another namespace (another
    container: the same number is another process) or another machine is not judged."""
    ns = snapshot.pid_namespace()
    assert ns is not None
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ours = {"start_token": _start_ticks(child.pid), **ns}
        put(tmp_path, child.pid, doc(child.pid, [pool("api", 4, used=1)], 1000, process=ours))
        elsewhere = {**ours, "pid_ns": "pid:[1]"}
        put(tmp_path, 7, doc(7, [pool("api", 1, used=1)], 1000, process=elsewhere))
        reused = {**ours, "start_token": "1"}  # our own pid, but a process started at tick 1
        put(tmp_path, os.getpid(), doc(os.getpid(), [pool("api", 2)], 1000, process=reused))
        view = agg.scan()
        states = {p["pid"]: p["state"] for p in view.processes}
        assert states == {child.pid: "live", 7: "live", os.getpid(): "dead"}
        child.kill()
        wait_zombie = time.monotonic() + 10
        while _state(child.pid) != "Z" and time.monotonic() < wait_zombie:
            time.sleep(0.01)
        view = agg.scan()  # not reaped yet: a zombie is gone too
        assert {p["pid"]: p["state"] for p in view.processes}[child.pid] == "dead"
        api = by_pool(view)["api"]
        assert api["gauges"]["db.client.connection.count"]["used"] == 1  # pid 7's only
        assert api["counters"]["sqlalchemy.pool.checkouts"] == 7
    finally:
        child.kill()
        child.wait(10)
    view = agg.scan()
    assert {p["pid"]: p["state"] for p in view.processes}[child.pid] == "dead"


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return stat[stat.rindex(")") + 2 :].split()[0]


def test_paused_process_that_resumes_is_not_counted_twice(
    tmp_path: Path, agg: Aggregator, clock: Clock
) -> None:
    put(tmp_path, 1, doc(1, [pool("api", 10, used=1)], 1000))
    agg.scan()
    clock.now = 1010.0
    assert agg.scan().processes[0]["state"] == "dead"
    put(tmp_path, 1, doc(1, [pool("api", 15, used=2)], 1010.0))  # SIGCONT
    view = agg.scan()
    api = by_pool(view)["api"]
    assert api["counters"]["sqlalchemy.pool.checkouts"] == 15
    assert api["gauges"]["db.client.connection.count"]["used"] == 2
    assert view.processes[0]["state"] == "live"


def test_compacted_file_left_in_place_is_not_read_again(
    tmp_path: Path, agg: Aggregator, clock: Clock
) -> None:
    put(tmp_path, 1, doc(1, [pool("api", 10)], 1000, exited=True))
    agg.scan()
    clock.now = 1100.0
    for _ in range(3):
        view = agg.scan()
    assert (
        view.processes == [] and by_pool(view)["api"]["counters"]["sqlalchemy.pool.checkouts"] == 10
    )
    assert sum(view.errors.values()) == 0


def test_reinstrumented_engine_and_transient_dips(tmp_path: Path, agg: Aggregator) -> None:
    put(tmp_path, 1, doc(1, [pool("api", 10)], 1000))
    agg.scan()
    put(tmp_path, 1, doc(1, [pool("api", 9)], 1000.1))  # read mid-checkin: held at 10
    assert by_pool(agg.scan())["api"]["counters"]["sqlalchemy.pool.checkouts"] == 10
    put(tmp_path, 1, doc(1, [pool("api", 12)], 1000.2))
    assert by_pool(agg.scan())["api"]["counters"]["sqlalchemy.pool.checkouts"] == 12
    # uninstrument + instrument: a new monitor starts from zero, the old one's 12 stay
    put(tmp_path, 1, doc(1, [pool("api", 3, monitor_id=2)], 1000.3))
    api = by_pool(agg.scan())["api"]
    assert api["counters"]["sqlalchemy.pool.checkouts"] == 15
    assert api["histograms"]["db.client.connection.use_time"]["count"] == 15


def test_bad_files_are_skipped_and_each_version_counted_once(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    agg = Aggregator(str(tmp_path), clock=clock, max_bytes=4096)
    good = doc(1, [pool("api", 10)], 1000)
    put(tmp_path, 1, good)
    text = json.dumps(doc(2, [pool("api", 20)], 1000))
    put(tmp_path, 2, text[: len(text) // 2].encode())  # cut off
    put(tmp_path, 3, b"\x00\x01 not json at all {")
    put(tmp_path, 4, {**doc(4, [pool("api", 40)], 1000), "version": 2})
    put(tmp_path, 5, json.dumps(doc(5, [pool("api", 50)] * 20, 1000)).encode())  # > 4096
    bad = doc(6, [pool("api", 60)], 1000)
    bad["pools"][0]["counters"]["sqlalchemy.pool.checkouts"] = "sixty"
    put(tmp_path, 6, bad)
    odd = doc(7, [pool("api", 70)], 1000)
    odd["pools"][0]["histograms"]["db.client.connection.use_time"]["bounds"] = [1, 2]
    odd["pools"][0]["histograms"]["db.client.connection.use_time"]["counts"] = [0, 0, 70]
    put(tmp_path, 7, odd)
    (tmp_path / ".pool-monitor-h-8-1.json.tmp").write_text("{")  # in-flight temp: ignored
    (tmp_path / "notes.json").write_text("{")  # not ours: ignored
    for _ in range(3):
        view = agg.scan()
    assert view.errors == {
        "corrupt": 1,
        "truncated": 1,
        "oversized": 1,
        "unknown_version": 1,
        "invalid": 1,
        "unreadable": 0,
        "incompatible": 1,
    }
    assert by_pool(view)["api"]["counters"]["sqlalchemy.pool.checkouts"] == 10
    assert "truncated" in caplog.text and "pool-monitor-h-2-1.json" in caplog.text
    # a live worker's file going bad keeps its last good numbers; a new bad version counts
    put(tmp_path, 1, b"{garbage")
    view = agg.scan()
    assert view.errors["corrupt"] == 2
    assert by_pool(view)["api"]["counters"]["sqlalchemy.pool.checkouts"] == 10


def test_missing_directory_is_reported_once(tmp_path: Path, clock: Clock) -> None:
    missing = tmp_path / "later"
    agg = Aggregator(str(missing), clock=clock)
    for _ in range(3):
        view = agg.scan()
    assert view.dir_error and "later" in view.dir_error and view.errors["unreadable"] == 1
    missing.mkdir()
    put(missing, 1, doc(1, [pool("api", 1)], 1000))
    view = agg.scan()
    assert view.dir_error is None and view.pools[0]["counters"]["sqlalchemy.pool.checkouts"] == 1


def test_merge_benchmark_64_snapshots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Prints the figure the issue asks for (goal ≤ 20 ms); asserts only correctness."""
    now = time.time()
    n_sites = 40
    for pid in range(64):
        pools = []
        for name in ("orders-api", "orders-background"):
            p = pool(
                name,
                1000 + pid,
                used=3,
                idle=2,
                holds=4,
                now=now,
                sites={f"app/module{i}.py:{10 * i}:handler{i}": 25 for i in range(n_sites)},
            )
            for key in (
                "sqlalchemy.pool.site_use_time",
                "sqlalchemy.pool.site_idle_in_use_time",
                "sqlalchemy.pool.cross_thread_uses",
                "sqlalchemy.pool.concurrent_uses",
                "sqlalchemy.pool.long_held_events",
            ):
                p["counters"][key] = {
                    s: 0.5 for s in p["counters"]["sqlalchemy.pool.site_checkouts"]
                }
            p["histograms"]["db.client.connection.create_time"] = hist({5: 3}, 0.03)
            pools.append(p)
        put(tmp_path, pid, doc(pid, pools, now, lock_waits=5))
    size = sum(f.stat().st_size for f in tmp_path.iterdir()) / 64
    agg = Aggregator(str(tmp_path))
    t0 = time.perf_counter()
    view = agg.scan()  # read + validate + merge, every file new
    full = time.perf_counter() - t0
    merges = []
    for _ in range(5):
        t0 = time.perf_counter()
        agg._view(time.time(), t0)  # the merge alone, as each scan of unchanged files does
        merges.append(time.perf_counter() - t0)
    api = by_pool(view)["orders-api"]
    assert api["counters"]["sqlalchemy.pool.checkouts"] == sum(1000 + p for p in range(64))
    assert len(api["holds"]) == 256
    with capsys.disabled():
        print(
            f"\n[bench] sidecar merge of 64 snapshots ({size / 1024:.1f} KiB each, 2 pools × "
            f"{n_sites} sites, 4 holds): merge {min(merges) * 1000:.1f} ms (goal ≤ 20 ms); "
            f"read+validate+merge {full * 1000:.1f} ms"
        )
    assert files.is_snapshot_name("pool-monitor-h-1-1.json")
