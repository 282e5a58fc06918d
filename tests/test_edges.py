"""Edge cases found in review: each was reproduced first, then fixed; these keep them fixed."""

from __future__ import annotations

import asyncio
import gc
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import exc, text

import monitor
from monitor.exporters.prometheus import register
from tests.helpers import Engines, counter, gauge

pytestmark = pytest.mark.core


@pytest.fixture
def engines(database_url: str) -> Iterator[Engines]:
    made = Engines(database_url)
    yield made
    made.close()


async def test_a_dead_task_that_leaked_a_connection_is_not_kept_alive(engines: Engines) -> None:
    """The hold must not pin the task: SQLAlchemy gives the slot back when the leaked
    connection is garbage-collected, and with a monitor attached it still must."""
    engine = engines.asyncio(pool_size=1, max_overflow=0, pool_timeout=1)
    monitor.instrument(engine, pool_name="leaky")

    async def leak() -> None:
        conn = await engine.connect()
        await conn.execute(text("select 1"))
        raise RuntimeError("handler failed without closing its connection")

    task = asyncio.create_task(leak())
    with pytest.raises(RuntimeError):
        await task
    del task
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            gc.collect()
            await asyncio.sleep(0.01)
    async with engine.connect() as conn:  # the slot came back
        assert (await conn.execute(text("select 2"))).scalar() == 2


def test_counters_never_decrease_while_read_concurrently(engines: Engines) -> None:
    engine = engines.sync(pool_size=4, max_overflow=0, pool_timeout=5)
    pm = monitor.instrument(engine, pool_name="reads", long_held_threshold=0.001)
    deadline = time.monotonic() + 2.0

    def work() -> None:
        while time.monotonic() < deadline:
            with engine.connect():
                pass

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    previous: dict[str, float] = {}
    reads = 0
    while any(t.is_alive() for t in threads):
        snap = pm.snapshot()
        current = {
            "checkouts": snap["counters"]["sqlalchemy.pool.checkouts"],
            "wait_count": snap["histograms"]["db.client.connection.wait_time"]["count"],
            "use_count": snap["histograms"]["db.client.connection.use_time"]["count"],
            "site_checkouts": sum(snap["counters"]["sqlalchemy.pool.site_checkouts"].values()),
        }
        for key, value in current.items():
            assert value >= previous.get(key, 0), (key, previous.get(key), value)
        previous = current
        reads += 1
    for thread in threads:
        thread.join()
    assert reads > 50
    snap = pm.snapshot()
    checkouts = snap["counters"]["sqlalchemy.pool.checkouts"]
    assert snap["histograms"]["db.client.connection.use_time"]["count"] == checkouts
    assert snap["histograms"]["db.client.connection.wait_time"]["count"] == checkouts
    # The watchdog scanned the holds the whole time (threshold 1 ms) without tripping.
    assert snap["counters"]["pool_monitor.errors"] == 0


def test_dropped_engines_are_freed_and_no_longer_exported(database_url: str) -> None:
    refs = []
    for n in range(3):
        engine = sa.create_engine(database_url)
        monitor.instrument(engine, pool_name=f"dropped-{n}")
        with engine.connect():
            pass
        refs.append(weakref.ref(engine))
        engine.dispose()
        del engine
    # A returned hold stays queued (with its record, hence its pool) until the next fold:
    # at most one watchdog tick. Run that tick now instead of sleeping through it.
    from monitor import watchdog

    watchdog.scan(monitor.monitors())
    gc.collect()
    assert [r() is None for r in refs] == [True, True, True]
    assert not [pm for pm in monitor.monitors() if pm.name.startswith("dropped-")]


def test_dialect_methods_called_by_the_dialect_itself(engines: Engines) -> None:
    """Third-party dialects call do_execute with keywords, without a context, or from
    their own do_executemany: none of it may raise or look like misuse."""
    engine = engines.sync(pool_size=2)
    pm = monitor.instrument(engine, pool_name="dialect")
    dialect = engine.dialect
    with engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        assert raw is not None
        cursor = raw.cursor()
        dialect.do_execute(cursor, "select 1", (), context=None)  # keyword, no context
        dialect.do_execute(cursor, "select 1", ())  # no context at all
        dialect.do_execute_no_params(cursor, "select 1")
        result = conn.execute(text("select :x"), [{"x": 1}, {"x": 2}])  # executemany
        del result
        cursor.close()
    snap = pm.snapshot()
    assert snap["counters"]["pool_monitor.errors"] == 0
    assert sum(snap["counters"]["sqlalchemy.pool.concurrent_uses"].values()) == 0


def test_a_deleted_working_directory_never_breaks_a_scrape(engines: Engines) -> None:
    engine = engines.sync(pool_size=2)
    pm = monitor.instrument(engine, pool_name="cwd")
    home = os.getcwd()
    gone = tempfile.mkdtemp()
    os.chdir(gone)
    os.rmdir(gone)
    try:
        exec(
            compile(
                "def new_site(e):\n    with e.connect():\n        pass\n",
                os.path.join(home, "generated_site.py"),
                "exec",
            ),
            namespace := {},
        )
        namespace["new_site"](engine)
        snap = pm.snapshot()
    finally:
        os.chdir(home)
    assert snap["counters"]["sqlalchemy.pool.checkouts"] == 1
    assert snap["histograms"]["db.client.connection.use_time"]["count"] == 1


def test_every_fresh_registry_gets_the_pool_metrics(engines: Engines) -> None:
    engine = engines.sync(pool_size=2)
    monitor.instrument(engine, pool_name="registries")
    missing = 0
    for _ in range(50):
        registry = CollectorRegistry()
        register(registry)
        if b'db_client_connection_pool_name="registries"' not in generate_latest(registry):
            missing += 1
        del registry
        gc.collect()
    assert missing == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_module_level_lock_stays_the_same_lock_after_fork() -> None:
    shared = monitor.lock("fork-store")
    with shared:
        pass
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            same = monitor.lock("fork-store") is shared
            with shared:
                excluded = not monitor.lock("fork-store").acquire(blocking=False)
            from monitor.locks import lock_snapshot

            count = lock_snapshot()["app.lock.wait_time"]["fork-store"]["count"]
            os.write(write, f"{same} {excluded} {count}".encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    reported = os.read(read, 100).decode()
    os.close(read)
    assert reported == "True True 1"  # one lock, mutual exclusion, the child's own count


def test_two_meter_providers_each_see_everything(engines: Engines) -> None:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider

    registries = [CollectorRegistry(), CollectorRegistry()]
    providers = [
        MeterProvider(metric_readers=[PrometheusMetricReader(registry=r)]) for r in registries
    ]
    for provider in providers:
        monitor.instrument_otel(meter_provider=provider)
    engine = engines.sync(pool_size=2)
    monitor.instrument(engine, pool_name="two-providers")
    for _ in range(10):
        with engine.connect():
            pass
    held = engine.connect()  # a live hold: its wait counts on both sides alike
    line = (
        "db_client_connection_wait_time_seconds_count{"
        'db_client_connection_pool_name="two-providers"'
    )
    for registry in registries:
        text_out = generate_latest(registry).decode()
        (sample,) = [x for x in text_out.splitlines() if x.startswith(line)]
        assert float(sample.rsplit(" ", 1)[1]) == 11
    held.close()
    for provider in providers:
        provider.shutdown()


def test_pool_names_must_be_unique(engines: Engines) -> None:
    first = engines.sync()
    second = engines.sync()
    monitor.instrument(first, pool_name="orders")
    with pytest.raises(monitor.ConfigError, match="'orders' is already used"):
        monitor.instrument(second, pool_name="orders")
    a = monitor.instrument(engines.sync())
    b = monitor.instrument(engines.asyncio())
    assert b.name == f"{a.name}#2"


def test_an_option_engine_is_its_parent_engine(engines: Engines) -> None:
    engine = engines.sync(pool_size=2)
    pm = monitor.instrument(engine, pool_name="main")
    read_only = engine.execution_options(isolation_level="AUTOCOMMIT")
    assert monitor.instrument(read_only, pool_name="main-ro") is pm
    with read_only.connect() as conn:
        conn.execute(text("select 1"))
    assert counter(pm, "sqlalchemy.pool.checkouts") == 1
    monitor.uninstrument(read_only)
    assert pm not in monitor.monitors()
    assert "do_execute" not in vars(engine.dialect)


async def test_async_idle_counts_only_open_connections(engines: Engines) -> None:
    engine = engines.asyncio(pool_size=2)
    pm = monitor.instrument(engine, pool_name="async-idle")
    conn = await engine.connect()
    await conn.execute(text("select 1"))
    await conn.invalidate()
    await conn.close()
    assert gauge(pm, "db.client.connection.count") == {"idle": 0, "used": 0}


def test_unlimited_queue_pool_has_no_maximums(engines: Engines) -> None:
    engine = engines.sync(pool_size=0, max_overflow=-1)
    pm = monitor.instrument(engine, pool_name="unbounded")
    conns = [engine.connect() for _ in range(2)]
    for conn in conns:
        conn.close()
    gauges: dict[str, Any] = pm.snapshot()["gauges"]
    assert "db.client.connection.idle.max" not in gauges
    assert "db.client.connection.max" not in gauges
    assert gauges["db.client.connection.count"] == {"idle": 2, "used": 0}


def test_releasing_a_reentrant_lock_from_another_thread_keeps_the_books() -> None:
    lock = monitor.lock("wrong-thread", reentrant=True)
    lock.acquire()
    errors: list[BaseException] = []

    def intruder() -> None:
        try:
            lock.release()
        except RuntimeError as error:
            errors.append(error)

    thread = threading.Thread(target=intruder)
    thread.start()
    thread.join()
    assert len(errors) == 1 and lock.locked()
    lock.release()
    assert not lock.locked()
    with lock:
        pass
    from monitor.locks import lock_snapshot

    assert lock_snapshot()["app.lock.hold_time"]["wrong-thread"]["count"] == 2


def test_timeouts_are_not_connect_errors(engines: Engines) -> None:
    engine = engines.sync(pool_size=1, max_overflow=0, pool_timeout=0.05)
    pm = monitor.instrument(engine, pool_name="timeouts")
    with engine.connect():
        for _ in range(3):
            with pytest.raises(exc.TimeoutError):
                engine.connect()
    snap = pm.snapshot()
    assert snap["counters"]["db.client.connection.timeouts"] == 3
    assert snap["counters"]["sqlalchemy.pool.connect_errors"] == 0
