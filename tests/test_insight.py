"""Which code holds connections, for how long, doing what (issue 3): code sites, SQL vs
idle time, the long-held watchdog, cross-thread and overlapping use, app locks."""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import Column, Integer, MetaData, Table, select, text, update
from sqlalchemy.orm import Session, sessionmaker

import monitor
from monitor.exporters.prometheus import MonitorCollector
from tests.helpers import Engines, counter, wait_until

pytestmark = pytest.mark.core

THIS_FILE = "tests/test_insight.py"


@pytest.fixture
def engines(database_url: str) -> Iterator[Engines]:
    made = Engines(database_url)
    yield made
    made.close()


def _line_of(fragment: str, function: object) -> int:
    """The line number of the first line containing `fragment` in `function`."""
    lines, start = inspect.getsourcelines(function)  # type: ignore[arg-type]
    for offset, line in enumerate(lines):
        if fragment in line:
            return start + offset
    raise AssertionError(f"{fragment!r} not in {function}")


def _long_held(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "monitor.long_held" and r.levelno == level]


# -- code sites -------------------------------------------------------------------------


def test_site_is_the_calling_line_of_user_code(engines: Engines) -> None:
    engine = engines.sync(pool_size=2)
    pm = monitor.instrument(engine, pool_name="api")
    with engine.connect() as conn:  # the site
        conn.execute(text("select 1"))
    with Session(engine) as session:
        session.execute(text("select 1"))  # ORM: the site is where the session first runs SQL
    sites = counter(pm, "sqlalchemy.pool.site_checkouts")
    name = "test_site_is_the_calling_line_of_user_code"
    fn = test_site_is_the_calling_line_of_user_code
    assert sites == {
        f"{THIS_FILE}:{_line_of('# the site', fn)}:{name}": 1,
        f"{THIS_FILE}:{_line_of('session.execute', fn)}:{name}": 1,
    }


def test_site_line_is_exact_deep_in_a_long_function_and_resolved_once(engines: Engines) -> None:
    """Sites are looked up by (code, instruction offset), their line decoded once: two
    call sites on different lines of a 200-line function keep their own exact lines, and
    a site seen again returns the very same key."""
    engine = engines.sync(pool_size=2)
    pm = monitor.instrument(engine, pool_name="api")
    filler = "\n".join(f"    v{i} = {i}" for i in range(200))
    source = f"def handler(engine):\n{filler}\n    for _ in range(3):\n"
    source += "        with engine.connect():\n            pass\n"
    source += "    with engine.connect():\n        pass\n"
    namespace: dict[str, object] = {}
    exec(compile(source, "app/long_handler.py", "exec"), namespace)
    namespace["handler"](engine)  # type: ignore[operator]
    assert counter(pm, "sqlalchemy.pool.site_checkouts") == {
        "app/long_handler.py:203:handler": 3,
        "app/long_handler.py:205:handler": 1,
    }
    frame = inspect.currentframe()
    assert frame is not None
    first, again = [pm.sites.find(frame) for _ in range(2)]  # one instruction offset
    assert first is again


async def test_async_site_crosses_the_greenlet_bridge(engines: Engines) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession

    engine = engines.asyncio(pool_size=2)
    pm = monitor.instrument(engine, pool_name="async-api")
    async with engine.connect() as conn:  # async site
        await conn.execute(text("select 1"))
    async with AsyncSession(engine) as session:
        await session.execute(text("select 1"))
    name = "test_async_site_crosses_the_greenlet_bridge"
    fn = test_async_site_crosses_the_greenlet_bridge
    assert counter(pm, "sqlalchemy.pool.site_checkouts") == {
        f"{THIS_FILE}:{_line_of('# async site', fn)}:{name}": 1,
        f"{THIS_FILE}:{_line_of('await session.execute', fn)}:{name}": 1,
    }


def test_site_prefixes_are_configurable(engines: Engines) -> None:
    engine = engines.sync(pool_size=2)
    # Excluding this file makes pytest's caller the first "user" frame; pytest lives in
    # site-packages, so including it by prefix is what makes it one.
    import _pytest

    pm = monitor.instrument(
        engine, pool_name="api", site_exclude=[__file__], site_include=[_pytest.__path__[0]]
    )
    with engine.connect():
        pass
    (site,) = counter(pm, "sqlalchemy.pool.site_checkouts")
    assert site.startswith("_pytest/python.py:") and site.endswith(":pytest_pyfunc_call")


def test_code_sites_can_be_turned_off(engines: Engines, monkeypatch: pytest.MonkeyPatch) -> None:
    pm = monitor.instrument(engines.sync(pool_size=2), pool_name="no-sites", code_sites=False)
    with pm.engine.connect():  # type: ignore[union-attr]
        pass
    assert counter(pm, "sqlalchemy.pool.site_checkouts") == {"unknown": 1}
    monkeypatch.setenv("POOL_MONITOR_CODE_SITES", "off")
    assert monitor.instrument(engines.sync()).settings.code_sites is False
    monkeypatch.setenv("POOL_MONITOR_CODE_SITES", "maybe")
    with pytest.raises(
        monitor.ConfigError, match="POOL_MONITOR_CODE_SITES: code_sites must be true or false"
    ):
        monitor.instrument(engines.sync())


def test_top_k_sites_and_other_keep_memory_and_exposition_bounded(engines: Engines) -> None:
    """100 000 distinct call sites: 50 keep their own series, the rest share `other`;
    memory and the exposition stay bounded."""
    engine = engines.sync(pool_size=2)
    pm = monitor.instrument(engine, pool_name="many", max_sites=50)
    source = "\n".join(
        f"def site_{n}(engine):\n    with engine.connect():\n        pass" for n in range(1000)
    )

    def run_batch(batch: int) -> None:
        namespace: dict[str, object] = {}
        exec(compile(source, f"generated/batch_{batch}.py", "exec"), namespace)
        for n in range(1000):
            namespace[f"site_{n}"](engine)  # type: ignore[operator]

    run_batch(0)
    gc.collect()
    before = len(gc.get_objects())
    for batch in range(1, 100):
        run_batch(batch)
    pm.snapshot()  # fold every returned hold
    gc.collect()
    grown = len(gc.get_objects()) - before
    checkouts = counter(pm, "sqlalchemy.pool.site_checkouts")
    assert len(checkouts) == 51
    assert checkouts["other"] == 100_000 - 50
    assert sum(checkouts.values()) == 100_000
    assert counter(pm, "sqlalchemy.pool.checkouts") == 100_000
    assert len(pm.sites._verdicts) <= 50_000 and len(pm.sites._names) <= 50_000
    # Keeping every site (or its code object) would add well over 100 000 objects; the
    # verdict cache may keep at most 50 000 code objects alive.
    assert grown < 52_000, f"{grown} more live objects"
    registry = CollectorRegistry()
    registry.register(MonitorCollector(lambda: [pm.snapshot()], lambda: {}))
    exposition = generate_latest(registry).decode()
    site_lines = [
        line
        for line in exposition.splitlines()
        if line.startswith("sqlalchemy_pool_site_checkouts_total{")
    ]
    assert len(site_lines) == 51
    assert len(exposition) < 200_000


# -- where the time goes ------------------------------------------------------------------


def test_idle_in_use_is_hold_time_minus_sql_time(engines: Engines) -> None:
    engine = engines.sync(pool_size=2)
    pm = monitor.instrument(engine, pool_name="api")
    with engine.connect() as conn:
        conn.execute(text("select pg_sleep(0.2)"))
        time.sleep(1.0)  # the "external API call inside a session"
        conn.execute(text("select 1"))
    snap = pm.snapshot()
    idle = snap["counters"]["sqlalchemy.pool.idle_in_use_time"]
    sql = snap["counters"]["sqlalchemy.pool.sql_time"]
    held = snap["histograms"]["db.client.connection.use_time"]["sum"]
    assert idle == pytest.approx(1.0, rel=0.05)
    assert 0.2 <= sql < 0.3
    assert held == pytest.approx(idle + sql, rel=1e-9)
    (site,) = snap["counters"]["sqlalchemy.pool.site_idle_in_use_time"]
    assert snap["counters"]["sqlalchemy.pool.site_idle_in_use_time"][site] == idle
    assert snap["counters"]["sqlalchemy.pool.site_use_time"][site] == held


def test_failed_statement_time_counts_as_sql(engines: Engines) -> None:
    engine = engines.sync(pool_size=2)
    pm = monitor.instrument(engine, pool_name="api")
    with engine.connect() as conn:
        with pytest.raises(Exception, match="invalid input syntax"):  # raised after the sleep
            conn.execute(text("select (pg_sleep(0.2)::text || 'x')::int"))
        conn.rollback()
    snap = pm.snapshot()
    assert snap["counters"]["sqlalchemy.pool.sql_time"] >= 0.2
    assert snap["counters"]["pool_monitor.errors"] == 0


def test_live_holds_in_snapshot(engines: Engines) -> None:
    engine = engines.sync(pool_size=2)
    pm = monitor.instrument(engine, pool_name="api", long_held_threshold=0.2)
    with engine.connect() as conn:
        pid = conn.execute(text("select pg_backend_pid()")).scalar()
        time.sleep(0.3)
        (hold,) = pm.snapshot()["holds"]
        assert hold["backend_pid"] == pid
        assert hold["thread"] == "MainThread"
        assert hold["task"] is None
        assert hold["age_s"] >= 0.3
        assert hold["long_held"] is True
        assert hold["executing"] is False
        assert 0 < hold["sql_time_s"] < 0.1
        assert hold["site"].startswith(f"{THIS_FILE}:") and hold["site"].endswith(
            ":test_live_holds_in_snapshot"
        )
        assert abs(hold["started_at"] - (time.time() - hold["age_s"])) < 0.05


# -- long-held watchdog -----------------------------------------------------------------


def test_long_held_sync_warns_once_with_the_current_stack(
    engines: Engines, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[monitor.LongHeldEvent] = []
    engine = engines.sync(pool_size=2)
    pm = monitor.instrument(
        engine, pool_name="api", long_held_threshold=0.5, on_long_held=events.append
    )
    fn = test_long_held_sync_warns_once_with_the_current_stack
    name = fn.__name__
    with caplog.at_level(logging.INFO, logger="monitor.long_held"):
        with engine.connect() as conn:  # borrowed here
            conn.execute(text("select 1"))
            time.sleep(1.2)  # what the holder is doing
        wait_until(lambda: _long_held(caplog, logging.INFO), timeout=5, what="return INFO")
    site = f"{THIS_FILE}:{_line_of('# borrowed here', fn)}:{name}"
    sleep_line = f"{THIS_FILE}:{_line_of('time.sleep(1.2)', fn)}:{name}"
    (warning,) = _long_held(caplog, logging.WARNING)
    assert warning.site == site and site in warning.getMessage()
    assert sleep_line in warning.stack and sleep_line in warning.getMessage()
    assert warning.stack[-1] == sleep_line  # innermost user frame: the sleep itself
    assert warning.pool == "api" and warning.thread_name == "MainThread"
    assert warning.task_name is None
    assert warning.backend_pid and 0.5 <= warning.age_s < 0.6
    assert counter(pm, "sqlalchemy.pool.long_held_events") == {site: 1}
    (info,) = _long_held(caplog, logging.INFO)
    assert info.held_s >= 1.2 and info.site == site
    assert [e.site for e in events] == [site] and events[0].stack == tuple(warning.stack)


async def test_long_held_asyncio_task_shows_the_task_stack(
    engines: Engines, caplog: pytest.LogCaptureFixture
) -> None:
    engine = engines.asyncio(pool_size=2)
    pm = monitor.instrument(engine, pool_name="async-api", long_held_threshold=0.5)
    fn = test_long_held_asyncio_task_shows_the_task_stack
    name = fn.__name__

    async def holder() -> None:
        async with engine.connect() as conn:  # async borrow
            await conn.execute(text("select 1"))
            await asyncio.sleep(1.2)  # awaiting something else

    with caplog.at_level(logging.INFO, logger="monitor.long_held"):
        await asyncio.create_task(holder(), name="report-job")
        for _ in range(500):
            if _long_held(caplog, logging.INFO):
                break
            await asyncio.sleep(0.01)
    site = f"{THIS_FILE}:{_line_of('# async borrow', fn)}:holder"
    sleep_line = f"{THIS_FILE}:{_line_of('await asyncio.sleep(1.2)', fn)}:holder"
    (warning,) = _long_held(caplog, logging.WARNING)
    assert warning.site == site
    assert warning.task_name == "report-job"
    assert warning.stack[-1] == sleep_line
    assert counter(pm, "sqlalchemy.pool.long_held_events") == {site: 1}
    (info,) = _long_held(caplog, logging.INFO)
    assert info.held_s >= 1.2
    del name


async def test_long_held_task_under_a_server_shows_the_handler(
    engines: Engines, caplog: pytest.LogCaptureFixture
) -> None:
    """Under uvicorn the task's outermost coroutine is the server's; the handler holding
    the connection is found down the await chain."""
    engine = engines.asyncio(pool_size=2)
    monitor.instrument(engine, pool_name="served", long_held_threshold=0.3)

    async def handler() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("select 1"))
            await asyncio.sleep(0.6)  # the handler awaits an external call

    import sysconfig

    server_file = f"{sysconfig.get_paths()['purelib']}/fake_server/protocol.py"
    namespace: dict[str, object] = {}
    exec(compile("async def run_asgi(app):\n    await app()\n", server_file, "exec"), namespace)
    with caplog.at_level(logging.WARNING, logger="monitor.long_held"):
        await asyncio.create_task(namespace["run_asgi"](handler), name="request")  # type: ignore[operator]
    (warning,) = _long_held(caplog, logging.WARNING)
    fn = test_long_held_task_under_a_server_shows_the_handler
    sleep_line = f"{THIS_FILE}:{_line_of('await asyncio.sleep(0.6)', fn)}:handler"
    assert warning.stack == [sleep_line]  # the server frame is trimmed, the handler kept
    assert warning.task_name == "request"


def test_long_held_gauges_while_the_connection_is_out(engines: Engines) -> None:
    engine = engines.sync(pool_size=2)
    pm = monitor.instrument(engine, pool_name="api", long_held_threshold=0.3)
    with engine.connect():
        time.sleep(0.4)
        gauges = pm.snapshot()["gauges"]
        assert gauges["sqlalchemy.pool.long_held"] == 1
        assert gauges["sqlalchemy.pool.oldest_checkout_age"] >= 0.4
    gauges = pm.snapshot()["gauges"]
    assert gauges["sqlalchemy.pool.long_held"] == 0
    assert gauges["sqlalchemy.pool.oldest_checkout_age"] == 0


def test_threshold_zero_disables_alerts(engines: Engines, caplog: pytest.LogCaptureFixture) -> None:
    engine = engines.sync(pool_size=2)
    pm = monitor.instrument(engine, pool_name="api", long_held_threshold=0)
    with caplog.at_level(logging.INFO, logger="monitor.long_held"), engine.connect():
        time.sleep(0.3)
    assert _long_held(caplog, logging.WARNING) == []
    # Named sites export every field from the start (zeros included), so rate() and
    # increase() see the first event.
    assert set(counter(pm, "sqlalchemy.pool.long_held_events").values()) == {0}
    assert pm.snapshot()["gauges"]["sqlalchemy.pool.long_held"] == 0


# -- misuse (seed 000) ------------------------------------------------------------------

LEASES = Table(
    "pm_test_lease",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
)


def _heartbeat(session_for_beat: Session | sessionmaker[Session], stop: threading.Event) -> None:
    """Seed 000's heartbeat: extend the lease every 50 ms while the worker runs."""
    while not stop.wait(0.05):
        if isinstance(session_for_beat, Session):  # anti-pattern: the worker's own session
            session_for_beat.execute(update(LEASES).values(version=LEASES.c.version + 1))
        else:  # a session factory: a session of its own per beat
            with session_for_beat() as own, own.begin():
                own.execute(update(LEASES).values(version=LEASES.c.version + 1))


def _worker(engine: object, share_session: bool) -> None:
    factory = sessionmaker(bind=engine)  # type: ignore[call-overload]
    stop = threading.Event()
    with factory() as session:
        session.execute(select(LEASES.c.version))  # the worker holds its connection now
        beat = threading.Thread(
            target=_heartbeat, name="heartbeat", args=(session if share_session else factory, stop)
        )
        beat.start()
        for _ in range(6):
            session.execute(select(LEASES.c.version))
            time.sleep(0.05)
        stop.set()
        beat.join()
        session.commit()


@pytest.mark.parametrize("share_session", [True, False], ids=["shared", "factory"])
def test_session_shared_with_a_heartbeat_thread_is_detected(
    engines: Engines, caplog: pytest.LogCaptureFixture, share_session: bool
) -> None:
    engine = engines.sync(pool_size=4)
    with engine.begin() as conn:
        LEASES.drop(conn, checkfirst=True)
        LEASES.create(conn)
        conn.execute(LEASES.insert().values(id=1, version=0))
    pm = monitor.instrument(engine, pool_name="worker")
    with caplog.at_level(logging.WARNING, logger="monitor.misuse"):
        _worker(engine, share_session)
    cross = counter(pm, "sqlalchemy.pool.cross_thread_uses")
    beat_line = f"{THIS_FILE}:{_line_of('session_for_beat.execute', _heartbeat)}:_heartbeat"
    warnings = [r for r in caplog.records if r.name == "monitor.misuse"]
    concurrent_sites = {k for k, v in counter(pm, "sqlalchemy.pool.concurrent_uses").items() if v}
    if share_session:
        # Two threads taking turns: reported where each comes back to the connection, the
        # heartbeat's line and the worker's loop, never at the worker's first (solo) use.
        loop_line = f"{THIS_FILE}:{_line_of('for _ in range(6)', _worker) + 1}:_worker"
        assert {k for k, v in cross.items() if v} == {beat_line, loop_line}
        assert cross[beat_line] >= 2
        # Once per site, not per statement; a beat may also overlap the worker's own
        # statement (the race seed 000 describes), which is its own warning.
        crossed = [w for w in warnings if w.misuse == "cross_thread"]
        assert len(crossed) == 2
        assert len([w for w in warnings if w.misuse == "concurrent"]) == len(concurrent_sites)
        by_user = {w.use_thread: w for w in crossed}
        assert set(by_user) == {"'heartbeat'", "'MainThread'"}
        beat = by_user["'heartbeat'"]
        assert beat.other_thread == "'MainThread'" and beat.checkout_thread == "'MainThread'"
        assert beat.use_site == beat_line
        assert "two threads taking turns" in beat.getMessage()
    else:
        assert sum(cross.values()) == 0 and not concurrent_sites
        assert warnings == []
    assert pm.snapshot()["internal"]["handoffs"] >= (1 if share_session else 0)


def _in_turns(*steps: Callable[[], object], name: str = "AnyIO worker thread") -> None:
    """Run each step on a thread of its own, one after the other, like a threadpool whose
    workers stay alive (a finished thread's ident could be reused by the next)."""
    turns = [threading.Event() for _ in steps]
    done = threading.Event()

    def worker(index: int) -> None:
        assert turns[index].wait(10)
        try:
            steps[index]()
        finally:
            if index + 1 < len(steps):
                turns[index + 1].set()
            else:
                done.set()
            done.wait(10)

    threads = [threading.Thread(target=worker, args=(i,), name=name) for i in range(len(steps))]
    for thread in threads:
        thread.start()
    turns[0].set()
    assert done.wait(10)
    for thread in threads:
        thread.join(10)


def test_a_connection_handed_on_between_threads_is_not_misuse(
    engines: Engines, caplog: pytest.LogCaptureFixture
) -> None:
    """FastAPI's sync dependency + sync endpoint: one threadpool thread checks out, the
    next runs the statements, a third returns it. Safe: counted as handoffs, not reported."""
    engine = engines.sync(pool_size=2)
    pm = monitor.instrument(engine, pool_name="api")
    factory = sessionmaker(bind=engine)
    session = factory()
    session.execute(text("select 1"))  # checked out here, on the main thread

    def endpoint() -> None:
        for _ in range(3):
            session.execute(text("select 2"))

    def serializer() -> None:
        session.execute(text("select 3"))  # e.g. a lazy load while rendering the response

    with caplog.at_level(logging.WARNING, logger="monitor.misuse"):
        _in_turns(endpoint, serializer, session.close)
    assert [r for r in caplog.records if r.name == "monitor.misuse"] == []
    assert sum(counter(pm, "sqlalchemy.pool.cross_thread_uses").values()) == 0
    assert pm.snapshot()["internal"]["handoffs"] == 2
    assert pm.snapshot()["holds"] == []


def test_threads_taking_turns_are_named_by_ident_when_names_coincide(
    engines: Engines, caplog: pytest.LogCaptureFixture
) -> None:
    engine = engines.sync(pool_size=2)
    pm = monitor.instrument(engine, pool_name="api")
    with engine.connect() as conn:
        idents: list[int] = []

        def use() -> None:
            idents.append(threading.get_ident())
            conn.exec_driver_sql("select 1")

        with caplog.at_level(logging.WARNING, logger="monitor.misuse"):
            # Handoffs main -> first -> second -> third worker: safe, counted.
            _in_turns(use, use, use, name="worker")
            assert len(set(idents)) == 3
            conn.exec_driver_sql("select 1")  # the main thread comes back, too
        conn.rollback()
    warnings = [r for r in caplog.records if r.name == "monitor.misuse"]
    assert [w.misuse for w in warnings] == ["cross_thread"]  # once per site
    assert warnings[0].use_thread == "'MainThread'"
    assert warnings[0].other_thread == "'worker'"
    assert sum(counter(pm, "sqlalchemy.pool.cross_thread_uses").values()) == 1
    assert pm.snapshot()["internal"]["handoffs"] == 3
    # Names that coincide get their idents.
    from monitor.naming import thread_labels

    me = threading.get_ident()
    assert thread_labels([me, me]) == ["'MainThread'"] * 2  # one thread, named once
    assert thread_labels([me, 7], {7: "MainThread"}) == [
        f"'MainThread' (ident {me})",
        "'MainThread' (ident 7)",
    ]


def test_overlapping_statements_on_one_connection(engines: Engines) -> None:
    engine = engines.sync(pool_size=2)
    pm = monitor.instrument(engine, pool_name="api")
    with engine.connect() as conn:
        slow = threading.Thread(
            target=lambda: conn.exec_driver_sql("select pg_sleep(0.4)"), name="slow"
        )
        slow.start()
        time.sleep(0.1)
        conn.exec_driver_sql("select 2")  # overlaps: the driver serializes, we notice
        slow.join()
        conn.rollback()
    concurrent = counter(pm, "sqlalchemy.pool.concurrent_uses")
    fn = test_overlapping_statements_on_one_connection
    site = f"{THIS_FILE}:{_line_of('# overlaps', fn)}:{fn.__name__}"
    assert {k: v for k, v in concurrent.items() if v} == {site: 1}
    # The slow thread took the connection over (a handoff); the main thread coming back
    # while it still ran is interleaved use too, at the same line.
    cross = counter(pm, "sqlalchemy.pool.cross_thread_uses")
    assert {k: v for k, v in cross.items() if v} == {site: 1}


async def test_asyncio_tasks_on_one_loop_are_not_cross_thread(engines: Engines) -> None:
    engine = engines.asyncio(pool_size=4)
    pm = monitor.instrument(engine, pool_name="async-api")

    async def job(n: int) -> None:
        async with engine.connect() as conn:
            for _ in range(3):
                await conn.execute(text(f"select {n}"))
                await asyncio.sleep(0.01)

    await asyncio.gather(*(job(n) for n in range(8)))
    assert sum(counter(pm, "sqlalchemy.pool.cross_thread_uses").values()) == 0


# -- app locks (seed 001) ------------------------------------------------------------------


def _lock_hist(metric: str, name: str) -> dict[str, object]:
    from monitor.locks import lock_snapshot

    return lock_snapshot()[metric][name]


def test_lock_contended_by_eight_threads_records_eight_waits() -> None:
    lock = monitor.lock("test-contended")
    assert monitor.lock("test-contended") is lock  # one name, one lock
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        with monitor.lock("test-contended"):
            time.sleep(0.02)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    waits = _lock_hist("app.lock.wait_time", "test-contended")
    holds = _lock_hist("app.lock.hold_time", "test-contended")
    assert waits["count"] == 8 and holds["count"] == 8
    # Serialized: the last of 8 waited for the 7 before it; in all ≈ 0.02 × (0+1+…+7).
    assert waits["sum"] >= 0.02 * 28 * 0.9
    assert holds["sum"] >= 0.02 * 8


def test_per_key_and_reentrant_locks() -> None:
    a = monitor.lock("test-sessions", key="conv-1")
    assert monitor.lock("test-sessions", key="conv-1") is a
    assert monitor.lock("test-sessions", key="conv-2") is not a
    with a, monitor.lock("test-sessions", key="conv-2"):
        pass
    assert _lock_hist("app.lock.wait_time", "test-sessions")["count"] == 2
    rlock = monitor.lock("test-reentrant", reentrant=True)
    with rlock, rlock:
        pass
    assert _lock_hist("app.lock.hold_time", "test-reentrant")["count"] == 1
    with pytest.raises(monitor.ConfigError, match="one name, one kind"):
        monitor.lock("test-reentrant")
    with pytest.raises(monitor.ConfigError, match="lock name must be a non-empty string"):
        monitor.lock("")


async def test_async_lock_records_waits() -> None:
    lock = monitor.async_lock("test-async")

    async def worker() -> None:
        async with lock:
            await asyncio.sleep(0.02)

    await asyncio.gather(*(worker() for _ in range(4)))
    waits = _lock_hist("app.lock.wait_time", "test-async")
    assert waits["count"] == 4 and waits["sum"] >= 0.02 * 6 * 0.9
