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
import weakref
from asyncio import current_task
from asyncio.events import _get_running_loop
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from sqlalchemy import exc as sa_exc

from monitor.exporters import board as boards
from monitor.ledger import CONCURRENT, CROSS_THREAD, FOLD_LIMIT, Hold
from monitor.naming import thread_labels, thread_name
from monitor.poolpatch import returns_to_a_monitor
from monitor.protocols import Monitored
from monitor.tracing import WaitSpans, span_reader, trace_ids

log = logging.getLogger("monitor")
misuse_log = logging.getLogger("monitor.misuse")


#: When the current task/thread started opening a DBAPI connection (set by the dialect's
#: wrapped `connect`,
#: cleared by the `connect` event): times connects and tells connect errors apart.
connect_started: ContextVar[float | None] = ContextVar("pool_monitor_connect_started", default=None)

_perf = time.perf_counter
_get_ident = threading.get_ident
current_thread = threading.current_thread
_getframe = sys._getframe


def swallow(monitor: Monitored, where: str, exc: BaseException) -> None:
    """Count an exception raised inside our own code and log it once per (hook, type)."""
    ledger = monitor.ledger
    with ledger.lock:
        ledger.counters.errors += 1
        key = (f"error:{where}:{type(exc).__name__}", None)
        first = key not in ledger.logged_once
        ledger.logged_once.add(key)
    if first:
        log.error(
            "pool-monitor: %s hook failed for pool %r (counted in "
            "pool_monitor_errors_total; logged once)",
            where,
            monitor.name,
            exc_info=exc,
        )


def backend_pid(rec: Any) -> int | None:
    """The server process id of `rec`'s connection, read only from drivers we know, by
    type: psycopg 3 (`info.backend_pid`, also behind SQLAlchemy's asyncio adapter),
    psycopg2 (`get_backend_pid()`) and asyncpg (`get_server_pid()`). All three answer from
    the client library's state, without a round trip. Nothing is called on a connection
    of any other type: an application's (or a test's) connection object sees no call it
    did not make."""
    connection = rec.driver_connection  # the dialect unwraps its asyncio adapter
    if connection is None:
        return None
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(connection, psycopg.BaseConnection):
        value = connection.info.backend_pid
    else:
        psycopg2 = sys.modules.get("psycopg2.extensions")
        asyncpg = sys.modules.get("asyncpg")
        if psycopg2 is not None and isinstance(connection, psycopg2.connection):
            value = connection.get_backend_pid()
        elif asyncpg is not None and isinstance(connection, asyncpg.Connection):
            value = connection.get_server_pid()
        else:
            return None
    return value if isinstance(value, int) else None


#: Records checked out through a pool other than the one that created them (a
#: SingletonThreadPool or StaticPool built with `_transfer_from`, as SQLAlchemy's own test
#: suite does): the creating pool receives the return, so it hands it to the monitor
#: that opened the hold through this table. Weak: a record nobody returns is not kept.
_transferred: weakref.WeakKeyDictionary[Any, Callable[[Any], None]] = weakref.WeakKeyDictionary()


def build_hooks(monitor: Monitored) -> dict[str, Callable[..., Any]]:
    """Handlers for one monitor: pool event listeners by event name, factories for the
    pool instance's `connect` and `_return_conn` (see `poolpatch`), and the statement
    timing pair (called by `dialect_wrappers`)."""
    ledger = monitor.ledger
    find_site = monitor.sites.find
    code_sites = monitor.settings.code_sites
    # Bound once for the hot path (a fork resets the ledger in place, keeping them).
    lock = ledger.lock
    holds = ledger.holds
    holds_get = holds.get
    holds_pop = holds.pop
    holds_setdefault = holds.setdefault
    closed = ledger.closed
    closed_append = closed.append
    enter_wait = ledger.waiting.append
    leave_wait = ledger.waiting.pop
    board_cell = boards.current
    serial = float(monitor.serial)
    settings = monitor.settings
    # None unless OpenTelemetry's API is installed (and tracing is on): then a checkout
    # reads the current span (one context-variable read) and keeps its context.
    read_span = span_reader() if settings.trace_context or settings.trace_pool_wait else None
    keep_context = read_span is not None and settings.trace_context
    wait_spans = WaitSpans(monitor.name) if read_span and settings.trace_pool_wait else None

    def on_connect(dbapi_connection: Any, rec: Any) -> None:
        try:
            started = connect_started.get()
            if started is not None:
                connect_started.set(None)
                ledger.record_create_time(_perf() - started)
            ledger.pids[rec] = backend_pid(rec)
        except Exception as exc:
            swallow(monitor, "connect", exc)

    def wrap_connect(pool: Any, base_connect: Callable[[Any], Any]) -> Callable[[], Any]:
        """`pool.connect`, timed: waiting callers, wait time and timeouts (which no event
        sees), then the hold is opened here rather than in a `checkout` listener: one frame
        from the caller (the site walk starts three SQLAlchemy frames closer to user code),
        and SQLAlchemy skips its whole checkout-event block when no listener exists. No
        lock: one dict store; the rest is folded when the ledger is read.
        The pool is referenced weakly: the function lives in the pool's own `__dict__`."""
        pool_ref = weakref.ref(pool)

        def connect() -> Any:
            pool = pool_ref()
            enter_wait(None)  # list append/pop are atomic: no lock for the pending count
            parent = wait_parent() if wait_spans is not None else None
            started = _perf()
            try:
                fairy = base_connect(pool)
            except BaseException as error:
                failed_after = _perf() - started
                checkout_failed(error)
                if parent is not None:
                    wait_span(parent, failed_after, error)
                raise
            got = _perf()
            try:  # noqa: SIM105 - contextlib.suppress costs a context manager per checkout
                leave_wait()
            except IndexError:  # a fork emptied the child's list while we were inside
                pass
            try:
                if fairy._counter == 1:  # else SingletonThreadPool re-entry: hold is open
                    now = got  # the hold starts as the wait ends: one clock read for both
                    rec = fairy._connection_record
                    loop = _get_running_loop()
                    hold = Hold(
                        now,
                        now - started,
                        _get_ident(),
                        current_task(loop) if loop else None,
                        find_site(_getframe(1)) if code_sites else None,
                        rec,
                        rec.fairy_ref,
                    )
                    board = board_cell[0]
                    if board is not None:  # on the board before anyone can return it
                        try:
                            hold.slot = slot = board.free.pop()
                        except IndexError:  # full: the live document still lists it
                            pass
                        else:
                            view = board.view
                            view[slot + 1] = serial
                            view[slot] = now
                            hold.board = board
                            if slot > board.high_index:
                                board.raise_high(slot)
                    if rec._ConnectionRecord__pool is not pool:
                        transferred(hold)
                    elif holds_setdefault(rec, hold) is not hold:
                        replace(hold)
                    if keep_context:  # after the hold is in: a span that fails loses only this
                        span = read_span()  # type: ignore[misc]
                        if span is not None:
                            hold.ctx = span.get_span_context()
            except Exception as exc:
                swallow(monitor, "checkout", exc)
            if parent is not None:  # last: exporting the span is not part of the wait
                wait_span(parent, got - started, None)
            return fairy

        return connect

    def wait_parent() -> tuple[Any, int] | None:
        """The span a `pool.wait` span would be a child of, and the wall clock now (the
        span's start), if a sampled trace is current."""
        try:
            parent = wait_spans.parent(read_span())  # type: ignore[union-attr, misc]
            return None if parent is None else (parent, time.time_ns())
        except Exception as exc:
            swallow(monitor, "wait span", exc)
            return None

    def wait_span(parent: tuple[Any, int], waited: float, error: BaseException | None) -> None:
        try:
            wait_spans.emit(parent[0], parent[1], waited, error)  # type: ignore[union-attr]
        except Exception as exc:
            swallow(monitor, "wait span", exc)

    def checkout_failed(error: BaseException) -> None:
        """A checkout failed: a pool timeout (no event sees it), a connect error (the dialect
        ran but no `connect` event followed), a cancelled wait, or a listener's error."""
        try:
            if ledger.waiting:  # (emptied only by a fork)
                leave_wait()
            if isinstance(error, sa_exc.TimeoutError):
                ledger.count("timeouts")
                return
            connecting = connect_started.get() is not None
            if connecting:
                connect_started.set(None)
            if not isinstance(error, Exception):
                ledger.count("cancelled_waits")
            elif connecting:
                ledger.count("connect_errors")
        except Exception as failure:  # pragma: no cover - defensive
            swallow(monitor, "connect", failure)

    def replace(hold: Hold) -> None:
        """The record already had a hold: StaticPool handing its one record out twice, or
        a checkout that won the race against the `detach` of the previous holder (the
        record is back in the queue before `detach` fires). The older hold ends now."""
        with lock:
            previous = holds_pop(hold.record, None)  # atomic: whoever pops it, ends it
            holds[hold.record] = hold
        if previous is not None and previous is not hold:
            end(previous, hold.start)

    def transferred(hold: Hold) -> None:
        """A record created by another pool: that pool gets the return. Track the hold
        only if that pool is patched by some monitor, which will hand the return back."""
        owner = hold.record._ConnectionRecord__pool
        if returns_to_a_monitor(owner):
            holds[hold.record] = hold
            _transferred[hold.record] = returned
        else:  # its return is invisible to us: count the checkout, open no hold
            release(hold)
            with lock:
                ledger.count_checkout(hold)
                ledger.counters.untracked_checkouts += 1

    def end(hold: Hold, at: float) -> None:
        hold.end = at
        release(hold)
        closed_append(hold)
        ended(hold, at)

    def release(hold: Hold) -> None:
        """Clear the hold's board slot (before the return completes) and free it."""
        board = hold.board
        if board is not None:
            hold.board = None
            board.view[hold.slot] = 0.0
            board.free.append(hold.slot)

    def release_all() -> None:
        """Uninstrumented: the holds still out will return past us, so end their board
        slots now. Each hold is popped first: whoever pops a hold ends it, once."""
        try:
            for rec in list(holds):
                hold = holds_pop(rec, None)
                if hold is not None:
                    release(hold)
        except Exception as exc:
            swallow(monitor, "uninstrument", exc)

    def ended(hold: Hold, at: float) -> None:
        """What rarely follows a hold's end: folding when nobody else does (no watchdog?),
        the long-held hold's report."""
        if len(closed) > FOLD_LIMIT:
            ledger.drain()
        if hold.alerted:
            monitor.report_return(hold, at - hold.start)

    def returned(rec: Any) -> None:
        """End the hold of `rec`, if we have one (the return of a record we lent, or one
        the fast path found no hold for)."""
        hold = holds_pop(rec, None)
        if hold is not None:
            end(hold, _perf())
            return
        other_monitor = _transferred.pop(rec, None)
        if other_monitor is not None:
            other_monitor(rec)
        else:  # checked out before we attached, or a checkout that failed
            ledger.count("untracked_returns")

    def wrap_return(pool: Any, base_return: Callable[[Any, Any], Any]) -> Callable[[Any], Any]:
        """`pool._return_conn`, which every checkin reaches (`_ConnectionRecord.checkin`
        calls it right after the `checkin` event): the hold ends before the record is back
        in the queue, so the next holder's checkout cannot race it. Cheaper than a
        `checkin` listener, which SQLAlchemy would dispatch through its listener loop.
        `end` is inlined: this is the return path of every checkout."""
        pool_ref = weakref.ref(pool)

        def _return_conn(rec: Any) -> Any:
            try:
                hold = holds_pop(rec, None)
                if hold is None:
                    returned(rec)
                else:
                    hold.end = now = _perf()
                    board = hold.board
                    if board is not None:  # off the board before the record is free
                        board.view[hold.slot] = 0.0
                        board.free.append(hold.slot)
                    closed_append(hold)
                    if hold.alerted or len(closed) > FOLD_LIMIT:
                        ended(hold, now)
            except Exception as exc:
                swallow(monitor, "checkin", exc)
            return base_return(pool_ref(), rec)

        return _return_conn

    def on_detach(dbapi_connection: Any, rec: Any) -> None:
        """The pool slot is freed and no checkin follows: the hold ends here. SQLAlchemy
        puts the record back in the queue *before* firing `detach`, so another thread may
        already hold it: the hold ends only if the record is no longer out to its fairy."""
        try:
            with lock:  # against `replace`; a checkout's unlocked store only adds
                hold = holds_get(rec)
                over = hold is not None and rec.fairy_ref is not hold.fairy_ref
                if over:
                    holds_pop(rec, None)
            if over:
                end(hold, _perf())
            ledger.count("detaches")
        except Exception as exc:
            swallow(monitor, "detach", exc)

    def counting(event: str, counter: str) -> Callable[..., None]:
        """A listener for a rare event that only adds one to a counter."""

        def listener(*args: Any) -> None:
            try:
                ledger.count(counter)
            except Exception as exc:
                swallow(monitor, event, exc)

        return listener

    def misuse(hold: Hold, kind: int, thread: int, other: int) -> None:
        """Count an interleaved or overlapping use at the executing site; warn once per
        (kind, site). Off the normal path: it only runs when something is wrong. `other`
        is the thread this one took turns with (or overlapped)."""
        site = find_site(_getframe(1))
        label = "cross_thread" if kind == CROSS_THREAD else "concurrent"
        with ledger.lock:
            ledger.sites.totals(site)[kind] += 1
            first = (label, site) not in ledger.logged_once
            if first and len(ledger.logged_once) < 10_000:
                ledger.logged_once.add((label, site))
        if first:
            user, other_user, holder = thread_labels((thread, other, hold.thread), hold.users)
            borrowed_at, used_at = monitor.sites.name(hold.site), monitor.sites.name(site)
            ids = trace_ids(hold.ctx) if hold.ctx is not None else None
            how = (
                "again after thread %s had used it in between (two threads taking "
                "turns on one connection)"
                if kind == CROSS_THREAD
                else "while thread %s's statement was still running on it"
            )
            misuse_log.warning(
                "pool %r: connection checked out at %s was used by thread %s at %s "
                + how
                + "%s (logged once per site)",
                monitor.name,
                borrowed_at,
                user,
                used_at,
                other_user,
                f"; checked out under trace {ids.trace_id} span {ids.span_id}" if ids else "",
                extra={
                    "pool": monitor.name,
                    "misuse": label,
                    "checkout_thread": holder,
                    "use_thread": user,
                    "other_thread": other_user,
                    "checkout_site": borrowed_at,
                    "use_site": used_at,
                    "trace_id": ids.trace_id if ids else None,
                    "span_id": ids.span_id if ids else None,
                },
            )

    def changed_hands(hold: Hold, thread: int) -> None:
        """A statement from another thread than the hold's last user. Handing a connection
        on is safe (FastAPI runs a sync dependency and a sync endpoint on different
        threadpool threads, one after the other): counted, never reported. A thread coming
        back to it after another used it in between is two threads taking turns on one
        connection, whose transaction state neither controls: misuse (seed 000)."""
        with lock:
            previous = hold.user
            users = hold.users
            if users is None:  # named while alive: a thread may end before a warning
                users = hold.users = {previous: thread_name(previous)}
            interleaved = thread in users
            users[thread] = current_thread().name
            hold.user = thread
            hold.shared = True  # from now on, statement bookkeeping is locked
            if not interleaved:
                ledger.counters.handoffs += 1
        if interleaved:
            misuse(hold, CROSS_THREAD, thread, previous)

    def statement_started(context: Any) -> Hold | None:
        """Mark a hold as executing; detect interleaved and overlapping use. Same-thread
        re-entry (a dialect whose executemany calls its own execute) is not overlap."""
        try:
            record = context._dbapi_connection._connection_record  # None once detached
            hold = holds_get(record) if record is not None else None
            if hold is None:
                return None
            thread = _get_ident()
            if thread != hold.user:
                changed_hands(hold, thread)
            if hold.shared:  # two threads on one hold: keep the bookkeeping exact
                with lock:
                    other = hold.exec_thread
                    overlaps = begin_statement(hold, thread)
            else:
                other = hold.exec_thread
                overlaps = begin_statement(hold, thread)
            if overlaps:
                misuse(hold, CONCURRENT, thread, other)
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
        if hold.end or not hold.depth:  # returned already, or not executing
            return
        hold.depth -= 1
        if not hold.depth and hold.sql_t0:
            hold.sql += _perf() - hold.sql_t0
            hold.sql_t0 = 0.0

    return {
        "connect": on_connect,
        "wrap_connect": wrap_connect,
        "wrap_return": wrap_return,
        "detach": on_detach,
        "release_all": release_all,
        "close": counting("close", "closes"),
        "close_detached": counting("close_detached", "closes"),
        "invalidate": counting("invalidate", "invalidations_hard"),
        "soft_invalidate": counting("soft_invalidate", "invalidations_soft"),
        "statement_started": statement_started,
        "statement_finished": statement_finished,
    }


def dialect_wrappers(
    dialect: Any, started: Callable[[Any], Hold | None], finished: Callable[[Hold], None]
) -> dict[str, Callable[..., Any]]:
    """Wrappers for a dialect's `connect` (which starts the create-time clock, stopped by
    the `connect` event) and its `do_execute`, `do_executemany` and
    `do_execute_no_params`, so the DBAPI call is bracketed exactly (a failed statement
    included, via `finally`).

    Why not `before/after_cursor_execute`: any ConnectionEvents listener on an engine makes
    every `Connection()` join the engine's dispatch and fire `engine_connect`, which costs
    about 1.5 µs on *every* checkout, SQL or not. Why not a `do_connect` listener: it only
    fires once the dialect's private `_has_events` flag is set, which would also make
    every statement loop over the dialect's execute events. These are public Dialect
    methods, set on this engine's own dialect instance only, with the methods' own
    signatures (a dialect may call them itself, with keywords, or without a context).
    """
    connect = dialect.connect

    def connect_(*cargs: Any, **cparams: Any) -> Any:
        connect_started.set(_perf())
        return connect(*cargs, **cparams)

    execute = dialect.do_execute
    executemany = dialect.do_executemany
    execute_no_params = dialect.do_execute_no_params

    def do_execute(
        cursor: Any, statement: Any, parameters: Any, context: Any = None, **kw: Any
    ) -> Any:
        hold = started(context) if context is not None else None
        if hold is None:
            return execute(cursor, statement, parameters, context, **kw)
        try:
            return execute(cursor, statement, parameters, context, **kw)
        finally:
            finished(hold)

    def do_executemany(
        cursor: Any, statement: Any, parameters: Any, context: Any = None, **kw: Any
    ) -> Any:
        hold = started(context) if context is not None else None
        if hold is None:
            return executemany(cursor, statement, parameters, context, **kw)
        try:
            return executemany(cursor, statement, parameters, context, **kw)
        finally:
            finished(hold)

    def do_execute_no_params(cursor: Any, statement: Any, context: Any = None, **kw: Any) -> Any:
        hold = started(context) if context is not None else None
        if hold is None:
            return execute_no_params(cursor, statement, context, **kw)
        try:
            return execute_no_params(cursor, statement, context, **kw)
        finally:
            finished(hold)

    wrappers = {
        "connect": connect_,
        "do_execute": do_execute,
        "do_executemany": do_executemany,
        "do_execute_no_params": do_execute_no_params,
    }
    for wrapper in wrappers.values():
        wrapper.__pool_monitor__ = True  # type: ignore[attr-defined]
    return wrappers


#: No `reset` listener, although a terminate-only reset ends a hold: every such reset is
#: followed by `detach` (asyncio GC), or concerns an already detached connection, and when
#: a reset raises, `_finalize_fairy` invalidates and returns the record. A `reset` listener
#: would cost ~1.3 µs on every checkin (SQLAlchemy builds a PoolResetState for it).
POOL_EVENTS = ("connect", "detach", "close", "close_detached", "invalidate", "soft_invalidate")
DIALECT_METHODS = ("connect", "do_execute", "do_executemany", "do_execute_no_params")
