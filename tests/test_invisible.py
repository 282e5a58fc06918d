"""The application cannot tell it is instrumented, and every hold ends exactly once.

Each test here reproduces a way the monitor used to show through (issue 10): calls made
on the DBAPI connection, our keys in `Connection.info`, instrument/uninstrument racing
live traffic, a `detach` racing the next checkout, a record lent between pools.
"""

from __future__ import annotations

import gc
import sqlite3
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.pool import QueuePool, SingletonThreadPool

import monitor
from monitor import listeners, poolpatch
from tests.helpers import Engines, counter, hist

pytestmark = pytest.mark.core


@pytest.fixture()
def engines(database_url: str) -> Iterator[Engines]:
    made = Engines(database_url)
    yield made
    made.close()


def _pool_state(engine: sa.Engine) -> dict[str, Any]:
    """Everything about a pool and dialect that instrumenting could change."""
    pool = engine.pool
    events = (
        "checkout",
        "checkin",
        "connect",
        "detach",
        "reset",
        "invalidate",
        "close",
        "close_detached",
        "soft_invalidate",
        "first_connect",
    )
    state = {  # first: reading `dispatch` memoizes it on the instance
        "listeners": {n: list(getattr(pool.dispatch, n)) for n in events},
        "dialect_events": {
            n: list(getattr(engine.dialect.dispatch, n))
            for n in ("do_connect", "do_execute", "handle_error")
        },
    }
    return {
        **state,
        "class": type(pool),
        "logger": pool.logger.name,
        "pool_dict": sorted(vars(pool)),
        "dialect_dict": sorted(vars(engine.dialect)),
    }


def _comparable(calls: list[Any]) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    """Calls with the functions SQLAlchemy passes (new closures per engine) named by type."""

    def plain(value: Any) -> Any:
        return f"<{type(value).__name__}>" if callable(value) else value

    return [
        (name, tuple(map(plain, args)), {k: plain(v) for k, v in kwargs.items()})
        for name, args, kwargs in calls
    ]


def _recorded_sqlite_session(instrumented: bool) -> list[Any]:
    """Run one application session on a DBAPI connection that records every call made
    on it; return the calls."""
    recorder = mock.Mock(wraps=sqlite3.connect(":memory:", check_same_thread=False))
    engine = sa.create_engine("sqlite://", creator=lambda: recorder, poolclass=QueuePool)
    if instrumented:
        monitor.instrument(engine, pool_name="recorded")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("select 1").all()
            assert conn.info == {}  # the application's own info dict stays its own
            conn.info["app"] = 1
        with engine.connect() as conn:
            assert conn.info == {"app": 1}
        engine.dispose()
    finally:
        monitor.uninstrument(engine)
    return _comparable(recorder.mock_calls)


def test_no_call_on_the_dbapi_connection_that_the_application_did_not_make() -> None:
    bare = _recorded_sqlite_session(instrumented=False)
    assert _recorded_sqlite_session(instrumented=True) == bare
    assert bare  # the recorder does record: SQLAlchemy's own calls are there


def test_backend_pid_is_still_read_from_psycopg(engines: Engines) -> None:
    engine = engines.sync(pool_size=1)
    pm = monitor.instrument(engine, pool_name="api")
    with engine.connect() as conn:
        pid = conn.exec_driver_sql("select pg_backend_pid()").scalar()
        assert [h["backend_pid"] for h in pm.snapshot()["holds"]] == [pid]
        assert conn.info == {}


def test_instrumented_pool_looks_untouched_and_is_restored_exactly(engines: Engines) -> None:
    engine = engines.sync(pool_size=2)
    with engine.connect():  # the first connect initializes the dialect
        pass
    before = _pool_state(engine)
    monitor.instrument(engine, pool_name="api")
    during = _pool_state(engine)
    assert during["class"] is before["class"] is QueuePool
    assert during["logger"] == before["logger"] == "sqlalchemy.pool.impl.QueuePool"
    assert during["listeners"]["checkin"] == before["listeners"]["checkin"] == []
    with engine.connect():
        pass
    engine.dispose()
    monitor.uninstrument(engine)
    assert _pool_state(engine) == before


def test_instrument_and_uninstrument_under_traffic_never_reach_the_application(
    engines: Engines,
) -> None:
    """1,000 toggles while 16 threads check connections in and out: no exception in any
    application thread, no pool slot lost, every monitor's holds balanced."""
    engine = engines.sync(pool_size=8, max_overflow=0, pool_timeout=30)
    with engine.connect():  # the first connect initializes the dialect
        pass
    before = _pool_state(engine)
    stop = threading.Event()
    failures: list[BaseException] = []
    cycles = [0] * 16

    def traffic(index: int) -> None:
        try:
            while not stop.is_set():
                with engine.connect() as conn:
                    if cycles[index] % 50 == 0:
                        conn.exec_driver_sql("select 1").scalar()
                cycles[index] += 1
        except BaseException as error:  # anything at all reaching the application
            failures.append(error)

    made: list[monitor.PoolMonitor] = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: provoke the interleavings
    threads = [threading.Thread(target=traffic, args=(i,)) for i in range(16)]
    try:
        for thread in threads:
            thread.start()
        for _ in range(1000):
            made.append(monitor.instrument(engine, pool_name="toggled"))
            monitor.uninstrument(engine)
            if failures:
                break
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        sys.setswitchinterval(interval)
    assert failures == []
    assert len(made) == 1000 and min(cycles) > 0
    assert engine.pool.checkedout() == 0  # no slot leaked by an aborted checkin
    assert _pool_state(engine) == before  # nothing of ours left behind
    for pm in made:
        data = pm.ledger.read()
        counters = data["counters"]
        assert counters["errors"] == 0
        # Each hold this monitor opened ended on it exactly once, or was still out when
        # it detached: never ended twice, never lost.
        ended = data["histograms"]["db.client.connection.use_time"]["count"]
        assert counters["checkouts"] == ended + len(data["holds"])
    # The last monitor, attached after the traffic: exact.
    pm = monitor.instrument(engine, pool_name="after")
    for _ in range(10):
        with engine.connect():
            pass
    assert counter(pm, "sqlalchemy.pool.checkouts") == 10
    assert hist(pm, "use_time")["count"] == 10
    assert pm.snapshot()["holds"] == []


def test_concurrent_instrument_and_uninstrument_leave_a_consistent_engine(
    engines: Engines,
) -> None:
    """Two threads toggling one engine: whoever instruments last gets a working monitor,
    and an uninstrumented engine has nothing of ours left."""
    engine = engines.sync(pool_size=2)
    with engine.connect():
        pass
    before = _pool_state(engine)

    def toggle() -> None:
        for _ in range(300):
            monitor.instrument(engine, pool_name="raced")
            monitor.uninstrument(engine)

    togglers = [threading.Thread(target=toggle) for _ in range(2)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: provoke the interleavings
    try:
        for thread in togglers:
            thread.start()
        for thread in togglers:
            thread.join(60)
    finally:
        sys.setswitchinterval(interval)
    assert _pool_state(engine) == before
    pm = monitor.instrument(engine, pool_name="raced")
    with engine.connect():
        pass
    assert counter(pm, "sqlalchemy.pool.checkouts") == 1


def test_detach_does_not_end_the_next_holders_hold(engines: Engines) -> None:
    """SQLAlchemy returns the record to the queue before firing `detach`; a checkout
    that takes it in between must keep its hold."""
    engine = engines.sync(pool_size=1, max_overflow=0)
    returned, taken = threading.Event(), threading.Event()
    second: list[Any] = []

    @event.listens_for(engine.pool, "detach")
    def application_listener(dbapi_connection: Any, rec: Any) -> None:
        returned.set()  # runs before ours: the record is in the queue again
        assert taken.wait(10)

    pm = monitor.instrument(engine, pool_name="api")

    def next_holder() -> None:
        assert returned.wait(10)
        second.append(engine.connect())
        taken.set()

    thread = threading.Thread(target=next_holder)
    thread.start()
    first = engine.connect()
    first.detach()
    thread.join(10)
    holds = pm.snapshot()["holds"]
    assert [h["thread_id"] for h in holds] == [thread.ident]  # the next holder's, alive
    assert hist(pm, "use_time")["count"] == 1  # the detached hold, ended once
    second[0].close()
    first.close()
    assert pm.snapshot()["holds"] == []
    assert hist(pm, "use_time")["count"] == 2
    assert counter(pm, "sqlalchemy.pool.checkouts") == 2
    assert pm.snapshot()["internal"]["untracked_returns"] == 0


@pytest.mark.parametrize("lender_instrumented", [True, False])
def test_a_record_lent_between_pools_ends_its_hold_once(lender_instrumented: bool) -> None:
    """SingletonThreadPool._transfer_from (SQLAlchemy's test suite shares sqlite memory
    connections this way): the borrower checks out the lender's record and the lender
    receives the return."""
    lender = sa.create_engine("sqlite://", poolclass=SingletonThreadPool)
    borrower = sa.create_engine("sqlite://", poolclass=SingletonThreadPool)
    try:
        with lender.connect() as conn:
            conn.exec_driver_sql("create table t (x int)")
        lent = monitor.instrument(lender, pool_name="lender") if lender_instrumented else None
        borrowing = monitor.instrument(borrower, pool_name="borrower")
        borrower.pool._transfer_from(lender.pool)
        with borrower.connect() as conn:
            conn.exec_driver_sql("select * from t").all()  # the lender's connection
            live = borrowing.snapshot()["holds"]
            assert len(live) == (1 if lender_instrumented else 0)
        assert borrowing.snapshot()["holds"] == []
        assert counter(borrowing, "sqlalchemy.pool.checkouts") == 1
        assert hist(borrowing, "use_time")["count"] == (1 if lender_instrumented else 0)
        internal = borrowing.snapshot()["internal"]
        assert internal["untracked_checkouts"] == (0 if lender_instrumented else 1)
        if lent is not None:
            assert lent.snapshot()["internal"]["untracked_returns"] == 0
            assert counter(lent, "sqlalchemy.pool.checkouts") == 0
            assert lent.snapshot()["counters"]["pool_monitor.errors"] == 0
        assert borrowing.snapshot()["counters"]["pool_monitor.errors"] == 0
    finally:
        for engine in (lender, borrower):
            monitor.uninstrument(engine)
            engine.dispose()
    refs = [weakref.ref(lender), weakref.ref(borrower)]
    del lender, borrower, conn, engine
    gc.collect()
    assert [r() for r in refs] == [None, None]  # nothing of ours keeps an engine alive


def test_listener_swap_is_atomic_for_a_firing_thread() -> None:
    """While SQLAlchemy iterates a collection, adding or removing ours must not mutate
    the deque it iterates."""
    engine = sa.create_engine("sqlite://")
    seen: list[str] = []

    def ours(*args: Any) -> None:
        seen.append("ours")

    def application(dbapi_connection: Any, rec: Any) -> None:
        seen.append("application")
        listeners.add(engine.pool, "connect", ours)  # mid-iteration, as a racing thread

    event.listen(engine.pool, "connect", application)
    own = list(engine.pool.dispatch.connect)
    with engine.connect():
        pass
    assert seen == ["application"]  # the firing thread kept the deque it had
    assert listeners.contains(engine.pool, "connect", ours)
    listeners.remove(engine.pool, "connect", ours)
    assert list(engine.pool.dispatch.connect) == own
    assert not poolpatch.is_patched(engine.pool)
    engine.dispose()


def test_one_line_delegations_are_short_cut_and_overrides_are_kept() -> None:
    """`Pool.connect` and `Pool._return_conn` only delegate: the wrappers call the delegate
    (one frame fewer). A pool class that overrides them keeps its own method."""
    from sqlalchemy.pool.base import _ConnectionFairy

    calls: list[str] = []

    class Audited(QueuePool):
        def _return_conn(self, record: Any) -> None:
            calls.append("returned")
            super()._return_conn(record)

    plain = sa.create_engine("sqlite://", poolclass=QueuePool)
    single = sa.create_engine("sqlite://", poolclass=SingletonThreadPool)
    audited = sa.create_engine("sqlite://", poolclass=Audited)
    assert poolpatch._base(plain.pool, "connect") == _ConnectionFairy._checkout
    assert poolpatch._base(plain.pool, "_return_conn") is QueuePool._do_return_conn
    assert poolpatch._base(single.pool, "connect") is SingletonThreadPool.connect
    assert poolpatch._base(audited.pool, "_return_conn") is Audited._return_conn
    pm = monitor.instrument(audited, pool_name="audited")
    try:
        with audited.connect():
            pass
        assert calls == ["returned"]
        assert hist(pm, "use_time")["count"] == 1
    finally:
        monitor.uninstrument(audited)
        for engine in (plain, single, audited):
            engine.dispose()
