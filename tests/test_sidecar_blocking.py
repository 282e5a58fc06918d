"""Issue 15, part 1: who blocks whom, mapped back to the code holding the lock.

Unit tests build `PgView`s by hand (cycles, the bounds, unknown roots, rows the join
refuses, the metric series' folding). The end-to-end tests run two real worker processes
(this module's `worker()`, as `python -c`) instrumenting engines on the real PostgreSQL,
a foreign psycopg session calling itself `psql`, the real `pool-monitor sidecar`, a real
Prometheus scraping it and headless Chromium on its live page:

- worker 1 (pool `orders-api`) holds row 1 `FOR UPDATE`, idle in its transaction, at
  `hold_row_lock` (the root blocker's code site, asserted to the line);
- worker 2 (pool `orders-worker`), on two threads, each first updates a row of its own
  (2, 3), then asks for row 1 `FOR SHARE`; a third thread updates row 2 and so waits on
  the first thread;
- the foreign session asks for row 1 `FOR SHARE`.

Shared row locks on purpose: waiters for a shared lock each wait on the holder's
transaction, so PostgreSQL lists the holder as every one's blocker. (Three `UPDATE`s of row
1 would queue: the second and third wait for the first waiter's tuple lock, and
`pg_blocking_pids` says so; the tree would show that chain, correctly.) So the tree is
exactly: the root at `hold_row_lock`, 3 blocked directly, 4 in all, chain depth 2.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
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
import psycopg
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from dashboards.promharness import ScrapeTarget, running_prometheus
from demo_app.stack import libpq_dsn
from monitor.sidecar import api, blocking
from monitor.sidecar.aggregate import View
from monitor.sidecar.app import create_app
from monitor.sidecar.config import SidecarConfig
from monitor.sidecar.metrics import Registries
from monitor.sidecar.postgres import Backend, PgView, PostgresCollector
from monitor.sidecar.runtime import Sidecar
from tests.conftest import require_binary
from tests.helpers import spawn_sidecar, spawn_worker
from tests.test_sidecar_e2e import chromium_dom, free_port, stop_sidecar, wait_for

ROOT = Path(__file__).resolve().parents[1]
NOW = 1_800_000_000.0
ROOT_SITE = "app/orders.py:88:reserve"

# -- constructed views ------------------------------------------------------------------------


def backend(
    pid: int,
    *,
    blocked_by: tuple[int, ...] = (),
    state: str | None = None,
    lock_wait: float | None = None,
    app: str = "orders-api",
    xact_start: float | None = NOW - 5,
    state_change: float = NOW - 4,
    now: float = NOW,
) -> Backend:
    """A `pg_stat_activity` row as the poll makes it: waiting on a lock when `blocked_by`."""
    waiting = bool(blocked_by)
    state = state or ("active" if waiting else "idle in transaction")
    return Backend(
        pid=pid,
        application_name=app,
        state=state,
        wait_event_type="Lock" if waiting else "Client",
        wait_event="transactionid" if waiting else "ClientRead",
        xact_age_s=None if xact_start is None else now - xact_start,
        state_age_s=now - state_change,
        xact_start=xact_start,
        state_change=state_change,
        blocked_by=blocked_by,
        lock_wait_s=lock_wait,
        query=None,
    )


def pg_view(*backends: Backend, now: float = NOW, poll_age: float = 0.1) -> PgView:
    """A successful poll that started `poll_age` before `now` (ended at `now`)."""
    return PgView(
        configured=True,
        up=True,
        polled_at=now,
        poll_started_at=now - poll_age,
        sampled_at=now - poll_age,
        max_connections=100,
        reserved_connections=3,
        backends={b.pid: b for b in backends},
    )


def hold(
    pid: int, site: str, pool: str = "orders-api", started: float = NOW - 10, **extra: Any
) -> dict[str, Any]:
    """A live hold as the aggregator lists it."""
    return {
        "pool": pool,
        "backend_pid": pid,
        "started_at": started,
        "as_of": started + 10,
        "site": site,
        "thread": "MainThread",
        "task": None,
        "process": {"hostname": "orders-7d9f", "pid": 17},
        "sql_time_s": 0.2,
        "executing": False,
        **extra,
    }


def view(*holds: dict[str, Any], now: float = NOW) -> View:
    pools: dict[str, list[dict[str, Any]]] = {}
    for h in holds:
        pools.setdefault(h["pool"], []).append(h)
    return View(
        now, 0.0, [{"pool": p, "holds": hs} for p, hs in pools.items()], {}, [], {}, None, 1
    )


def tree(v: View, pg: PgView, **kwargs: Any) -> dict[str, Any]:
    return blocking.tree(v, pg, NOW, **kwargs)


def pids(nodes: list[dict[str, Any]]) -> list[int]:
    return [n["pid"] for n in nodes]


# -- unit tests -------------------------------------------------------------------------------


def test_each_backend_is_mapped_to_its_hold_and_roots_count_direct_and_transitive() -> None:
    pg = pg_view(
        backend(10),  # idle in transaction for 4 s: the root
        backend(11, blocked_by=(10,), lock_wait=3.0),
        backend(12, blocked_by=(10,), lock_wait=2.5, app="psql"),
        backend(13, blocked_by=(11,), lock_wait=1.0),
        backend(14, blocked_by=(10,), lock_wait=0.5),
        backend(15, state="idle", xact_start=None),  # blocks nobody: not in the graph
    )
    v = view(
        hold(10, ROOT_SITE, trace_id="ab" * 16, span_id="cd" * 8),
        hold(11, "jobs/sync.py:40:run", pool="orders-worker", executing=True),
        hold(13, "jobs/sync.py:52:bump", pool="orders-worker"),
        hold(14, "app/orders.py:120:cancel"),
        hold(15, "app/health.py:9:ping"),
    )
    out = tree(v, pg, trace_url_template="https://tempo.example/trace/{trace_id}")
    assert out["server_unknown"] is None and out["blocked_backends"] == 4
    assert out["more_roots"] == 0 and out["cycles"] == []
    [root] = out["roots"]
    assert {k: root[k] for k in ("pid", "kind", "unknown_reason", "site", "pool", "thread")} == {
        "pid": 10,
        "kind": "hold",
        "unknown_reason": None,
        "site": ROOT_SITE,
        "pool": "orders-api",
        "thread": "MainThread",
    }
    assert root["process"] == {"hostname": "orders-7d9f", "pid": 17}
    assert root["server_state"] == "idle in transaction"
    assert root["doing"] == "idle in transaction for 4.0 s"
    assert (root["age_s"], root["no_sql_s"], root["xact_age_s"]) == (10.0, 9.8, 5.0)
    assert root["trace_url"] == "https://tempo.example/trace/" + "ab" * 16
    assert (root["blocked_direct"], root["blocked_transitive"], root["longest_chain"]) == (3, 4, 2)
    assert root["lock_wait_max_s"] == 3.0 and root["blocked_by"] == [] and root["more"] == 0
    # waiters that block others first, then the longest waits
    assert pids(root["children"]) == [11, 12, 14]
    first, foreign, last = root["children"]
    assert first["kind"] == "hold" and first["site"] == "jobs/sync.py:40:run"
    assert first["doing"] == "waiting for a lock (transactionid) for 3.0 s"
    assert first["no_sql_s"] is None  # a statement is running: no "idle" figure
    assert first["blocked_by"] == [10] and pids(first["children"]) == [13]
    assert first["children"][0]["site"] == "jobs/sync.py:52:bump"
    assert foreign["kind"] == "unknown" and foreign["application_name"] == "psql"
    assert foreign["unknown_reason"] == blocking.NO_HOLD
    assert (foreign["site"], foreign["pool"], foreign["trace_id"]) == (None, None, None)
    assert foreign["children"] == [] and last["site"] == "app/orders.py:120:cancel"
    forest = blocking.build(v, pg, NOW)
    assert blocking.by_site(forest) == [blocking.SiteBlocking(ROOT_SITE, "orders-api", 3, 4, 3.0)]
    assert blocking.longest_chain(forest) == 2


def test_a_row_the_join_refuses_is_unknown_not_pinned_on_the_current_holder() -> None:
    pg = pg_view(
        # the transaction began 30 s ago, before the hold now on pid 20 (10 s ago)
        backend(20, xact_start=NOW - 30, state_change=NOW - 29),
        # a hold that began after the poll sampled its backend
        backend(21, blocked_by=(20,), lock_wait=1.0),
    )
    v = view(hold(20, ROOT_SITE), hold(21, "jobs/sync.py:40:run", started=NOW - 0.01))
    [root] = tree(v, pg)["roots"]
    assert (root["kind"], root["unknown_reason"]) == ("unknown", api.OLDER_XACT)
    assert root["site"] is None and root["application_name"] == "orders-api"
    [waiter] = root["children"]
    assert (waiter["kind"], waiter["unknown_reason"]) == ("unknown", api.SAMPLED_BEFORE)
    forest = blocking.build(v, pg, NOW)
    assert blocking.by_site(forest) == [
        blocking.SiteBlocking(blocking.UNKNOWN, blocking.UNKNOWN, 1, 1, 1.0)
    ]


def test_an_old_sample_attributes_nothing_in_the_api_but_still_in_the_metrics() -> None:
    pg = pg_view(backend(10), backend(11, blocked_by=(10,), lock_wait=1.0), poll_age=1.0)
    v = view(hold(10, ROOT_SITE, started=NOW - 10))
    out = tree(v, pg)
    assert out["server_unknown"] == api.TOO_OLD
    [root] = out["roots"]  # the graph is still shown, nobody is named
    assert (root["kind"], root["unknown_reason"]) == ("unknown", api.TOO_OLD)
    forest = blocking.build(v, pg, NOW, max_sample_age=math.inf)  # what /metrics does
    assert forest.nodes[10].hold is not None and forest.nodes[10].hold["site"] == ROOT_SITE


def test_unknown_roots_and_a_prepared_transaction() -> None:
    pg = pg_view(
        backend(30, app="psql"),
        backend(31, blocked_by=(30,), lock_wait=2.0),
        backend(32, blocked_by=(30,), lock_wait=1.0),
        backend(33, blocked_by=(0,), lock_wait=4.0),  # pg_blocking_pids: 0 = prepared xact
    )
    v = view(hold(31, "jobs/a.py:1:a"), hold(32, "jobs/b.py:2:b"))
    out = tree(v, pg)
    assert pids(out["roots"]) == [30, 0]  # most transitively blocked first
    foreign, prepared = out["roots"]
    assert (foreign["kind"], foreign["application_name"], foreign["unknown_reason"]) == (
        "unknown",
        "psql",
        blocking.NO_HOLD,
    )
    assert foreign["doing"] == "idle in transaction for 4.0 s"
    assert prepared["unknown_reason"] == blocking.PREPARED
    assert prepared["server_state"] is None and prepared["doing"].startswith("prepared")
    assert pids(prepared["children"]) == [33]
    # both unattributed: one label set, distinct waiters, the longest wait
    forest = blocking.build(v, pg, NOW)
    assert blocking.by_site(forest) == [
        blocking.SiteBlocking(blocking.UNKNOWN, blocking.UNKNOWN, 3, 3, 4.0)
    ]


def test_a_deadlock_is_reported_as_a_cycle_and_never_walked_twice() -> None:
    pg = pg_view(
        backend(40, blocked_by=(41,)),
        backend(41, blocked_by=(40,)),
        backend(42, blocked_by=(40,)),
        # a root whose waiter is in a cycle: 51 waits on 50 and 52, 52 on 51
        backend(50),
        backend(51, blocked_by=(50, 52)),
        backend(52, blocked_by=(51,)),
        backend(60, blocked_by=(60,)),  # a backend "blocked by itself" is no edge
    )
    out = tree(pg=pg, v=view())
    assert out["blocked_backends"] == 5
    assert [c["pids"] for c in out["cycles"]] == [[40, 41], [51, 52]]
    assert [c["blocked_transitive"] for c in out["cycles"]] == [1, 0]
    assert pids(out["cycles"][0]["nodes"]) == [40, 41]
    [root] = out["roots"]
    assert root["pid"] == 50 and (root["blocked_direct"], root["blocked_transitive"]) == (1, 2)
    assert root["longest_chain"] == 2
    [a] = root["children"]
    [b] = a["children"]
    assert (a["pid"], b["pid"], b["children"], b["more"]) == (51, 52, [], 0)
    assert b["blocked_by"] == [51] and a["blocked_by"] == [50, 52]


def test_fan_out_depth_size_and_roots_are_bounded() -> None:
    # one root, 120 direct waiters
    fan = [backend(100)] + [backend(1000 + i, blocked_by=(100,)) for i in range(120)]
    [root] = tree(view(), pg_view(*fan))["roots"]
    assert len(root["children"]) == blocking.MAX_CHILDREN == 50 and root["more"] == 70
    assert (root["blocked_direct"], root["blocked_transitive"]) == (120, 120)
    # a chain 15 deep: listed 10 levels down, the rest counted
    chain = [backend(200)] + [backend(201 + i, blocked_by=(200 + i,)) for i in range(15)]
    [root] = tree(view(), pg_view(*chain))["roots"]
    assert root["longest_chain"] == 15 and root["blocked_transitive"] == 15
    node, depth = root, 0
    while node["children"]:
        [node] = node["children"]
        depth += 1
    assert depth == blocking.MAX_DEPTH == 10 and node["pid"] == 210 and node["more"] == 1
    # nodes per tree
    [root] = tree(view(), pg_view(*fan), max_children=1000, max_nodes=30)["roots"]
    assert len(root["children"]) == 29 and root["more"] == 91
    # roots: 25 of them, 20 listed, the most blocked first
    many = [backend(300 + r) for r in range(25)]
    many += [
        backend(400 + 10 * r + w, blocked_by=(300 + r,))
        for r in range(25)
        for w in range(r % 3 + 1)
    ]
    out = tree(view(), pg_view(*many))
    assert len(out["roots"]) == blocking.MAX_ROOTS == 20 and out["more_roots"] == 5
    counts = [r["blocked_transitive"] for r in out["roots"]]
    assert counts == sorted(counts, reverse=True) and counts[0] == 3


def test_metric_series_are_bounded_and_count_shared_waiters_once() -> None:
    rows = []
    holds = []
    for r in range(25):  # 25 root sites, site r blocks 25 - r sessions
        rows.append(backend(1000 + r))
        holds.append(hold(1000 + r, f"app/site{r:02}.py:1:f"))
        rows += [
            backend(10_000 + 100 * r + w, blocked_by=(1000 + r,), lock_wait=float(r))
            for w in range(25 - r)
        ]
    # two roots of one site, both blocking pid 99: it counts once
    rows += [backend(90), backend(91), backend(99, blocked_by=(90, 91), lock_wait=0.5)]
    holds += [hold(90, "app/shared.py:5:g"), hold(91, "app/shared.py:5:g")]
    sites = blocking.by_site(blocking.build(view(*holds), pg_view(*rows), NOW))
    assert len(sites) == blocking.MAX_SITE_SERIES + 1 == 21
    assert [s.transitive for s in sites[:3]] == [25, 24, 23]
    assert sites[0] == blocking.SiteBlocking("app/site00.py:1:f", "orders-api", 25, 25, 0.0)
    other = sites[-1]
    assert (other.code_site, other.pool) == (blocking.OTHER, blocking.OTHER)
    # the rest: sites 20..24 (5+4+3+2+1 waiters) and the shared site's one waiter
    assert (other.direct, other.transitive, other.lock_wait_max_s) == (16, 16, 24.0)
    sites = blocking.by_site(blocking.build(view(*holds[-2:]), pg_view(*rows[-3:]), NOW))
    assert sites == [blocking.SiteBlocking("app/shared.py:5:g", "orders-api", 1, 1, 0.5)]


class CachedOnly(PostgresCollector):
    """A collector with a set view whose poll must never run (a scrape never polls)."""

    def __init__(self, pg: PgView) -> None:
        super().__init__("dbname=never")
        self.view = pg

    def poll(self) -> bool:
        raise AssertionError("a scrape polled PostgreSQL")


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name
    }


def test_metrics_come_from_the_cached_poll_with_exact_values(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = time.time()
    pg = pg_view(
        backend(10, now=now, xact_start=now - 5, state_change=now - 4),
        backend(11, blocked_by=(10,), lock_wait=3.0, now=now, state_change=now - 3),
        backend(12, blocked_by=(10,), lock_wait=2.0, app="psql", now=now, state_change=now - 2),
        backend(13, blocked_by=(11,), lock_wait=1.0, now=now, state_change=now - 1),
        now=now,
        poll_age=4.0,  # the cached poll, older than the API would accept
    )
    v = view(hold(10, ROOT_SITE, started=now - 10), now=now)
    registries = Registries(lambda: v, CachedOnly(pg))
    text = registries.exposition().decode()
    labels = (("code_site", ROOT_SITE), ("db_client_connection_pool_name", "orders-api"))
    assert samples(text, "pool_monitor_blocking_blocked_backends") == {
        (*labels, ("kind", "direct")): 2.0,
        (*labels, ("kind", "transitive")): 3.0,
    }
    assert samples(text, "pool_monitor_blocking_longest_chain") == {(): 2.0}
    assert samples(text, "pool_monitor_blocking_root_lock_wait_max_seconds") == {labels: 3.0}
    # PostgreSQL down: no server figures at all
    down = PgView(configured=True, up=False, polled_at=now, poll_started_at=now)
    text = Registries(lambda: v, CachedOnly(down)).exposition().decode()
    assert "pool_monitor_blocking" not in text and "pg_up 0.0" in text

    # a failure here costs these series only, logged once per streak
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("bad input")

    monkeypatch.setattr(blocking, "build", broken)
    with caplog.at_level(logging.ERROR, "monitor.sidecar.metrics"):
        for _ in range(3):
            text = registries.exposition().decode()
            assert "pool_monitor_blocking" not in text and "pg_up 1.0" in text
    assert sum("lock-wait graph" in r.getMessage() for r in caplog.records) == 1


async def test_api_blocking_needs_the_token_and_serves_the_tree(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    sidecar = Sidecar(SidecarConfig(listen_host="127.0.0.1", auth_token_file=str(token)))
    now = time.time()
    sidecar.pg.view = pg_view(
        backend(10, now=now, xact_start=now - 5, state_change=now - 4),
        backend(11, blocked_by=(10,), lock_wait=1.0, now=now, state_change=now - 1),
        now=now,
    )
    sidecar.view = view(hold(10, ROOT_SITE, started=now - 10), now=now)
    transport = httpx.ASGITransport(create_app(sidecar, manage=False))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        assert (await http.get("/api/blocking")).status_code == 401
        response = await http.get("/api/blocking", headers={"Authorization": "Bearer s3cret"})
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    [root] = response.json()["roots"]
    assert (root["site"], root["blocked_transitive"], pids(root["children"])) == (
        ROOT_SITE,
        1,
        [11],
    )


# -- end to end: the worker process -----------------------------------------------------------

TABLE = "sidecar_blocking_rows"
INTERVAL = 0.2  # the workers' snapshot interval
SITE_MARK = "# <- the root blocker's code site"


def hold_row_lock(engine: sa.Engine) -> sa.Connection:
    """Lock row 1 and keep the transaction open: the root blocker."""
    held = engine.connect()  # <- the root blocker's code site
    held.execute(sa.text(f"SELECT v FROM {TABLE} WHERE id = 1 FOR UPDATE"))
    return held


def share_row_one(
    engine: sa.Engine, own_row: int, locked: threading.Event, pids: dict[str, int]
) -> None:
    """Lock a row of its own, then wait for a shared lock on row 1."""
    with engine.connect() as conn:
        pids[threading.current_thread().name] = conn.connection.dbapi_connection.info.backend_pid
        conn.execute(sa.text(f"UPDATE {TABLE} SET v = v + 1 WHERE id = {own_row}"))
        locked.set()
        conn.execute(sa.text(f"SELECT v FROM {TABLE} WHERE id = 1 FOR SHARE"))
        conn.rollback()


def update_row(engine: sa.Engine, row: int, pids: dict[str, int]) -> None:
    """Update a row another thread of this worker holds (and waits with)."""
    with engine.connect() as conn:
        pids[threading.current_thread().name] = conn.connection.dbapi_connection.info.backend_pid
        conn.execute(sa.text(f"UPDATE {TABLE} SET v = v + 10 WHERE id = {row}"))
        conn.rollback()


def worker(argv: list[str]) -> int:
    """`root`: hold row 1 at `hold_row_lock`; `waiters`: the three threads. Then wait for a
    line on stdin, release everything and exit."""
    import monitor

    spec = json.loads(argv[0])
    engine = sa.create_engine(
        spec["url"], pool_size=4, max_overflow=0, connect_args={"application_name": spec["pool"]}
    )
    monitor.instrument(
        engine,
        pool_name=spec["pool"],
        snapshot_dir=spec["dir"],
        snapshot_interval=INTERVAL,
        long_held_threshold=0,
    )
    pids: dict[str, int] = {}
    threads: list[threading.Thread] = []
    held = None
    if spec["role"] == "root":
        held = hold_row_lock(engine)
        pids["root"] = held.connection.dbapi_connection.info.backend_pid
    else:
        for name, row in (("waiter-row-2", 2), ("waiter-row-3", 3)):
            locked = threading.Event()
            t = threading.Thread(target=share_row_one, args=(engine, row, locked, pids), name=name)
            t.start()
            threads.append(t)
            assert locked.wait(10)
        t = threading.Thread(target=update_row, args=(engine, 2, pids), name="updater-row-2")
        t.start()
        threads.append(t)
        wait_for(lambda: len(pids) == 3, 10, "the third thread's backend")
    print(json.dumps({"pid": os.getpid(), "backend_pids": pids}), flush=True)
    sys.stdin.readline()
    if held is not None:
        held.rollback()
        held.close()
    for t in threads:
        t.join(20)
    engine.dispose()
    return 0


# -- end to end: the cluster ------------------------------------------------------------------


@dataclass
class Cluster:
    http: httpx.Client
    port: int
    workers: dict[str, subprocess.Popen[str]]
    info: dict[str, dict[str, Any]]
    foreign_pid: int
    site: str

    def blocking(self) -> dict[str, Any]:
        return self.http.get("/api/blocking").json()

    def metrics(self) -> str:
        return self.http.get("/metrics").text

    def release_root(self) -> None:
        proc = self.workers["root"]
        if proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.write("exit\n")
            proc.stdin.flush()
            assert proc.wait(20) == 0


def root_site() -> str:
    """`path:LINE:function` of the `engine.connect()` in `hold_row_lock`, from this file."""
    lines = Path(__file__).read_text(encoding="utf-8").splitlines()
    [line] = [i + 1 for i, text in enumerate(lines) if text.rstrip().endswith(SITE_MARK)]
    return f"tests/test_sidecar_blocking.py:{line}:hold_row_lock"


def start_worker(spec: dict[str, Any]) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = spawn_worker("tests.test_sidecar_blocking", spec)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"the {spec['role']} worker printed nothing (exit {proc.poll()})"
    return proc, json.loads(line)


def wait_for_lock_waits(dsn: str, expected: int) -> None:
    """Until PostgreSQL shows `expected` backends of the test's table waiting on a lock."""

    def waiting() -> bool:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE %s",
                (f"%{TABLE}%",),
            ).fetchone()
        return bool(row and row[0] == expected)

    wait_for(waiting, 20, f"{expected} backends waiting on a lock")


@pytest.fixture(scope="module")
def cluster(database_url: str) -> Iterator[Cluster]:
    dsn = libpq_dsn(database_url)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, v int)")
        conn.execute(f"INSERT INTO {TABLE} SELECT g, 0 FROM generate_series(1, 4) g")
    tmp = Path(tempfile.mkdtemp(prefix="pool-monitor-blocking-"))
    snapdir = tmp / "snapshots"
    snapdir.mkdir()
    port = free_port()
    log_file = open(tmp / "sidecar.log", "wb")  # noqa: SIM115 - the sidecar writes it until the end
    options = ["--postgres-dsn", dsn, "--postgres-interval", "0.2", "--scan-interval", "0.1"]
    sidecar = spawn_sidecar(snapdir, port, log_file, *options, "--page-refresh", "0.5")
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    workers: dict[str, subprocess.Popen[str]] = {}
    foreign: psycopg.Connection[Any] | None = None
    foreign_thread: threading.Thread | None = None
    try:
        base = {"url": database_url, "dir": str(snapdir)}
        workers["root"], root_info = start_worker({**base, "role": "root", "pool": "orders-api"})
        foreign = psycopg.connect(dsn, application_name="psql")
        foreign_pid = foreign.info.backend_pid

        def foreign_share() -> None:
            assert foreign is not None
            foreign.execute(f"SELECT v FROM {TABLE} WHERE id = 1 FOR SHARE")
            foreign.rollback()

        foreign_thread = threading.Thread(target=foreign_share, name="psql-session")
        foreign_thread.start()
        workers["waiters"], waiters_info = start_worker(
            {**base, "role": "waiters", "pool": "orders-worker"}
        )
        wait_for_lock_waits(dsn, 4)

        def healthy() -> bool:
            try:
                return http.get("/healthz").status_code == 200
            except httpx.TransportError:
                assert sidecar.poll() is None, (tmp / "sidecar.log").read_text()
                return False

        wait_for(healthy, 30, "the sidecar's /healthz")
        info = {"root": root_info, "waiters": waiters_info}
        yield Cluster(http, port, workers, info, foreign_pid, root_site())
    finally:
        for proc in workers.values():  # the root first: it releases everyone
            if proc.poll() is None and proc.stdin is not None:
                try:
                    proc.stdin.write("exit\n")
                    proc.stdin.flush()
                    proc.wait(20)
                except (OSError, subprocess.TimeoutExpired):
                    proc.kill()
                    proc.wait(10)
        if foreign_thread is not None:
            foreign_thread.join(20)
        if foreign is not None:
            foreign.close()
        stop_sidecar(sidecar, http, log_file, tmp)


def settled_tree(cluster: Cluster) -> dict[str, Any]:
    """/api/blocking once every one of our four backends is attributed to its hold."""

    def probe() -> dict[str, Any] | None:
        out = cluster.blocking()
        roots = out["roots"]
        if len(roots) != 1 or roots[0]["blocked_transitive"] != 4:
            return None
        nodes = [roots[0]]
        for node in nodes:
            nodes.extend(node["children"])
        ours = [n for n in nodes if n["pid"] != cluster.foreign_pid]
        return out if len(ours) == 4 and all(n["kind"] == "hold" for n in ours) else None

    return wait_for(probe, 20, "the blocking tree with all four holds attributed")


def test_tree_has_the_root_site_with_four_blocked_three_directly(cluster: Cluster) -> None:
    out = settled_tree(cluster)
    print("\n[blocking] /api/blocking:\n" + json.dumps(out, indent=1))
    waiters = cluster.info["waiters"]["backend_pids"]
    root_pid = cluster.info["root"]["backend_pids"]["root"]
    assert out["server_unknown"] is None and out["blocked_backends"] == 4
    assert (out["cycles"], out["more_roots"]) == ([], 0)
    [root] = out["roots"]
    assert root["pid"] == root_pid and root["kind"] == "hold"
    assert root["site"] == cluster.site  # exactly: path, line of engine.connect(), function
    assert (root["pool"], root["thread"], root["application_name"]) == (
        "orders-api",
        "MainThread",
        "orders-api",
    )
    assert root["process"]["pid"] == cluster.info["root"]["pid"]
    assert root["server_state"] == "idle in transaction"
    assert re.fullmatch(r"idle in transaction for \d+\.\d s", root["doing"]), root["doing"]
    assert (root["blocked_direct"], root["blocked_transitive"], root["longest_chain"]) == (3, 4, 2)
    assert root["lock_wait_max_s"] > 0 and root["no_sql_s"] > 0 and root["more"] == 0
    assert root["executing"] is False and root["blocked_by"] == []
    # the waiter that blocks the fourth session comes first
    first = root["children"][0]
    assert first["pid"] == waiters["waiter-row-2"]
    assert {c["pid"] for c in root["children"]} == {
        waiters["waiter-row-2"],
        waiters["waiter-row-3"],
        cluster.foreign_pid,
    }
    by_pid = {c["pid"]: c for c in root["children"]}
    for name in ("waiter-row-2", "waiter-row-3"):
        node = by_pid[waiters[name]]
        assert (node["kind"], node["pool"], node["thread"]) == ("hold", "orders-worker", name)
        assert node["site"].startswith("tests/test_sidecar_blocking.py:")
        assert node["site"].endswith(":share_row_one")
        assert node["doing"].startswith("waiting for a lock (transactionid) for ")
        assert node["blocked_by"] == [root_pid] and node["executing"] is True
    foreign = by_pid[cluster.foreign_pid]
    assert (foreign["kind"], foreign["application_name"]) == ("unknown", "psql")
    assert foreign["unknown_reason"] == blocking.NO_HOLD
    assert (foreign["site"], foreign["pool"], foreign["children"]) == (None, None, [])
    assert by_pid[waiters["waiter-row-3"]]["children"] == []
    [fourth] = first["children"]
    assert fourth["pid"] == waiters["updater-row-2"] and fourth["kind"] == "hold"
    assert fourth["site"].endswith(":update_row") and fourth["blocked_by"] == [first["pid"]]
    assert fourth["thread"] == "updater-row-2" and fourth["children"] == []


def test_metrics_show_the_root_site_with_exact_values(cluster: Cluster) -> None:
    labels = (("code_site", cluster.site), ("db_client_connection_pool_name", "orders-api"))

    def exact() -> str | None:
        text = cluster.metrics()
        blocked = samples(text, "pool_monitor_blocking_blocked_backends")
        want = {(*labels, ("kind", "direct")): 3.0, (*labels, ("kind", "transitive")): 4.0}
        return text if blocked == want else None

    text = wait_for(exact, 20, "the blocking series of the root's site")
    assert samples(text, "pool_monitor_blocking_longest_chain") == {(): 2.0}
    [wait] = samples(text, "pool_monitor_blocking_root_lock_wait_max_seconds").items()
    assert wait[0] == labels and 0 < wait[1] < 120


def test_alert_fires_in_a_real_prometheus_scraping_the_sidecar(cluster: Cluster) -> None:
    binary = require_binary("prometheus")
    target = ScrapeTarget("pool-monitor-sidecar", f"127.0.0.1:{cluster.port}")
    with running_prometheus(
        [target], for_={"PoolCodeSiteBlockingSessions": "1s"}, binary=binary
    ) as prom:
        alert = prom.wait_for_alert("PoolCodeSiteBlockingSessions", "firing", timeout=60)
    assert alert["labels"] == {
        "alertname": "PoolCodeSiteBlockingSessions",
        "code_site": cluster.site,
        "db_client_connection_pool_name": "orders-api",
        "job": "pool-monitor-sidecar",
        "severity": "warning",
    }
    assert alert["annotations"]["summary"] == (
        f"Code site {cluster.site} (pool orders-api) blocks 4 database sessions"
    )
    assert alert["annotations"]["runbook_url"].endswith("#poolcodesiteblockingsessions")


def test_live_page_shows_the_root_first_and_the_unknown_session(
    cluster: Cluster, tmp_path: Path
) -> None:
    settled_tree(cluster)
    dom = chromium_dom(f"http://127.0.0.1:{cluster.port}/", tmp_path / "profile")
    section = re.search(r'<section id="blocking"([^>]*)>(.*?)</section>', dom, re.S)
    assert section is not None and "hidden" not in section.group(1), dom[:3000]
    html = section.group(2)
    root_pid = cluster.info["root"]["backend_pids"]["root"]
    first_li = re.search(r'<li class="root hold-node" data-pid="(\d+)" data-kind="hold">', html)
    assert first_li is not None and int(first_li.group(1)) == root_pid, html
    assert html.index(cluster.site) < html.index("unknown session")
    assert "blocks 4 sessions (3 directly), longest chain 2" in html
    assert re.search(r"idle in transaction for \d+\.\d s", html)
    assert f'data-pid="{cluster.foreign_pid}" data-kind="unknown"' in html
    assert "application_name psql" in html and "(4 sessions waiting)" in html


def test_releasing_the_root_empties_the_tree_and_the_series(cluster: Cluster) -> None:
    cluster.release_root()
    out = wait_for(lambda: (t := cluster.blocking())["roots"] == [] and t, 20, "an empty tree")
    assert out["blocked_backends"] == 0 and out["cycles"] == []
    text = wait_for(
        lambda: (
            (m := cluster.metrics())
            and not samples(m, "pool_monitor_blocking_blocked_backends")
            and m
        ),
        20,
        "no blocking series",
    )
    assert samples(text, "pool_monitor_blocking_longest_chain") == {(): 0.0}
    for proc in cluster.workers.values():
        if proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.write("exit\n")
            proc.stdin.flush()
            assert proc.wait(20) == 0
    assert all(p.returncode == 0 for p in cluster.workers.values())


def test_a_migration_pile_up_stays_cheap_and_exact() -> None:
    """N sessions hold ACCESS SHARE on a table, an ALTER TABLE waits on all of them, N more
    queue behind the ALTER: N roots each reaching N + 1 backends. Reach is bit masks over
    the condensed graph, so 3,000 sessions build in well under a second (a set per root
    took 4.6 s and 376 MiB before; printed, not asserted: the machine may be busy)."""
    n = 3000
    holders = [backend(1 + i) for i in range(n)]
    alter = backend(10_000, blocked_by=tuple(1 + i for i in range(n)), lock_wait=2.0)
    queued = [backend(20_000 + i, blocked_by=(10_000,), lock_wait=1.0) for i in range(n)]
    started = time.perf_counter()
    forest = blocking.build(view(), pg_view(*holders, alter, *queued), NOW)
    sites = blocking.by_site(forest)
    print(
        f"\n[bench] blocking forest of {2 * n + 1} backends: {time.perf_counter() - started:.3f} s"
    )
    assert len(forest.roots) == n and forest.blocked == n + 1
    assert {(r.blocked_direct, r.blocked_transitive, r.depth) for r in forest.roots} == {
        (1, n + 1, 2)
    }
    assert {r.lock_wait_max_s for r in forest.roots} == {2.0}
    [unknown] = sites  # no hold on any of them: one (unknown) label set
    assert (unknown.direct, unknown.transitive) == (1, n + 1)
