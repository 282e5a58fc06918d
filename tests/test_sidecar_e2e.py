"""End to end (issue 5): three real worker processes on the real PostgreSQL, the real
`pool-monitor sidecar` command, and headless Chromium on its live page.

Workers (this module's `worker()`, run as `python -c`) do known workloads, then hold one
connection each: one idle in a transaction, one holding a row lock, one blocked on that
row. The sidecar must sum their counters exactly, join each hold with the server's view
of its backend, keep the counters when the workers exit (one of them killed), and drop
their gauges within three snapshot intervals.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import psycopg
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from demo_app.stack import libpq_dsn
from tests.conftest import require_binary
from tests.helpers import spawn_sidecar, spawn_worker

ROOT = Path(__file__).resolve().parents[1]
INTERVAL = 0.2  # the workers' snapshot interval
IDLE_S = 1.0  # how long the idle-in-transaction hold must be visible for
TABLE = "sidecar_e2e_rows"


# -- the worker process -----------------------------------------------------------------
def worker(argv: list[str]) -> int:
    """A worker: known checkouts, then one hold (`idle`, `lock` or `wait`) until told."""
    import monitor

    spec = json.loads(argv[0])
    engine = sa.create_engine(
        spec["url"], pool_size=3, max_overflow=0, connect_args={"application_name": spec["app"]}
    )
    pm = monitor.instrument(
        engine,
        pool_name=spec["pool"],
        snapshot_dir=spec["dir"],
        snapshot_interval=INTERVAL,
        long_held_threshold=0,
    )
    for _ in range(spec["checkouts"]):
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    for _ in range(spec["locks"]):
        with monitor.lock("e2e-lock"):
            pass
    pids: list[int] = []
    held = None
    thread = None
    if spec["hold"] in ("idle", "lock"):
        held = engine.connect()
        pids.append(held.connection.dbapi_connection.info.backend_pid)
        held.execute(
            sa.text("SELECT 1")
            if spec["hold"] == "idle"
            else sa.text(f"UPDATE {TABLE} SET v = v + 1 WHERE id = 1")
        )
    else:
        got_pid = threading.Event()

        def blocked_update() -> None:
            with engine.connect() as conn:
                pids.append(conn.connection.dbapi_connection.info.backend_pid)
                got_pid.set()
                conn.execute(sa.text(f"UPDATE {TABLE} SET v = v + 10 WHERE id = 1"))
                conn.commit()

        thread = threading.Thread(target=blocked_update, name="blocked-updater")
        thread.start()
        got_pid.wait(10)
    print(json.dumps({"pid": os.getpid(), "backend_pid": pids[0]}), flush=True)
    sys.stdin.readline()  # the test says when to finish
    if held is not None:
        held.rollback()
        held.close()
    if thread is not None:
        thread.join(10)
    snap = pm.snapshot()
    print(json.dumps({"checkouts": snap["counters"]["sqlalchemy.pool.checkouts"]}), flush=True)
    engine.dispose()
    return 0


# -- helpers ----------------------------------------------------------------------------
def _readline(stream: IO[str], timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise TimeoutError(f"no line from the process within {timeout} s")
    return stream.readline()


@dataclass
class Worker:
    proc: subprocess.Popen[str]
    spec: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)

    def finish(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("exit\n")
        self.proc.stdin.flush()
        line = _readline(self.proc.stdout, 20)
        assert self.proc.wait(20) == 0
        return json.loads(line)


def start_worker(spec: dict[str, Any]) -> Worker:
    return Worker(spawn_worker("tests.test_sidecar_e2e", spec), spec)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def metric(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


@dataclass
class Cluster:
    url: str
    http: httpx.Client
    workers: dict[str, Worker]
    sidecar: subprocess.Popen[bytes]
    log: Path

    def metrics(self) -> str:
        return self.http.get("/metrics").text

    def checkouts(self) -> list[dict[str, Any]]:
        return self.http.get("/api/checkouts").json()

    def pools(self) -> dict[str, dict[str, Any]]:
        return {p["pool"]: p for p in self.http.get("/api/pools").json()["pools"]}


@pytest.fixture(scope="module")
def cluster(database_url: str) -> Iterator[Cluster]:
    dsn = libpq_dsn(database_url)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, v int)")
        conn.execute(f"INSERT INTO {TABLE} VALUES (1, 0)")
    tmp = Path(tempfile.mkdtemp(prefix="pool-monitor-e2e-"))
    snapdir = tmp / "snapshots"
    snapdir.mkdir()
    port = free_port()
    log = tmp / "sidecar.log"
    options = "--postgres-interval 0.2 --scan-interval 0.1 --page-refresh 0.5 --show-query-text"
    log_file = open(log, "wb")  # noqa: SIM115 - the process writes it until the end
    sidecar = spawn_sidecar(snapdir, port, log_file, "--postgres-dsn", dsn, *options.split())
    workers: dict[str, Worker] = {}
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5)
    try:
        base = {"url": database_url, "dir": str(snapdir), "locks": 0}
        specs = {
            "idle": {
                **base,
                "pool": "orders-api",
                "app": "orders-api",
                "checkouts": 7,
                "locks": 2,
                "hold": "idle",
            },
            "lock": {
                **base,
                "pool": "orders-api",
                "app": "orders-api",
                "checkouts": 11,
                "locks": 3,
                "hold": "lock",
            },
            "wait": {
                **base,
                "pool": "orders-background",
                "app": "orders-background",
                "checkouts": 5,
                "hold": "wait",
            },
        }
        for name in ("idle", "lock"):  # the lock must be held before the waiter asks
            workers[name] = start_worker(specs[name])
        for name in ("idle", "lock"):
            workers[name].info = json.loads(_readline(workers[name].proc.stdout, 30))  # type: ignore[arg-type]
        workers["wait"] = start_worker(specs["wait"])
        workers["wait"].info = json.loads(_readline(workers["wait"].proc.stdout, 30))  # type: ignore[arg-type]

        def healthy() -> bool:
            try:
                return http.get("/healthz").status_code == 200
            except httpx.TransportError:
                assert sidecar.poll() is None, log.read_text()
                return False

        wait_for(healthy, 30, "the sidecar's /healthz")
        yield Cluster(database_url, http, workers, sidecar, log)
    finally:
        for w in workers.values():
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait(10)
        stop_sidecar(sidecar, http, log_file, tmp)


def stop_sidecar(
    sidecar: subprocess.Popen[Any], http: httpx.Client, log_file: Any, tmp: Path
) -> None:
    """SIGTERM the sidecar (killed if it lingers) and clean up what the test made."""
    sidecar.send_signal(signal.SIGTERM)
    try:
        sidecar.wait(10)
    except subprocess.TimeoutExpired:
        sidecar.kill()
    http.close()
    log_file.close()
    shutil.rmtree(tmp, ignore_errors=True)


def _by_pid(cluster: Cluster) -> dict[int, dict[str, Any]]:
    return {row["backend_pid"]: row for row in cluster.checkouts()}


# -- the tests, in order: the last one ends the workers ---------------------------------
def test_merged_counters_are_exact(cluster: Cluster) -> None:
    def merged() -> dict[str, float | None] | None:
        text = cluster.metrics()
        values = {
            pool: metric(
                text, "sqlalchemy_pool_checkouts_total", db_client_connection_pool_name=pool
            )
            for pool in ("orders-api", "orders-background")
        }
        return values if values == {"orders-api": 20.0, "orders-background": 6.0} else None

    wait_for(merged, 10, "merged checkouts 7+1 + 11+1 and 5+1")
    text = cluster.metrics()
    assert (
        metric(
            text,
            "db_client_connection_use_time_seconds_count",
            db_client_connection_pool_name="orders-api",
        )
        == 18
    )  # returned ones only
    assert metric(text, "app_lock_wait_time_seconds_count", lock_name="e2e-lock") == 5
    assert (
        metric(
            text,
            "db_client_connection_count",
            db_client_connection_pool_name="orders-api",
            db_client_connection_state="used",
        )
        == 2
    )
    assert (
        metric(text, "db_client_connection_max", db_client_connection_pool_name="orders-api") == 6
    )  # 2 processes × 3
    assert metric(text, "pool_monitor_sidecar_processes", state="live") == 3
    assert metric(text, "pool_monitor_snapshot_errors_total", reason="corrupt") == 0


def test_idle_in_transaction_hold_is_joined_with_the_server(cluster: Cluster) -> None:
    pid = cluster.workers["idle"].info["backend_pid"]

    def idle_long_enough() -> str | None:
        text = cluster.metrics()
        idle = metric(text, "pg_app_idle_in_transaction_max_seconds", application_name="orders-api")
        return text if idle is not None and idle >= IDLE_S else None

    text = wait_for(idle_long_enough, 15, f"orders-api idle in transaction for {IDLE_S} s")
    app = {"application_name": "orders-api"}
    assert metric(text, "pg_app_backends", **app, state="idle in transaction") == 2
    assert metric(text, "pg_app_backends", **app, state="active") == 0
    assert (metric(text, "pg_app_transaction_max_seconds", **app) or 0) >= IDLE_S
    assert metric(text, "pg_up") == 1
    assert (metric(text, "pg_max_connections") or 0) >= 10
    assert metric(text, "pg_reserved_connections") is not None

    # The hold's age comes from its worker's last snapshot and the server's from the
    # sidecar's own PostgreSQL poll: sampled at different moments, so wait for the row too.
    def row_old_enough() -> dict[str, Any] | None:
        row = _by_pid(cluster).get(pid)
        if row and row["server_xact_age_s"] >= IDLE_S and row["age_s"] >= IDLE_S:
            return row
        return None

    row = wait_for(row_old_enough, 15, f"hold and transaction of pid {pid} aged {IDLE_S} s")
    assert row["pool"] == "orders-api" and row["server_state"] == "idle in transaction"
    assert row["site"].startswith("tests/test_sidecar_e2e.py:") and row["site"].endswith(":worker")
    assert row["thread"] == "MainThread" and row["blocked_by"] == []
    assert row["wait_event"] == "ClientRead" and row["application_name"] == "orders-api"


def test_blocked_backend_shows_its_blocker_and_the_blocking_hold(cluster: Cluster) -> None:
    blocker = cluster.workers["lock"].info["backend_pid"]
    waiter = cluster.workers["wait"].info["backend_pid"]
    row = wait_for(
        lambda: (_by_pid(cluster).get(waiter) or {}).get("blocked_by") and _by_pid(cluster)[waiter],
        10,
        "the blocked hold",
    )
    [by] = row["blocked_by"]
    assert by["pid"] == blocker and by["application_name"] == "orders-api"
    assert by["server_state"] == "idle in transaction"
    [holder] = by["holds"]
    assert holder["pool"] == "orders-api" and holder["site"] == _by_pid(cluster)[blocker]["site"]
    assert row["pool"] == "orders-background" and row["thread"] == "blocked-updater"
    assert row["wait_event_type"] == "Lock" and row["server_state"] == "active"
    # --show-query-text: the statement's shape, never its values
    assert row["query"] == f"UPDATE {TABLE} SET v = v + ? WHERE id = ?"
    text = cluster.metrics()
    assert metric(text, "pg_app_blocked_backends", application_name="orders-background") == 1
    assert metric(text, "pg_app_blocked_backends", application_name="orders-api") == 0
    assert metric(text, "pg_app_lock_wait_max_seconds", application_name="orders-background") > 0  # type: ignore[operator]


def chromium_dom(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran (virtual time lets the fetches finish)."""
    chromium = require_binary("chromium")
    result = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=4000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert 'data-state="loaded"' in result.stdout, (result.stderr[-2000:], result.stdout[:2000])
    return result.stdout


def hold_rows(dom: str) -> list[str]:
    return re.findall(r'<tr class="hold[^"]*"[^>]*>(.*?)</tr>', dom, re.S)


def test_live_page_renders_pools_and_holds_in_chromium(cluster: Cluster, tmp_path: Path) -> None:
    dom = chromium_dom(str(cluster.http.base_url) + "/", tmp_path / "profile")
    assert 'data-pool="orders-api"' in dom and 'data-pool="orders-background"' in dom
    rows = hold_rows(dom)
    assert len(rows) == 3, dom
    blocker = cluster.workers["lock"].info["backend_pid"]
    waiter_row = next(r for r in rows if "blocked-updater" in r)
    assert f"pid {blocker} orders-api @ tests/test_sidecar_e2e.py:" in waiter_row
    assert any("idle in transaction" in r for r in rows)
    assert "PostgreSQL up" in dom and "3 live processes" in dom
    assert 'data-key="age_s" class="num" aria-sort="descending"' in dom  # oldest first
    # sorted by site, descending (the newest hold, the waiter's, sorts first: not age order)
    dom = chromium_dom(str(cluster.http.base_url) + "/#sort=-site", tmp_path / "profile2")
    sites = [
        re.search(r'class="site">([^<]*)<', r).group(1)  # type: ignore[union-attr]
        for r in hold_rows(dom)
    ]
    assert sites == sorted(sites, reverse=True) and sites[0].endswith(":blocked_update")
    assert 'data-key="site" aria-sort="descending"' in dom


def test_workers_exit_counters_stay_and_use_drops_to_zero(cluster: Cluster) -> None:
    finals = {"lock": cluster.workers["lock"].finish()}  # releases the row lock
    finals["wait"] = cluster.workers["wait"].finish()
    killed = cluster.workers["idle"]
    killed.proc.send_signal(signal.SIGKILL)  # no exit document: found stale instead
    killed.proc.wait(10)
    gone = time.monotonic()
    wait_for(
        lambda: all(p["used"] == 0 and p["processes"] == 0 for p in cluster.pools().values()),
        10,
        "used back to 0",
    )
    took = time.monotonic() - gone
    print(
        f"\n[e2e] gauges of a SIGKILLed worker gone after {took:.2f} s "
        f"(3 intervals = {3 * INTERVAL:.1f} s + scan)"
    )
    assert finals == {"lock": {"checkouts": 12}, "wait": {"checkouts": 6}}
    pools = cluster.pools()
    assert pools["orders-api"]["checkouts"] == 8 + 12  # the killed worker's last document
    assert pools["orders-background"]["checkouts"] == 6
    assert cluster.checkouts() == []
    text = cluster.metrics()
    assert (
        metric(text, "sqlalchemy_pool_checkouts_total", db_client_connection_pool_name="orders-api")
        == 20
    )
    assert (
        metric(
            text,
            "db_client_connection_use_time_seconds_count",
            db_client_connection_pool_name="orders-background",
        )
        == 6
    )
    assert metric(text, "pool_monitor_sidecar_processes", state="exited") == 2
    assert metric(text, "pool_monitor_sidecar_processes", state="dead") == 1
    assert cluster.sidecar.poll() is None
