"""The SQLAlchemy event handlers: the hot path.

Each handler is a closure over one pool's ledger and site finder, so it reads its state
from cells rather than attribute chains, allocates at most one small record, takes the
ledger lock at most once, formats nothing, and swallows its own exceptions (counted in
`pool_monitor_errors_total`, logged once per kind): the application must never notice us.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from asyncio import current_task
from asyncio.events import _get_running_loop
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from monitor.ledger import CHECKOUTS, CONCURRENT, CROSS_THREAD, Hold

if TYPE_CHECKING:
    from monitor.instrument import PoolMonitor

log = logging.getLogger("monitor")
misuse_log = logging.getLogger("monitor.misuse")

HOLD_KEY = "pool_monitor.hold"
PID_KEY = "pool_monitor.backend_pid"

#: When the current task/thread started opening a DBAPI connection (set in `do_connect`,
#: cleared by the `connect` event): times connects and tells connect errors apart.
connect_started: ContextVar[float | None] = ContextVar("pool_monitor_connect_started", default=None)

_perf = time.perf_counter
_wall = time.time
_get_ident = threading.get_ident
_getframe = sys._getframe


def swallow(monitor: PoolMonitor, where: str, exc: BaseException) -> None:
    """Count an exception raised inside our own code and log it once per (hook, type)."""
    ledger = monitor.ledger
    with ledger.lock:
        ledger.counters.errors += 1
        key = (f"error:{where}:{type(exc).__name__}", None)
        first = key not in ledger.warned_sites
        ledger.warned_sites.add(key)
    if first:
        log.error("pool-monitor: %s hook failed for pool %r (counted in "
                  "pool_monitor_errors_total; logged once)", where, monitor.name,
                  exc_info=exc)  # fmt: skip


def backend_pid(dbapi_connection: Any) -> int | None:
    """The server process id, where the driver tells it (psycopg 3, also via the asyncio
    adapter; psycopg2 and asyncpg spell it differently)."""
    for path in (("info", "backend_pid"), ("get_backend_pid",), ("_connection", "info",
                 "backend_pid"), ("driver_connection", "info", "backend_pid")):  # fmt: skip
        target: Any = dbapi_connection
        try:
            for name in path:
                target = getattr(target, name)
            value = target() if callable(target) else target
        except Exception:
            continue
        if isinstance(value, int):
            return value
    return None


def build_hooks(monitor: PoolMonitor) -> dict[str, Callable[..., None]]:
    """Event name → handler for one pool. Pool events and cursor events."""
    ledger = monitor.ledger
    find_site = monitor.sites.find

    def on_do_connect(dialect: Any, conn_rec: Any, cargs: Any, cparams: Any) -> None:
        connect_started.set(_perf())

    def on_connect(dbapi_connection: Any, rec: Any) -> None:
        try:
            started = connect_started.get()
            if started is not None:
                connect_started.set(None)
                elapsed = _perf() - started
                with ledger.lock:
                    ledger.create_time.observe(elapsed)
                    ledger.counters.connects += 1
                if ledger.otel_queue is not None:
                    ledger.otel_queue.append(("create_time", elapsed))
            rec.info[PID_KEY] = backend_pid(dbapi_connection)
        except Exception as exc:
            swallow(monitor, "connect", exc)

    def on_checkout(dbapi_connection: Any, rec: Any, fairy: Any) -> None:
        try:
            now = _perf()
            site = find_site(_getframe(1))
            loop = _get_running_loop()
            info = rec.info
            hold = Hold(now, _wall(), _get_ident(), current_task(loop) if loop else None,
                        site, info.get(PID_KEY), fairy._pool)  # fmt: skip
            info[HOLD_KEY] = hold
            with ledger.lock:
                previous = ledger.holds.get(rec)
                if previous is not None:  # StaticPool hands one record out twice
                    ledger.end_hold(previous, now)
                ledger.holds[rec] = hold
                ledger.counters.checkouts += 1
                totals = hold.site_totals = ledger.sites.totals(site)
                totals[CHECKOUTS] += 1
        except Exception as exc:
            swallow(monitor, "checkout", exc)

    def end(rec: Any) -> None:
        now = _perf()
        with ledger.lock:
            hold = ledger.holds.pop(rec, None)
            if hold is None:
                ledger.counters.untracked_returns += 1
                return
            held = ledger.end_hold(hold, now)
        if hold.alerted:
            monitor.report_return(hold, held)

    def on_checkin(dbapi_connection: Any, rec: Any) -> None:
        try:
            end(rec)
        except Exception as exc:
            swallow(monitor, "checkin", exc)

    def on_detach(dbapi_connection: Any, rec: Any) -> None:
        try:
            if rec in ledger.holds:
                end(rec)
            with ledger.lock:
                ledger.counters.detaches += 1
        except Exception as exc:
            swallow(monitor, "detach", exc)

    def on_reset(dbapi_connection: Any, rec: Any, state: Any) -> None:
        # Only a terminate-only reset ends a hold (asyncio GC, detached close); a normal
        # reset is followed by `checkin`.
        try:
            if state.terminate_only and rec is not None and rec in ledger.holds:
                end(rec)
        except Exception as exc:
            swallow(monitor, "reset", exc)

    def on_close(dbapi_connection: Any, rec: Any) -> None:
        try:
            with ledger.lock:
                ledger.counters.closes += 1
        except Exception as exc:
            swallow(monitor, "close", exc)

    def on_close_detached(dbapi_connection: Any) -> None:
        try:
            with ledger.lock:
                ledger.counters.closes += 1
        except Exception as exc:
            swallow(monitor, "close_detached", exc)

    def on_invalidate(dbapi_connection: Any, rec: Any, exception: Any) -> None:
        try:
            with ledger.lock:
                ledger.counters.invalidations_hard += 1
        except Exception as exc:
            swallow(monitor, "invalidate", exc)

    def on_soft_invalidate(dbapi_connection: Any, rec: Any, exception: Any) -> None:
        try:
            with ledger.lock:
                ledger.counters.invalidations_soft += 1
        except Exception as exc:
            swallow(monitor, "soft_invalidate", exc)

    def misuse(hold: Hold, kind: int, thread: int) -> None:
        """Count a cross-thread or overlapping use at the executing site; warn once per
        (kind, site). Off the normal path: it only runs when something is wrong."""
        site = find_site(_getframe(2))
        label = "cross_thread" if kind == CROSS_THREAD else "concurrent"
        with ledger.lock:
            ledger.sites.totals(site)[kind] += 1
            first = (label, site) not in ledger.warned_sites
            if first and len(ledger.warned_sites) < 10_000:
                ledger.warned_sites.add((label, site))
        if first:
            names = monitor.thread_names
            misuse_log.warning(
                "pool %r: connection checked out by thread %r at %s was used %s by thread "
                "%r at %s (logged once per site)", monitor.name, names(hold.thread),
                monitor.sites.name(hold.site),
                "from another thread" if kind == CROSS_THREAD else "while another "
                "statement was still running", names(thread), monitor.sites.name(site),
                extra={"pool": monitor.name, "misuse": label,
                       "checkout_thread": names(hold.thread), "use_thread": names(thread),
                       "checkout_site": monitor.sites.name(hold.site),
                       "use_site": monitor.sites.name(site)},
            )  # fmt: skip

    def on_before_execute(conn: Any, cursor: Any, statement: Any, parameters: Any,
                          context: Any, executemany: Any) -> None:  # fmt: skip
        try:
            hold = conn.info.get(HOLD_KEY)
            if hold is None or not hold.open:
                return
            thread = _get_ident()
            if hold.depth:
                misuse(hold, CONCURRENT, thread)
            else:
                hold.sql_t0 = _perf()
            hold.depth += 1
            if thread != hold.thread:
                misuse(hold, CROSS_THREAD, thread)
        except Exception as exc:
            swallow(monitor, "before_cursor_execute", exc)

    def finish_statement(conn: Any) -> None:
        hold = conn.info.get(HOLD_KEY)
        if hold is None or not hold.open or not hold.depth:
            return
        hold.depth -= 1
        if not hold.depth and hold.sql_t0:
            hold.sql += _perf() - hold.sql_t0
            hold.sql_t0 = 0.0

    def on_after_execute(conn: Any, cursor: Any, statement: Any, parameters: Any,
                         context: Any, executemany: Any) -> None:  # fmt: skip
        try:
            finish_statement(conn)
        except Exception as exc:
            swallow(monitor, "after_cursor_execute", exc)

    def on_handle_error(context: Any) -> None:
        try:
            conn = context.connection
            if conn is not None and not conn.invalidated:
                finish_statement(conn)
        except Exception as exc:
            swallow(monitor, "handle_error", exc)

    return {
        "do_connect": on_do_connect,
        "connect": on_connect,
        "checkout": on_checkout,
        "checkin": on_checkin,
        "detach": on_detach,
        "reset": on_reset,
        "close": on_close,
        "close_detached": on_close_detached,
        "invalidate": on_invalidate,
        "soft_invalidate": on_soft_invalidate,
        "before_cursor_execute": on_before_execute,
        "after_cursor_execute": on_after_execute,
        "handle_error": on_handle_error,
    }


POOL_EVENTS = ("connect", "checkout", "checkin", "detach", "reset", "close", "close_detached",
               "invalidate", "soft_invalidate")  # fmt: skip
ENGINE_EVENTS = ("do_connect", "before_cursor_execute", "after_cursor_execute", "handle_error")
