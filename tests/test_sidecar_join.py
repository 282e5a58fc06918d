"""A consistent join of holds with PostgreSQL's rows ("tell the truth in real deployments").

The issue: the server view was polled every 5 s and the cached row attached to holds that
began after the poll (transaction age 5.1 s on a 1.07 s hold, state `idle` for a hold
inside a transaction). Here, against the real embedded PostgreSQL and a real instrumented
pool in this process: a row sampled before a hold began, or one describing the previous
holder's transaction on the same backend pid, is never attached (the server fields are
null and `server_unknown` says why); `/api/checkouts` gets a fresh sample (≤ 0.5 s) from
a rate-limited on-demand poll; `/metrics` scrapes never cause a query.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

import monitor
from demo_app.stack import libpq_dsn
from monitor.exporters import snapshot
from monitor.sidecar import api
from monitor.sidecar.aggregate import View
from monitor.sidecar.app import create_app
from monitor.sidecar.config import SidecarConfig
from monitor.sidecar.postgres import PostgresCollector
from monitor.sidecar.runtime import Sidecar

POOL = "join-pool"
#: comfortably more than api.CLOCK_TOLERANCE_S, so "before"/"after" are unambiguous
GAP_S = 0.15


@dataclass
class Setup:
    engine: sa.Engine
    sidecar: Sidecar
    snapdir: Path
    reads: list[float]

    def publish(self) -> None:
        """Wait until the sidecar's view has this process's holds as they are now: this
        process's real writer thread (the worker's side) vouches for its live holds every
        `LIVE_CHECK_S`, the sidecar's thread reads them every `live_scan_interval`. Holds
        are aged only up to shortly after their worker last vouched for them, so a one-off
        document would not do: its holds would stop ageing, as a stalled worker's do."""
        after = time.time() + snapshot.LIVE_CHECK_S + 0.05
        deadline = time.monotonic() + 10
        while self.sidecar.view.holds_at <= after or not any(
            p["pid"] == os.getpid() and p["state"] == "live" for p in self.sidecar.view.processes
        ):
            assert time.monotonic() < deadline, "the sidecar did not read the live holds"
            time.sleep(0.01)

    def rows(self, **kwargs: Any) -> list[dict[str, Any]]:
        """/api/checkouts as computed from the cached view, without asking for a poll."""
        return api.checkouts(self.sidecar.view, self.sidecar.pg.view, **kwargs)

    def wait_polled(self, after: float, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while (self.sidecar.pg.view.poll_started_at or 0.0) <= after:
            assert time.monotonic() < deadline, "no PostgreSQL poll"
            time.sleep(0.01)


@pytest.fixture
def setup(database_url: str, tmp_path: Path) -> Iterator[Setup]:
    """A one-connection pool on the real server, written by this process's real snapshot
    writer (full and live documents), and a running sidecar whose periodic poll is
    hourly: every poll after the first is an on-demand one (or the test's own)."""
    engine = sa.create_engine(database_url, pool_size=1, max_overflow=0)
    snapdir = tmp_path / "snapshots"
    snapdir.mkdir()
    monitor.instrument(engine, pool_name=POOL, snapshot_dir=str(snapdir), snapshot_interval=1.0)
    cfg = SidecarConfig(
        snapshot_dir=str(snapdir),
        postgres_dsn=libpq_dsn(database_url),
        postgres_interval=3600,
        listen_host="127.0.0.1",
    )
    sidecar = Sidecar(cfg)
    reads: list[float] = []
    read = sidecar.pg._read

    def counting_read(conn: Any) -> Any:  # every poll's queries go through here
        reads.append(time.time())
        return read(conn)

    sidecar.pg._read = counting_read  # type: ignore[method-assign]
    setup = Setup(engine, sidecar, snapdir, reads)
    try:
        with engine.connect() as conn:  # the pool's one backend exists before the first poll
            conn.execute(sa.text("SELECT 1"))
        sidecar.start()  # the scanning thread, and the polling one
        setup.wait_polled(0.0)
        setup.publish()
        yield setup
    finally:
        sidecar.stop()
        monitor.uninstrument(engine)
        snapshot.stop_all()
        engine.dispose()


def _client(sidecar: Sidecar) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(create_app(sidecar, manage=False)), base_url="http://[::1]"
    )


def _only(rows: list[dict[str, Any]]) -> dict[str, Any]:
    [row] = rows
    return row


def _assert_unknown(row: dict[str, Any], reason: str | None = None) -> None:
    assert row["server_unknown"], row
    if reason is not None:
        assert row["server_unknown"] == reason, row
    for key in ("server_state", "server_xact_age_s", "wait_event", "application_name"):
        assert row[key] is None, (key, row)
    assert row["blocked_by"] == []


async def test_hold_newer_than_the_poll_is_unknown_until_a_fresh_poll(setup: Setup) -> None:
    pg = setup.sidecar.pg
    time.sleep(GAP_S)  # the hold begins well after the last poll
    held = setup.engine.connect()
    try:
        held.execute(sa.text("SELECT 1"))  # now idle in transaction
        pid = held.connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
        setup.publish()
        stale = pg.view.backends[pid]
        assert stale.state == "idle"  # what the old join showed for this hold
        # the cached row, however recent, is not this hold's
        row = _only(setup.rows(max_sample_age=math.inf))
        _assert_unknown(row, api.SAMPLED_BEFORE)
        assert row["backend_pid"] == pid and row["server_as_of"] == pg.view.sampled_at
        # and when no fresh poll can be had (rate limit), the API shows unknown, not it
        pg.min_refresh_s = 3600
        async with _client(setup.sidecar) as http:
            started = time.monotonic()
            [row] = (await http.get("/api/checkouts")).json()
            waited = time.monotonic() - started
            _assert_unknown(row)
            assert row["server_unknown"] in (api.SAMPLED_BEFORE, api.TOO_OLD)
            assert waited < 10  # bounded (REFRESH_WAIT_S), generously
            pg.min_refresh_s = 0.5  # a fresh poll is allowed again
            [row] = (await http.get("/api/checkouts")).json()
        assert row["server_unknown"] is None, row
        assert row["server_state"] == "idle in transaction"
        assert row["wait_event"] == "ClientRead"
        assert 0 <= row["server_xact_age_s"] <= row["age_s"]
        assert row["server_sample_age_s"] <= api.MAX_SAMPLE_AGE_S
        assert pg.on_demand_polls >= 1
    finally:
        held.close()


async def test_previous_holders_row_is_never_attached_to_a_new_hold(setup: Setup) -> None:
    pg = setup.sidecar.pg
    first = setup.engine.connect()
    first.execute(sa.text("SELECT 1"))  # the previous holder, in a transaction
    pid = first.connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
    time.sleep(GAP_S)  # its transaction is older than the clock tolerance
    polled = time.time()
    assert pg.poll()
    old = pg.view
    previous = old.backends[pid]
    assert previous.state == "idle in transaction" and previous.xact_start is not None
    time.sleep(GAP_S)
    first.close()  # rolled back and returned; the next hold gets the same backend
    time.sleep(GAP_S)  # (a rollback within the clock tolerance would count as the hold's)
    second = setup.engine.connect()
    try:
        assert second.connection.dbapi_connection.info.backend_pid == pid  # type: ignore[union-attr]
        setup.publish()
        hold = _only(setup.rows(max_sample_age=math.inf))
        started = time.time() - hold["age_s"]
        assert started > polled
        # 1. the cached row (the previous holder's transaction) is not attached
        _assert_unknown(hold, api.SAMPLED_BEFORE)
        # 2. a fresh row while the new holder has done nothing yet: still the previous
        #    holder's state ('idle' since its rollback), so still unknown
        time.sleep(GAP_S)
        assert pg.poll()
        assert pg.view.backends[pid].state == "idle"
        _assert_unknown(_only(setup.rows()), api.OLDER_STATE)
        # 3. clock skew within the tolerance: a row sampled just *before* the hold began
        #    (to the hold's clock) that shows the previous holder's transaction
        skewed = previous.xact_start + api.CLOCK_TOLERANCE_S * 3
        assert old.sampled_at is not None and old.sampled_at >= skewed - api.CLOCK_TOLERANCE_S
        assert api.join(previous, old, skewed, now=old.poll_started_at) == api.OLDER_XACT
        # 4. once the new holder starts its own transaction, its row is shown
        second.execute(sa.text("SELECT 1"))
        time.sleep(0.01)
        assert pg.poll()
        row = _only(setup.rows())
        assert row["server_unknown"] is None, row
        assert row["server_state"] == "idle in transaction"
        assert 0 <= row["server_xact_age_s"] <= row["age_s"]
    finally:
        second.close()


async def test_checkouts_are_fresh_and_metrics_scrapes_never_query(setup: Setup) -> None:
    time.sleep(GAP_S)
    held = setup.engine.connect()
    try:
        held.execute(sa.text("SELECT 1"))
        setup.publish()
        async with _client(setup.sidecar) as http:

            async def scrapes(n: int) -> None:
                before = len(setup.reads)
                view = setup.sidecar.pg.view
                for _ in range(n):
                    assert (await http.get("/metrics")).status_code == 200
                assert len(setup.reads) == before, "a /metrics scrape queried PostgreSQL"
                assert setup.sidecar.pg.view is view

            await scrapes(100)
            began = time.monotonic()
            polls_before = len(setup.reads)
            rounds = joined = 0
            while time.monotonic() - began < 1.5:  # a page refreshing, 20 viewers at once
                sent = time.time()
                responses = await asyncio.gather(*(http.get("/api/checkouts") for _ in range(20)))
                received = time.time()
                for response in responses:
                    row = _only(response.json())
                    if row["server_unknown"] is not None:  # the machine stalled: no stale row
                        _assert_unknown(row, api.TOO_OLD)
                        continue
                    joined += 1
                    assert row["server_state"] == "idle in transaction"
                    assert row["server_sample_age_s"] <= api.MAX_SAMPLE_AGE_S
                    # "as of" is the server's clock (the same host's here)
                    assert received - row["server_as_of"] <= api.MAX_SAMPLE_AGE_S + (
                        received - sent
                    )
                rounds += 1
                await asyncio.sleep(0.05)
            elapsed = time.monotonic() - began
            assert joined >= rounds * 20 / 2, (joined, rounds)
            polls = len(setup.reads) - polls_before
            # rate limit: polls start ≥ 0.5 s apart, whatever the number of requests
            assert 1 <= polls <= elapsed / setup.sidecar.pg.min_refresh_s + 1, (polls, rounds)
            starts = setup.reads[polls_before:]
            assert all(b - a >= 0.4 for a, b in itertools.pairwise(starts)), starts
            await scrapes(100)
    finally:
        held.close()


def test_no_wait_and_no_extra_polls_while_postgres_is_down() -> None:
    """A down server keeps its reconnect backoff: requests neither wait for nor force
    polls (each would be a connect attempt), and rows say why they are unknown."""
    collector = PostgresCollector("dbname=x password=hunter2 oops", 0.1, backoff_max=60)
    collector.start()
    try:
        deadline = time.monotonic() + 10
        while collector.errors < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        polls = collector.polls
        began = time.monotonic()
        view = collector.refresh(wait=30)
        assert time.monotonic() - began < 10 and not view.up
        assert collector.polls == polls
        hold = {"pool": "p", "age_s": 1.0, "started_at": time.time() - 1, "backend_pid": 7}
        scanned = View(time.time(), 0.0, [{"holds": [hold]}], {}, [], {}, None, 1)
        [row] = api.checkouts(scanned, view)
        _assert_unknown(row, api.DOWN)
    finally:
        collector.stop()
