"""The hot path: pool event handlers, the checkout hook and statement timing.

Each handler is a closure over one pool's ledger and site finder, so it reads its state
from cells rather than attribute chains, allocates at most one small record, takes the
ledger lock at most once, formats nothing, and swallows its own exceptions (counted in
`pool_monitor_errors_total`, logged once per kind): the application must never notice us.
Measure with `pool-monitor bench` before and after touching anything here.
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

from monitor.ledger import CONCURRENT, CROSS_THREAD, FOLD_LIMIT, PID_KEY, Hold
from monitor.naming import thread_name

if TYPE_CHECKING:
    from monitor.instrument import PoolMonitor

log = logging.getLogger("monitor")
misuse_log = logging.getLogger("monitor.misuse")


#: When the current task/thread started opening a DBAPI connection (set in `do_connect`,
#: cleared by the `connect` event): times connects and tells connect errors apart.
connect_started: ContextVar[float | None] = ContextVar("pool_monitor_connect_started", default=None)

_perf = time.perf_counter
_get_ident = threading.get_ident
_getframe = sys._getframe


def swallow(monitor: PoolMonitor, where: str, exc: BaseException) -> None:
    """Count an exception raised inside our own code and log it once per (hook, type)."""
    ledger = monitor.ledger
    with ledger.lock:
        ledger.counters.errors += 1
        key = (f"error:{where}:{type(exc).__name__}", None)
        first = key not in ledger.logged_once
        ledger.logged_once.add(key)
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
    """Handlers for one pool: pool event listeners by event name, plus `checked_out` (called
    by the pool subclass) and the statement timing pair (called by `timed_execute`)."""
    ledger = monitor.ledger
    find_site = monitor.sites.find
    code_sites = monitor.settings.code_sites
    # Bound once for the return path (a fork resets the ledger in place, keeping them).
    lock = ledger.lock
    holds = ledger.holds
    holds_get = holds.get
    holds_pop = holds.pop
    opened_append = ledger.opened.append
    closed = ledger.closed
    closed_append = closed.append

    def on_do_connect(dialect: Any, conn_rec: Any, cargs: Any, cparams: Any) -> None:
        connect_started.set(_perf())

    def on_connect(dbapi_connection: Any, rec: Any) -> None:
        try:
            started = connect_started.get()
            if started is not None:
                connect_started.set(None)
                ledger.record_create_time(_perf() - started)
            rec.info[PID_KEY] = backend_pid(dbapi_connection)
        except Exception as exc:
            swallow(monitor, "connect", exc)

    def checked_out(fairy: Any, pool: Any, caller: Any, waited: float) -> None:
        """Open the hold for a checkout that `pool.connect()` just returned. Called by the
        pool subclass rather than a `checkout` listener: it is one frame from the caller
        (the site walk starts three SQLAlchemy frames closer to user code) and SQLAlchemy
        skips its whole checkout-event block when no `checkout` listener exists. No lock:
        a dict store and a deque append; the rest is folded in when the ledger is read."""
        try:
            if fairy._counter != 1:  # SingletonThreadPool re-entry: the hold is open
                return
            rec = fairy._connection_record
            loop = _get_running_loop()
            hold = Hold(_perf(), waited, _get_ident(), current_task(loop) if loop else None,
                        find_site(caller) if code_sites else None, rec, pool)  # fmt: skip
            previous = holds_get(rec)
            holds[rec] = hold
            opened_append(hold)
            if previous is not None:  # StaticPool hands one record out twice
                previous.open = False
                previous.end = hold.start
                closed_append(previous)
        except Exception as exc:
            swallow(monitor, "checkout", exc)

    def on_checkin(dbapi_connection: Any, rec: Any) -> None:
        """End the hold of `rec`, if we have one: the cheapest possible return path."""
        try:
            hold = holds_pop(rec, None)
            if hold is None:  # checked out before we attached
                ledger.count("untracked_returns")
                return
            hold.end = end = _perf()
            hold.open = False
            closed_append(hold)
            if len(closed) > FOLD_LIMIT:  # nobody folding (no watchdog?): stay bounded
                ledger.drain()
            if hold.alerted:
                monitor.report_return(hold, end - hold.start)
        except Exception as exc:
            swallow(monitor, "checkin", exc)

    def on_detach(dbapi_connection: Any, rec: Any) -> None:
        # The pool slot is freed and no checkin follows: the hold ends here.
        if rec in holds:
            on_checkin(dbapi_connection, rec)
        count_detach()

    def counting(event: str, counter: str) -> Callable[..., None]:
        """A listener for a rare event that only adds one to a counter."""

        def listener(*args: Any) -> None:
            try:
                ledger.count(counter)
            except Exception as exc:
                swallow(monitor, event, exc)

        return listener

    count_detach = counting("detach", "detaches")

    def misuse(hold: Hold, kind: int, thread: int) -> None:
        """Count a cross-thread or overlapping use at the executing site; warn once per
        (kind, site). Off the normal path: it only runs when something is wrong."""
        site = find_site(_getframe(1))
        label = "cross_thread" if kind == CROSS_THREAD else "concurrent"
        with ledger.lock:
            ledger.sites.totals(site)[kind] += 1
            first = (label, site) not in ledger.logged_once
            if first and len(ledger.logged_once) < 10_000:
                ledger.logged_once.add((label, site))
        if first:
            holder, user = thread_name(hold.thread), thread_name(thread)
            borrowed_at, used_at = monitor.sites.name(hold.site), monitor.sites.name(site)
            how = ("from another thread" if kind == CROSS_THREAD
                   else "while another statement was still running")  # fmt: skip
            misuse_log.warning(
                "pool %r: connection checked out by thread %r at %s was used %s by thread "
                "%r at %s (logged once per site)", monitor.name, holder, borrowed_at, how,
                user, used_at,
                extra={"pool": monitor.name, "misuse": label, "checkout_thread": holder,
                       "use_thread": user, "checkout_site": borrowed_at, "use_site": used_at},
            )  # fmt: skip

    def statement_started(context: Any) -> Hold | None:
        """Mark a hold as executing; detect cross-thread and overlapping use. Same-thread
        re-entry (a dialect whose executemany calls its own execute) is not overlap."""
        try:
            record = context._dbapi_connection._connection_record  # None once detached
            hold = holds_get(record) if record is not None else None
            if hold is None:
                return None
            thread = _get_ident()
            if thread != hold.thread:
                hold.shared = True
                misuse(hold, CROSS_THREAD, thread)
            if hold.shared:  # two threads on one hold: keep the bookkeeping exact
                with lock:
                    overlaps = begin_statement(hold, thread)
            else:
                overlaps = begin_statement(hold, thread)
            if overlaps:
                misuse(hold, CONCURRENT, thread)
            return hold
        except Exception as exc:
            swallow(monitor, "execute", exc)
            return None

    def begin_statement(hold: Hold, thread: int) -> bool:
        """Start (or nest) a statement; True when it overlaps another thread's."""
        overlaps = bool(hold.depth) and hold.exec_thread != thread
        if not hold.depth:
            hold.sql_t0 = _perf()
            hold.exec_thread = thread
        hold.depth += 1
        return overlaps

    def statement_finished(hold: Hold) -> None:
        try:
            if hold.shared:
                with lock:
                    end_statement(hold)
            else:
                end_statement(hold)
        except Exception as exc:
            swallow(monitor, "execute", exc)

    def end_statement(hold: Hold) -> None:
        if not hold.open or not hold.depth:
            return
        hold.depth -= 1
        if not hold.depth and hold.sql_t0:
            hold.sql += _perf() - hold.sql_t0
            hold.sql_t0 = 0.0

    return {
        "do_connect": on_do_connect,
        "connect": on_connect,
        "checked_out": checked_out,
        "checkin": on_checkin,
        "detach": on_detach,
        "close": counting("close", "closes"),
        "close_detached": counting("close_detached", "closes"),
        "invalidate": counting("invalidate", "invalidations_hard"),
        "soft_invalidate": counting("soft_invalidate", "invalidations_soft"),
        "statement_started": statement_started,
        "statement_finished": statement_finished,
    }


def timed_execute(dialect: Any, started: Callable[[Any], Hold | None],
                  finished: Callable[[Hold], None]) -> dict[str, Callable[..., Any]]:  # fmt: skip
    """Wrappers for a dialect's `do_execute`, `do_executemany` and `do_execute_no_params`,
    so the DBAPI call is bracketed exactly (a failed statement included, via `finally`).

    Why not `before/after_cursor_execute`: any ConnectionEvents listener on an engine makes
    every `Connection()` join the engine's dispatch and fire `engine_connect`, which costs
    about 1.5 µs on *every* checkout, SQL or not. These are public Dialect methods, set on
    this engine's own dialect instance only, with the methods' own signatures (a dialect
    may call them itself, with keywords, or without a context).
    """
    execute = dialect.do_execute
    executemany = dialect.do_executemany
    execute_no_params = dialect.do_execute_no_params

    def do_execute(cursor: Any, statement: Any, parameters: Any, context: Any = None,
                   **kw: Any) -> Any:  # fmt: skip
        hold = started(context) if context is not None else None
        if hold is None:
            return execute(cursor, statement, parameters, context, **kw)
        try:
            return execute(cursor, statement, parameters, context, **kw)
        finally:
            finished(hold)

    def do_executemany(cursor: Any, statement: Any, parameters: Any, context: Any = None,
                       **kw: Any) -> Any:  # fmt: skip
        hold = started(context) if context is not None else None
        if hold is None:
            return executemany(cursor, statement, parameters, context, **kw)
        try:
            return executemany(cursor, statement, parameters, context, **kw)
        finally:
            finished(hold)

    def do_execute_no_params(cursor: Any, statement: Any, context: Any = None,
                             **kw: Any) -> Any:  # fmt: skip
        hold = started(context) if context is not None else None
        if hold is None:
            return execute_no_params(cursor, statement, context, **kw)
        try:
            return execute_no_params(cursor, statement, context, **kw)
        finally:
            finished(hold)

    wrappers = {"do_execute": do_execute, "do_executemany": do_executemany,
                "do_execute_no_params": do_execute_no_params}  # fmt: skip
    for wrapper in wrappers.values():
        wrapper.__pool_monitor__ = True  # type: ignore[attr-defined]
    return wrappers


#: No `reset` listener, although a terminate-only reset ends a hold: every such reset is
#: followed by `detach` (asyncio GC), or concerns an already detached connection, and when
#: a reset raises, `_finalize_fairy` invalidates and fires `checkin`. A `reset` listener
#: would cost ~1.3 µs on every checkin (SQLAlchemy builds a PoolResetState for it).
POOL_EVENTS = ("connect", "checkin", "detach", "close", "close_detached", "invalidate",
               "soft_invalidate")  # fmt: skip
DIALECT_EVENTS = ("do_connect",)
EXECUTE_METHODS = ("do_execute", "do_executemany", "do_execute_no_params")
