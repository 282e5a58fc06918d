"""Core instrumentation against a real PostgreSQL: exact metric values in every pool
lifecycle case (issue 2). Also run against SQLAlchemy 2.0.x in CI (`make test-sa20`)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import threading
import time
import warnings
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.pool import NullPool, SingletonThreadPool, StaticPool

import monitor
from monitor import poolpatch
from monitor.catalogue import SECONDS_BUCKETS
from tests.helpers import Engines, assert_no_negative, counter, gauge, hist, wait_until

pytestmark = pytest.mark.core

COUNT = "db.client.connection.count"


@pytest.fixture
def engines(database_url: str) -> Iterator[Engines]:
    made = Engines(database_url)
    yield made
    made.close()


def test_overflow_and_capacity_gauges(engines: Engines) -> None:
    engine = engines.sync(pool_size=3, max_overflow=2, pool_timeout=1)
    pm = monitor.instrument(engine, pool_name="api")
    conns = [engine.connect() for _ in range(5)]
    snap = pm.snapshot()
    assert snap["gauges"][COUNT] == {"idle": 0, "used": 5}
    assert snap["gauges"]["sqlalchemy.pool.overflow"] == 2
    assert snap["gauges"]["db.client.connection.max"] == 5
    assert snap["gauges"]["db.client.connection.idle.max"] == 3
    assert snap["counters"]["sqlalchemy.pool.checkouts"] == 5
    assert snap["histograms"]["db.client.connection.create_time"]["count"] == 5
    assert len(snap["holds"]) == 5
    for conn in conns:
        conn.close()
    snap = pm.snapshot()
    # QueuePool keeps pool_size connections and closes the two overflow ones on return.
    assert snap["gauges"][COUNT] == {"idle": 3, "used": 0}
    assert snap["gauges"]["sqlalchemy.pool.overflow"] == 0
    assert snap["histograms"]["db.client.connection.use_time"]["count"] == 5
    assert snap["histograms"]["db.client.connection.wait_time"]["count"] == 5
    assert snap["holds"] == []


def test_blocked_caller_is_pending_then_times_out(engines: Engines) -> None:
    engine = engines.sync(pool_size=3, max_overflow=2, pool_timeout=1.0)
    pm = monitor.instrument(engine, pool_name="api")
    conns = [engine.connect() for _ in range(5)]
    outcome: list[BaseException] = []

    def sixth() -> None:
        try:
            engine.connect()
        except BaseException as error:
            outcome.append(error)

    waiter = threading.Thread(target=sixth)
    waiter.start()
    wait_until(
        lambda: gauge(pm, "db.client.connection.pending_requests") == 1,
        what="pending_requests == 1",
    )
    assert counter(pm, "db.client.connection.timeouts") == 0
    waiter.join(timeout=10)
    assert len(outcome) == 1 and isinstance(outcome[0], exc.TimeoutError)
    assert gauge(pm, "db.client.connection.pending_requests") == 0
    assert counter(pm, "db.client.connection.timeouts") == 1
    # A timed-out caller never obtained a connection: no wait_time observation for it.
    assert hist(pm, "wait_time")["count"] == 5
    for conn in conns:
        conn.close()


def test_hold_time_sum_count_and_buckets(engines: Engines) -> None:
    engine = engines.sync(pool_size=2)
    pm = monitor.instrument(engine, pool_name="api")
    for seconds in (0.2, 0.3):
        with engine.connect():
            time.sleep(seconds)
    use = hist(pm, "use_time")
    assert use["count"] == 2
    assert 0.5 <= use["sum"] < 0.6
    le_025 = SECONDS_BUCKETS.index(0.25)
    le_05 = SECONDS_BUCKETS.index(0.5)
    assert use["counts"][le_025] == 1 and use["counts"][le_05] == 1
    assert sum(use["counts"]) == 2


def test_hard_invalidation(engines: Engines) -> None:
    engine = engines.sync(pool_size=2)
    pm = monitor.instrument(engine, pool_name="api")
    conn = engine.connect()
    conn.exec_driver_sql("select 1")
    conn.invalidate()
    assert counter(pm, "sqlalchemy.pool.invalidations") == {"hard": 1, "soft": 0}
    # invalidate() checks the record in without a DBAPI connection: nothing open remains.
    assert gauge(pm, COUNT) == {"idle": 0, "used": 0}
    assert hist(pm, "use_time")["count"] == 1
    conn.close()
    with engine.connect() as again:
        again.exec_driver_sql("select 1")
    assert hist(pm, "create_time")["count"] == 2
    assert gauge(pm, COUNT) == {"idle": 1, "used": 0}


def test_soft_invalidation(engines: Engines) -> None:
    engine = engines.sync(pool_size=2)
    pm = monitor.instrument(engine, pool_name="api")
    with engine.connect() as conn:
        conn.connection.invalidate(soft=True)
    assert counter(pm, "sqlalchemy.pool.invalidations") == {"hard": 0, "soft": 1}
    assert gauge(pm, COUNT) == {"idle": 1, "used": 0}
    with engine.connect():  # replaced at the next checkout: close, then connect
        pass
    assert hist(pm, "create_time")["count"] == 2
    assert pm.snapshot()["internal"]["closes"] == 1
    assert gauge(pm, COUNT) == {"idle": 1, "used": 0}


def test_detach_ends_the_hold_and_frees_the_slot(engines: Engines) -> None:
    engine = engines.sync(pool_size=2)
    pm = monitor.instrument(engine, pool_name="api")
    conn = engine.connect()
    conn.detach()
    snap = pm.snapshot()
    assert snap["gauges"][COUNT] == {"idle": 0, "used": 0}
    assert snap["histograms"]["db.client.connection.use_time"]["count"] == 1
    assert snap["holds"] == []
    assert snap["internal"]["detaches"] == 1
    conn.exec_driver_sql("select 1")  # still usable, no longer the pool's
    conn.close()
    snap = pm.snapshot()
    assert snap["internal"]["closes"] == 1
    assert snap["counters"]["pool_monitor.errors"] == 0


def test_garbage_collected_sync_connection(engines: Engines) -> None:
    engine = engines.sync(pool_size=2)
    pm = monitor.instrument(engine, pool_name="api")
    conn = engine.connect()
    conn.exec_driver_sql("select 1")
    assert gauge(pm, COUNT, "used") == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        del conn
        gc.collect()
    snap = pm.snapshot()
    assert snap["gauges"][COUNT] == {"idle": 1, "used": 0}
    assert snap["holds"] == []
    assert snap["histograms"]["db.client.connection.use_time"]["count"] == 1
    assert snap["counters"]["pool_monitor.errors"] == 0


async def test_garbage_collected_async_connection(engines: Engines) -> None:
    engine = engines.asyncio(pool_size=2)
    pm = monitor.instrument(engine, pool_name="api")
    conn = await engine.connect()
    await conn.exec_driver_sql("select 1")
    assert gauge(pm, COUNT, "used") == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        del conn
        gc.collect()
    await asyncio.sleep(0.05)
    snap = pm.snapshot()
    # Async GC: reset(terminate_only=True) then detach, and no checkin. The hold ends.
    assert snap["holds"] == []
    assert snap["gauges"][COUNT]["used"] == 0
    assert snap["histograms"]["db.client.connection.use_time"]["count"] == 1
    assert snap["counters"]["pool_monitor.errors"] == 0
    assert_no_negative(pm)


def test_dispose_while_a_connection_is_out(engines: Engines) -> None:
    engine = engines.sync(pool_size=2, pool_timeout=0.5)
    pm = monitor.instrument(engine, pool_name="api")
    idle = engine.connect()
    out = engine.connect()
    idle.close()
    engine.dispose()
    # The checked-out connection is still open and in use; the new pool is empty.
    assert gauge(pm, COUNT) == {"idle": 0, "used": 1}
    assert len(pm.snapshot()["holds"]) == 1
    out.close()  # checks in to the old pool
    assert gauge(pm, COUNT) == {"idle": 0, "used": 0}
    assert hist(pm, "use_time")["count"] == 2
    assert_no_negative(pm)


def test_recreated_pool_keeps_wait_and_timeout_metrics(engines: Engines) -> None:
    engine = engines.sync(pool_size=1, max_overflow=0, pool_timeout=0.2)
    pm = monitor.instrument(engine, pool_name="api")
    with engine.connect():
        pass
    engine.dispose()
    assert type(engine.pool) is sa.pool.QueuePool  # the class is never swapped
    assert poolpatch.is_patched(engine.pool)  # the recreated pool's instance is patched
    held = engine.connect()
    with pytest.raises(exc.TimeoutError):
        engine.connect()
    held.close()
    assert hist(pm, "wait_time")["count"] == 2
    assert counter(pm, "sqlalchemy.pool.checkouts") == 2  # listeners not doubled by dispose
    assert hist(pm, "use_time")["count"] == 2
    assert counter(pm, "db.client.connection.timeouts") == 1
    assert gauge(pm, COUNT) == {"idle": 1, "used": 0}


def test_late_instrumentation_never_goes_negative(engines: Engines) -> None:
    engine = engines.sync(pool_size=3)
    early = [engine.connect() for _ in range(3)]
    early[2].close()
    pm = monitor.instrument(engine, pool_name="api")
    assert gauge(pm, COUNT) == {"idle": 1, "used": 2}
    assert_no_negative(pm)
    for conn in early[:2]:
        conn.close()
    snap = pm.snapshot()
    assert snap["gauges"][COUNT] == {"idle": 3, "used": 0}
    assert snap["histograms"]["db.client.connection.use_time"]["count"] == 0
    assert snap["internal"]["untracked_returns"] == 2
    assert snap["counters"]["sqlalchemy.pool.checkouts"] == 0
    assert_no_negative(pm)


def test_terminated_backend_with_pre_ping(engines: Engines, database_url: str) -> None:
    engine = engines.sync(pool_size=2, pool_pre_ping=True)
    pm = monitor.instrument(engine, pool_name="api")
    with engine.connect() as conn:
        old_pid = conn.exec_driver_sql("select pg_backend_pid()").scalar()
    killer = engines.sync(poolclass=NullPool)
    with killer.connect() as conn:
        conn.exec_driver_sql(f"select pg_terminate_backend({old_pid})")
    with engine.connect() as conn:
        new_pid = conn.exec_driver_sql("select pg_backend_pid()").scalar()
        holds = pm.snapshot()["holds"]
        assert [h["backend_pid"] for h in holds] == [new_pid]
    assert new_pid != old_pid
    snap = pm.snapshot()
    assert snap["counters"]["sqlalchemy.pool.invalidations"] == {"hard": 1, "soft": 0}
    assert snap["histograms"]["db.client.connection.create_time"]["count"] == 2
    assert snap["counters"]["sqlalchemy.pool.connect_errors"] == 0
    assert snap["counters"]["sqlalchemy.pool.checkouts"] == 2
    assert snap["gauges"][COUNT] == {"idle": 1, "used": 0}


def test_connect_error_is_counted(engines: Engines, database_url: str) -> None:
    bad = sa.engine.make_url(database_url).set(database="no_such_database")
    engine = engines.sync(pool_size=1)
    engine = sa.create_engine(bad)
    pm = monitor.instrument(engine, pool_name="broken")
    try:
        for _ in range(2):
            with pytest.raises(exc.OperationalError):
                engine.connect()
        snap = pm.snapshot()
        assert snap["counters"]["sqlalchemy.pool.connect_errors"] == 2
        assert snap["histograms"]["db.client.connection.create_time"]["count"] == 0
        assert snap["gauges"]["db.client.connection.pending_requests"] == 0
        assert snap["counters"]["pool_monitor.errors"] == 0
    finally:
        monitor.uninstrument(engine)
        engine.dispose()


async def test_asyncio_engine_with_concurrent_tasks(engines: Engines) -> None:
    engine = engines.asyncio(pool_size=2, max_overflow=0, pool_timeout=10)
    pm = monitor.instrument(engine, pool_name="async-api")
    release = asyncio.Event()

    async def work(n: int) -> int:
        async with engine.connect() as conn:
            value = (await conn.exec_driver_sql(f"select {n}")).scalar()
            await release.wait()
            return int(value)

    tasks = [asyncio.create_task(work(n), name=f"worker-{n}") for n in range(6)]
    for _ in range(200):
        await asyncio.sleep(0.01)
        if gauge(pm, "db.client.connection.pending_requests") == 4:
            break
    snap = pm.snapshot()
    assert snap["gauges"][COUNT] == {"idle": 0, "used": 2}
    assert snap["gauges"]["db.client.connection.pending_requests"] == 4
    assert {h["task"] for h in snap["holds"]} <= {f"worker-{n}" for n in range(6)}
    assert len({h["task"] for h in snap["holds"]}) == 2
    assert all(h["backend_pid"] for h in snap["holds"])
    release.set()
    assert sorted(await asyncio.gather(*tasks)) == list(range(6))
    snap = pm.snapshot()
    assert snap["gauges"][COUNT] == {"idle": 2, "used": 0}
    assert snap["gauges"]["db.client.connection.pending_requests"] == 0
    assert snap["counters"]["sqlalchemy.pool.checkouts"] == 6
    assert snap["histograms"]["db.client.connection.use_time"]["count"] == 6
    assert snap["histograms"]["db.client.connection.wait_time"]["count"] == 6
    assert snap["counters"]["pool_monitor.errors"] == 0


def test_instrument_twice_returns_the_same_monitor(engines: Engines) -> None:
    engine = engines.sync(pool_size=2)
    first = monitor.instrument(engine, pool_name="api")
    assert monitor.instrument(engine, pool_name="api") is first
    with engine.connect():
        pass
    assert counter(first, "sqlalchemy.pool.checkouts") == 1
    assert hist(first, "use_time")["count"] == 1
    assert hist(first, "wait_time")["count"] == 1


def _listener_counts(engine: sa.Engine) -> dict[str, int]:
    pool_events = ("checkout", "checkin", "connect", "detach", "reset", "invalidate", "close")
    engine_events = ("before_cursor_execute", "after_cursor_execute", "engine_disposed")
    counts = {n: len(list(getattr(engine.pool.dispatch, n))) for n in pool_events}
    counts.update({n: len(list(getattr(engine.dispatch, n))) for n in engine_events})
    counts.update(
        {n: len(list(getattr(engine.dialect.dispatch, n))) for n in ("do_connect", "handle_error")}
    )
    return counts


def test_uninstrument_removes_listeners_and_patches(engines: Engines) -> None:
    engine = engines.sync(pool_size=2)
    original = type(engine.pool)
    before = _listener_counts(engine)
    pm = monitor.instrument(engine, pool_name="api")
    assert type(engine.pool) is original  # the class is never swapped
    assert engine.pool.logger.name == "sqlalchemy.pool.impl.QueuePool"
    assert _listener_counts(engine)["checkin"] == before["checkin"]  # no checkin listener
    assert _listener_counts(engine)["connect"] == before["connect"] + 1
    assert set(vars(engine.pool)) >= {"connect", "_return_conn", "recreate"}
    assert "do_execute" in vars(engine.dialect)  # statement timing wraps the dialect
    engine.dispose()  # listeners were copied onto the recreated pool
    monitor.uninstrument(engine)
    assert type(engine.pool) is original
    assert _listener_counts(engine) == before
    assert not {"connect", "_return_conn", "recreate"} & set(vars(engine.pool))
    assert not {"connect", "do_execute", "do_executemany", "do_execute_no_params"} & set(
        vars(engine.dialect)
    )
    with engine.connect():
        pass
    assert counter(pm, "sqlalchemy.pool.checkouts") == 0
    assert pm not in monitor.monitors()


def test_default_pool_name(engines: Engines, database_url: str) -> None:
    named = engines.sync(pool_logging_name="orders")
    assert monitor.instrument(named).name == "orders"
    url = sa.engine.make_url("postgresql+psycopg://u@db.example:6543/orders")
    plain = engines.sync()
    plain.url = url  # the name is derived from the URL; no connection is made
    assert monitor.instrument(plain).name == "db.example:6543/orders"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"long_held_threshold": -1}, "long_held_threshold must be from 0 to 86400 seconds"),
        ({"long_held_threshold": "soon"}, "long_held_threshold must be a number of seconds"),
        ({"max_sites": 0}, "max_sites must be from 1 to 10000"),
        ({"snapshot_interval": 0}, "snapshot_interval must be from 0.05 to 3600"),
        ({"colour": "blue"}, "unknown setting(s) colour"),
        ({"on_long_held": 3}, "on_long_held must be a callable"),
        ({"pool_name": ""}, "pool_name must be a non-empty string"),
    ],
)
def test_invalid_settings_raise_config_error(
    engines: Engines, settings: dict[str, object], message: str
) -> None:
    engine = engines.sync()
    with pytest.raises(monitor.ConfigError) as info:
        monitor.instrument(engine, **settings)
    assert message in str(info.value)
    assert monitor.monitors() == [] or all(pm.engine is not engine for pm in monitor.monitors())


def test_invalid_environment_setting_names_the_variable(
    engines: Engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POOL_MONITOR_LONG_HELD_THRESHOLD", "-3")
    with pytest.raises(monitor.ConfigError, match="POOL_MONITOR_LONG_HELD_THRESHOLD"):
        monitor.instrument(engines.sync())
    monkeypatch.setenv("POOL_MONITOR_LONG_HELD_THRESHOLD", "2.5")
    assert monitor.instrument(engines.sync()).settings.long_held_threshold == 2.5


def test_a_failing_hook_never_reaches_the_application(
    engines: Engines, caplog: pytest.LogCaptureFixture
) -> None:
    engine = engines.sync(pool_size=2)
    pm = monitor.instrument(engine, pool_name="api")

    def broken(code: object) -> bool:
        raise RuntimeError("boom")

    pm.sites._verdicts.clear()
    pm.sites._classify = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="monitor"):
        for _ in range(3):
            with engine.connect() as conn:
                assert conn.exec_driver_sql("select 7").scalar() == 7
    assert counter(pm, "pool_monitor.errors") == 3
    errors = [r for r in caplog.records if r.name == "monitor"]
    assert len(errors) == 1
    assert "checkout hook failed for pool 'api'" in errors[0].getMessage()
    assert gauge(pm, COUNT) == {"idle": 1, "used": 0}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_starts_with_a_clean_ledger(engines: Engines) -> None:
    engine = engines.sync(pool_size=2)
    pm = monitor.instrument(engine, pool_name="api")
    held = engine.connect()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report what it inherited, never return into pytest
        try:
            engine.dispose(close=False)
            snap = pm.snapshot()
            line = (
                f"{snap['counters']['sqlalchemy.pool.checkouts']} {len(snap['holds'])} "
                f"{snap['histograms']['db.client.connection.use_time']['count']}"
            )
            with engine.connect() as conn:
                conn.exec_driver_sql("select 1")
            line += f" {pm.snapshot()['counters']['sqlalchemy.pool.checkouts']}"
            watchdog = any(t.name == "pool-monitor-watchdog" for t in threading.enumerate())
            line += f" {watchdog}"
            os.write(write, line.encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    reported = os.read(read, 100).decode()
    os.close(read)
    assert reported == "0 0 0 1 True"  # clean ledger, and a watchdog of its own
    assert counter(pm, "sqlalchemy.pool.checkouts") == 1  # the parent keeps its own
    held.close()


def test_nullpool_staticpool_singletonthreadpool(engines: Engines) -> None:
    null = engines.sync(poolclass=NullPool)
    pm = monitor.instrument(null, pool_name="null")
    with null.connect():
        assert pm.snapshot()["gauges"][COUNT] == {"idle": 0, "used": 1}
    gauges = pm.snapshot()["gauges"]
    assert gauges[COUNT] == {"idle": 0, "used": 0}
    assert "db.client.connection.max" not in gauges and "sqlalchemy.pool.overflow" not in gauges

    static = engines.sync(poolclass=StaticPool)
    pm = monitor.instrument(static, pool_name="static")
    with static.connect():
        assert pm.snapshot()["gauges"][COUNT] == {"idle": 0, "used": 1}
    gauges = pm.snapshot()["gauges"]
    assert gauges[COUNT] == {"idle": 1, "used": 0}
    assert gauges["db.client.connection.max"] == 1

    single = engines.sync(poolclass=SingletonThreadPool, pool_size=2)
    pm = monitor.instrument(single, pool_name="single")
    with single.connect():
        assert pm.snapshot()["gauges"][COUNT] == {"idle": 0, "used": 1}
    gauges = pm.snapshot()["gauges"]
    assert gauges[COUNT] == {"idle": 1, "used": 0}
    assert "db.client.connection.max" not in gauges
    for p in monitor.monitors():
        assert p.snapshot()["counters"]["pool_monitor.errors"] == 0


def test_stress_threads_and_tasks(engines: Engines) -> None:
    """32 threads and 64 asyncio tasks checking out, invalidating and holding at random
    for a bounded time; afterwards every number must balance."""
    sync_engine = engines.sync(pool_size=8, max_overflow=4, pool_timeout=0.3)
    async_engine = engines.asyncio(pool_size=8, max_overflow=4, pool_timeout=0.3)
    sync_pm = monitor.instrument(sync_engine, pool_name="stress-sync")
    async_pm = monitor.instrument(async_engine, pool_name="stress-async")
    deadline = time.monotonic() + 3.0

    def thread_worker(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            try:
                with sync_engine.connect() as conn:
                    conn.exec_driver_sql("select 1")
                    roll = rng.random()
                    if roll < 0.05:
                        conn.invalidate()
                    elif roll < 0.08:
                        conn.connection.invalidate(soft=True)
                    time.sleep(rng.random() * 0.01)
            except exc.TimeoutError:
                pass

    async def task_worker(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            try:
                async with async_engine.connect() as conn:
                    await conn.exec_driver_sql("select 1")
                    if rng.random() < 0.05:
                        await conn.invalidate()
                    await asyncio.sleep(rng.random() * 0.01)
            except exc.TimeoutError:
                pass

    async def run_tasks() -> None:
        await asyncio.gather(*(task_worker(1000 + n) for n in range(64)))

    threads = [threading.Thread(target=thread_worker, args=(n,)) for n in range(32)]
    for thread in threads:
        thread.start()
    asyncio.run(run_tasks())
    for thread in threads:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    for pm in (sync_pm, async_pm):
        snap = pm.snapshot()
        assert snap["gauges"][COUNT]["used"] == 0, pm
        assert snap["gauges"]["db.client.connection.pending_requests"] == 0, pm
        checkouts = snap["counters"]["sqlalchemy.pool.checkouts"]
        assert checkouts > 100, pm
        assert snap["histograms"]["db.client.connection.use_time"]["count"] == checkouts, pm
        assert snap["histograms"]["db.client.connection.wait_time"]["count"] == checkouts, pm
        assert snap["counters"]["pool_monitor.errors"] == 0, pm
        assert snap["holds"] == []
        assert_no_negative(pm)
