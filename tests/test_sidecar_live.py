"""Live holds that tell the truth ("Tell the truth in real deployments": ghost holds).

The issue: with strictly sequential requests each under 164 ms, `/api/checkouts` listed
holds aged up to 1.5 s, 1.1 s after the last response: the sidecar aged holds from
snapshots up to ~2 s old and kept the worker's `long_held` flag from snapshot time.

Here a real worker process (this module's `worker()`, run as `python -c`) on the real
PostgreSQL, with the real `pool-monitor sidecar` command, default intervals (the workers'
full document every second, the sidecar's full scan every second and its live-document
read every 0.2 s):

- sequential short holds, then stop: every `/api/checkouts` response requested 0.5 s or
  more after the last return lists no hold, and no response ever shows a hold older than
  the longest real one plus `AGE_SLACK_S`; the page's fast list
  (`/api/checkouts?server=cached`) is as empty, without waiting for PostgreSQL;
- one long hold: every shown age is within 0.25 s above its true age (measured here from
  the checkout time the worker reports), `long_held` flips at the threshold by the
  sidecar's clock (the worker's full document is written every 30 s here, so its flag
  could not); a stopped worker's hold (SIGSTOP) stays listed with its true age: its board
  says it is still out;
- the worker's GIL saturated by CPU-bound threads: ended holds still leave at once (the
  returning thread clears the board itself); a killed worker's holds leave at once (the
  board's lock goes with the process).

And the worker's cost of the live document (`monitor.livebench`), printed.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from demo_app.stack import libpq_dsn
from monitor.sidecar import aggregate
from tests.helpers import spawn_sidecar, spawn_worker
from tests.test_sidecar_e2e import _readline, free_port, stop_sidecar, wait_for

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD_S = 1.0  # the long-hold worker's long_held_threshold
HOLD_S = 0.1  # each sequential hold's pg_sleep


# -- the worker process -----------------------------------------------------------------
def worker(argv: list[str]) -> int:
    """Commands on stdin, one JSON line back each: `seq N` (N sequential short holds; the
    wall time of the last return, the longest hold), `hold` (check one out and keep it;
    its checkout time), `release`, `exit`."""
    import sqlalchemy as sa

    import monitor

    spec = json.loads(argv[0])
    engine = sa.create_engine(spec["url"], pool_size=2, max_overflow=0)
    monitor.instrument(
        engine,
        pool_name=spec["pool"],
        snapshot_dir=spec["dir"],
        snapshot_interval=spec["interval"],
        long_held_threshold=THRESHOLD_S,
    )
    with engine.connect() as conn:  # connected before the test starts its clock
        conn.execute(sa.text("SELECT 1"))
    print(json.dumps({"pid": os.getpid()}), flush=True)
    held = None
    for line in sys.stdin:
        command = line.split()
        if command[0] == "seq":
            longest = 0.0
            for _ in range(int(command[1])):
                t0 = time.time()
                with engine.connect() as conn:
                    conn.execute(sa.text(f"SELECT pg_sleep({HOLD_S})"))
                t1 = time.time()
                longest = max(longest, t1 - t0)
            print(json.dumps({"returned_at": t1, "longest": longest}), flush=True)
        elif command[0] == "hold":
            before = time.time()
            held = engine.connect()
            after = time.time()
            print(json.dumps({"before": before, "after": after}), flush=True)
        elif command[0] == "burn":  # CPU-bound threads: the GIL saturated

            def burn() -> None:
                while True:
                    sum(range(1000))

            for _ in range(int(command[1])):
                threading.Thread(target=burn, daemon=True).start()
            print(json.dumps({"burning": int(command[1])}), flush=True)
        elif command[0] == "release":
            assert held is not None
            held.close()
            print(json.dumps({"returned_at": time.time()}), flush=True)
        else:
            break
    engine.dispose()
    return 0


@dataclass
class Live:
    http: httpx.Client
    proc: subprocess.Popen[str]

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(_readline(self.proc.stdout, 60))

    def checkouts(self) -> tuple[float, list[dict[str, Any]], float]:
        """(sent, rows, received), wall clock."""
        sent = time.time()
        rows = self.http.get("/api/checkouts").json()
        return sent, rows, time.time()


def _start(database_url: str, interval: float) -> Iterator[Live]:
    tmp = Path(tempfile.mkdtemp(prefix="pool-monitor-live-"))
    snapdir = tmp / "snapshots"
    snapdir.mkdir()
    port = free_port()
    log = tmp / "sidecar.log"
    log_file = open(log, "wb")  # noqa: SIM115 - the process writes it until the end
    sidecar = spawn_sidecar(snapdir, port, log_file, "--postgres-dsn", libpq_dsn(database_url))
    spec = {"url": database_url, "dir": str(snapdir), "pool": "live-api", "interval": interval}
    proc = spawn_worker("tests.test_sidecar_live", spec)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    try:
        assert proc.stdout is not None
        info = json.loads(_readline(proc.stdout, 60))

        def worker_live() -> bool:
            try:
                processes = http.get("/api/pools").json()["processes"]
            except httpx.TransportError:
                assert sidecar.poll() is None, log.read_text()
                return False
            return any(p["pid"] == info["pid"] and p["state"] == "live" for p in processes)

        wait_for(worker_live, 30, "the sidecar to see the worker")
        yield Live(http, proc)
    finally:
        if proc.poll() is None:
            with_stdin = proc.stdin
            if with_stdin is not None:
                try:
                    with_stdin.write("exit\n")
                    with_stdin.flush()
                except OSError:
                    pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        stop_sidecar(sidecar, http, log_file, tmp)


@pytest.fixture
def live_default(database_url: str) -> Iterator[Live]:
    """A worker with the default 1 s snapshot interval (the issue's setup)."""
    yield from _start(database_url, 1.0)


@pytest.fixture
def live_slow(database_url: str) -> Iterator[Live]:
    """A worker whose full document is written every 30 s: only the live one is fresh."""
    yield from _start(database_url, 30.0)


# -- the tests ----------------------------------------------------------------------------
def test_sequential_short_holds_leave_no_ghosts(live_default: Live) -> None:
    live = live_default
    live.proc.stdin.write("seq 15\n")  # type: ignore[union-attr]
    live.proc.stdin.flush()  # type: ignore[union-attr]
    samples: list[tuple[float, list[dict[str, Any]], float]] = []
    result: dict[str, Any] | None = None
    assert live.proc.stdout is not None
    while result is None:  # poll while the holds run (~15 × 0.1 s)
        samples.append(live.checkouts())
        ready, _, _ = select.select([live.proc.stdout], [], [], 0.02)
        if ready:
            result = json.loads(live.proc.stdout.readline())
    returned_at, longest = result["returned_at"], result["longest"]
    while time.time() < returned_at + 1.5:  # and after the last return
        samples.append(live.checkouts())
        time.sleep(0.02)
    shown = [h for _, rows, _ in samples for h in rows]
    assert shown, "no hold was ever listed while they ran"
    oldest = max(h["age_s"] for h in shown)
    gone = min((r for s, rows, r in samples if s > returned_at and not rows), default=float("inf"))
    print(
        f"\n[live] {len(samples)} responses; {len(shown)} holds listed, oldest shown "
        f"{oldest:.3f} s (longest real {longest:.3f} s); last hold gone from "
        f"/api/checkouts {gone - returned_at:.3f} s after the last return"
    )
    # No ghost ages: a listed hold is never shown older than the longest real one plus the
    # slack past its last confirmation (the issue saw 1.5 s for holds under 0.164 s).
    assert oldest <= longest + aggregate.AGE_SLACK_S + 0.02, (oldest, longest)
    late = [(s - returned_at, rows) for s, rows, _ in samples if s >= returned_at + 0.5 and rows]
    assert not late, late[:3]
    assert all(not h["stale"] for h in shown), [h for h in shown if h["stale"]][:3]
    # The live page's fast loop: the same (empty) list, never waiting for PostgreSQL.
    waits = []
    for _ in range(5):
        sent = time.time()
        assert live.http.get("/api/checkouts", params={"server": "cached"}).json() == []
        waits.append(time.time() - sent)
    assert max(waits) < 0.3, waits  # generous: no poll wait (those take up to 1 s)


def test_long_hold_age_is_true_and_long_held_flips_by_the_sidecar_clock(live_slow: Live) -> None:
    live = live_slow
    checkout = live.ask("hold")
    began = time.time()
    samples: list[tuple[float, dict[str, Any], float]] = []
    while time.time() < began + THRESHOLD_S + 0.8:
        sent, rows, received = live.checkouts()
        if rows:
            [row] = rows
            samples.append((sent, row, received))
        time.sleep(0.03)
    assert len(samples) > 10, samples
    worst_above = worst_below = 0.0
    for sent, row, received in samples:
        # the true age at the moment the sidecar computed it lies in this range
        true_max = received - checkout["before"]
        true_min = sent - checkout["after"]
        worst_above = max(worst_above, row["age_s"] - true_max)
        worst_below = max(worst_below, true_min - row["age_s"])
        assert row["age_s"] <= true_max + 0.25, (row, true_max)
        assert row["age_s"] >= true_min - 0.5, (row, true_min)  # ageing, not frozen
        assert row["long_held"] == (row["age_s"] >= THRESHOLD_S), row  # the sidecar's clock
        assert not row["stale"], row
    flags = [row["long_held"] for _, row, _ in samples]
    assert flags[0] is False and flags[-1] is True, flags
    assert flags == sorted(flags), flags  # flips once, at the threshold
    print(
        f"\n[live] {len(samples)} responses for one hold: shown age at most "
        f"{worst_above * 1000:.0f} ms above, at most {worst_below * 1000:.0f} ms below the "
        f"true age; long_held flipped at {THRESHOLD_S} s"
    )

    # A stopped worker (SIGSTOP: its snapshot thread writes nothing) cannot return its
    # connection: the board still says the hold is out, so it is listed as current, with
    # its true age, not "as of" its last document.
    os.kill(live.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(aggregate.STALE_AFTER_S + 0.5)
        sent, [row], received = live.checkouts()
        assert row["stale"] is False and row["pending"] is False, row
        assert sent - checkout["after"] - 0.25 <= row["age_s"] <= received - checkout["before"]
    finally:
        os.kill(live.proc.pid, signal.SIGCONT)
    returned = live.ask("release")["returned_at"]

    def gone() -> bool:
        return not live.checkouts()[1]

    wait_for(gone, 5, "the released hold to leave /api/checkouts")
    print(f"[live] released hold gone after {time.time() - returned:.3f} s (upper bound)")


def test_ended_holds_leave_at_once_while_the_worker_is_starved(live_default: Live) -> None:
    """The GIL saturated by 16 CPU-bound threads in the worker: its snapshot thread runs a
    few times a second at best (measured before the board: an ended hold listed up to
    1.1 s with 8 such threads, 8 s with 32). The board is written by the returning thread
    itself, so every response requested 0.5 s or more after a return still lists none."""
    live = live_default
    assert live.ask("burn 16")["burning"] == 16
    gone_after: list[float] = []
    for _ in range(10):
        live.ask("hold")
        wait_for(lambda: live.http.get("/api/checkouts?server=cached").json(), 10, "listed")
        returned_at = live.ask("release")["returned_at"]
        while live.http.get("/api/checkouts?server=cached").json():
            assert time.time() < returned_at + 10, "an ended hold stayed listed"
            time.sleep(0.01)
        gone_after.append(max(0.0, time.time() - returned_at))
    ordered = sorted(gone_after)
    print(
        f"\n[live] worker's GIL saturated by 16 threads: ended hold gone from /api/checkouts "
        f"after p50 {ordered[len(ordered) // 2]:.3f} s, max {ordered[-1]:.3f} s over "
        f"{len(ordered)} holds"
    )
    assert ordered[-1] < 0.5, ordered


def test_a_killed_worker_s_holds_leave_at_once(live_slow: Live) -> None:
    """SIGKILL while holding: no exit document, and with a 30 s interval its full document
    would look fresh for 90 s. The kernel drops the board's lock with the process, so the
    sidecar (pid namespace shared or not) drops its holds and marks it dead at once."""
    live = live_slow
    live.ask("hold")
    wait_for(lambda: live.checkouts()[1], 10, "the hold listed")
    live.proc.kill()
    killed = time.time()
    live.proc.wait(10)
    wait_for(lambda: not live.checkouts()[1], 5, "the killed worker's hold to go")
    gone = time.time() - killed
    states = {p["pid"]: p["state"] for p in live.http.get("/api/pools").json()["processes"]}
    assert states[live.proc.pid] == "dead", states
    print(f"\n[live] killed worker's hold gone after {gone:.3f} s (upper bound)")


def test_live_documents_by_a_fake_clock(tmp_path: Path) -> None:
    """The aggregator's rules, one by one: the live document wins over the full one; ages
    run on from the start but stop `AGE_SLACK_S` past the last confirmation (the file's
    mtime); `stale` past `STALE_AFTER_S`; `long_held` by the sidecar's clock; a bad live
    document is refused and counted once; without one, the full document's holds."""
    from monitor.sidecar import api, files
    from monitor.sidecar.aggregate import Aggregator
    from monitor.sidecar.postgres import PgView
    from tests.test_sidecar_merge import Clock, doc, pool, put

    clock = Clock()
    agg = Aggregator(str(tmp_path), clock=clock)
    main = put(tmp_path, 1, doc(1, [pool("api", 3, holds=1, now=1000.0)], 1000.0))
    live_path = tmp_path / files.live_name(main.name)

    def put_live(holds: list[float], written_at: float, mtime: float, raw: bytes = b"") -> None:
        body = {
            "version": 1,
            "kind": "live",
            "process": {"hostname": "h", "pid": 1},
            "written_at": written_at,
            "pools": [
                {
                    "pool": "api",
                    "long_held_threshold": 1.0,
                    "holds": [{"started_at": t, "site": "a.py:1:f"} for t in holds],
                }
            ],
        }
        tmp = tmp_path / f".{live_path.name}.tmp"
        tmp.write_bytes(raw or json.dumps(body).encode())
        os.replace(tmp, live_path)
        os.utime(live_path, (mtime, mtime))

    def rows() -> list[dict[str, Any]]:
        return api.checkouts(agg.scan_live(), PgView(configured=False), now=clock.now)

    put_live([999.5], 1000.2, 1000.3)
    clock.now = 1000.4
    agg.scan()
    [row] = rows()  # the live hold (started 999.5), not the full document's (999.0)
    assert row["age_s"] == pytest.approx(0.9) and row["as_of"] == pytest.approx(1000.3)
    assert row["stale"] is False and row["long_held"] is False
    assert row["started_at"] == 999.5
    clock.now = 1001.0  # no word from the worker for 0.7 s
    [row] = rows()
    assert row["age_s"] == pytest.approx(1000.3 + aggregate.AGE_SLACK_S - 999.5)
    assert row["stale"] is True and row["long_held"] is True  # 1.05 s ≥ threshold
    os.utime(live_path, (1001.0, 1001.0))  # the worker vouches again (a touch)
    [row] = rows()
    assert row["age_s"] == pytest.approx(1.5) and row["stale"] is False
    put_live([], 1001.1, 1001.1)  # returned
    clock.now = 1001.2
    assert rows() == []
    put_live([], 0, 1001.2, raw=b'{"version": 1, "kind": "live", ')  # cut off
    assert rows() == [] and rows() == []
    assert agg.errors["truncated"] == 1  # counted once per version
    put_live([1001.0], 1001.2, 1001.2)
    assert len(rows()) == 1
    live_path.unlink()  # removed by the worker at exit: its holds are over, no fallback
    assert rows() == []
    # an older library (no live document): the full document's holds, as of its writing
    put(tmp_path, 2, doc(2, [pool("api", 3, holds=1, now=1001.0)], 1001.0))
    agg.scan()
    [row] = rows()
    assert row["process"]["pid"] == 2 and row["started_at"] == 1000.0
    assert row["as_of"] == 1001.0 and row["stale"] is False
    assert row["age_s"] == pytest.approx(1.2)
    clock.now = 1002.0
    [row] = rows()
    assert row["stale"] is True and row["age_s"] == pytest.approx(1.0 + aggregate.AGE_SLACK_S)


def test_live_document_cost_to_the_worker() -> None:
    """The writer thread's CPU while idle and under many short checkouts, % of one core
    (`pool-monitor bench-live` prints the same). Goals: ≤ 1 % idle, ≤ 2 % under load;
    asserted only generously (5 %), on a shared machine."""
    from monitor import livebench

    result = livebench.measure(window=3.0, threads=8)
    idle, load = result["idle"], result["load"]
    print(
        f"\n[bench-live] idle: {idle['cpu_percent_of_one_core']:.3f}% of one core "
        f"({idle['live_touches']} touches, {idle['live_writes']} writes in "
        f"{idle['window_s']:.1f} s); load: {load['cpu_percent_of_one_core']:.3f}% "
        f"({load['live_writes']} writes, {load['checkouts_per_s']:.0f} checkouts/s by "
        f"{load['load_threads']} threads)"
    )
    assert idle["live_touches"] > 0 and load["live_writes"] > 0 and load["checkouts_per_s"] > 0
    assert idle["live_errors"] == 0
    assert idle["cpu_percent_of_one_core"] < 5.0
    assert load["cpu_percent_of_one_core"] < 5.0


def test_ended_hold_staleness_percentiles(live_default: Live) -> None:
    """ "Hold ended → gone from the API", measured 30 times: a hold is checked out, seen
    listed, returned; then /api/checkouts is polled until it is gone. The time is taken
    when the first response without it arrives (an upper bound)."""
    live = live_default
    gone_after: list[float] = []
    for _ in range(30):
        live.ask("hold")
        wait_for(lambda: live.http.get("/api/checkouts?server=cached").json(), 10, "listed")
        returned_at = live.ask("release")["returned_at"]
        while True:
            rows = live.http.get("/api/checkouts?server=cached").json()
            received = time.time()
            if not rows:
                gone_after.append(received - returned_at)
                break
            assert received < returned_at + 10, "an ended hold stayed listed"
            time.sleep(0.01)
    ordered = sorted(gone_after)
    p50, p99 = ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    print(
        f"\n[live] ended hold gone from /api/checkouts after: p50 {p50:.3f} s, "
        f"p99 {p99:.3f} s, max {ordered[-1]:.3f} s over {len(ordered)} holds"
    )
    assert p50 <= 0.5
