"""The pool subclass that measures what no SQLAlchemy event sees: waiting callers, wait
time and checkout timeouts (`QueuePool._do_get` raises `TimeoutError` without an event).
It also opens the hold of each successful checkout (see `hooks.checked_out`).

`instrument()` swaps the class of the engine's live pool for `Instrumented<PoolClass>`.
Every built-in `recreate()` builds `self.__class__(...)`, so the subclass, and the monitor
its methods close over, survive `engine.dispose()`; `recreate()` is also overridden to
re-apply both class and listeners should a custom pool class not do so.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import Pool

from monitor.hooks import connect_started, swallow

if TYPE_CHECKING:
    from monitor.instrument import PoolMonitor

_perf = time.perf_counter
_getframe = sys._getframe


def instrumented_class(base: type[Pool], monitor: PoolMonitor) -> type[Pool]:
    """A subclass of `base` whose `connect()` is timed for `monitor`. One per monitor, so
    pools of different engines never share state."""
    base_connect = base.connect
    base_recreate = base.recreate
    checked_out = monitor.checked_out
    waiting = monitor.ledger.waiting  # cleared in place after a fork, never replaced
    next_token = monitor.ledger.seq.__next__

    def connect(self: Pool) -> Any:
        if not monitor.active:
            return base_connect(self)
        token = next_token()
        waiting[token] = None  # dict set/pop are atomic: no lock for the pending count
        started = _perf()
        try:
            connection = base_connect(self)
        except sa_exc.TimeoutError:
            _timed_out(monitor)
            raise
        except BaseException as error:
            _failed(monitor, error)
            raise
        else:
            checked_out(connection, self, _getframe(1), _perf() - started)
            return connection
        finally:
            waiting.pop(token, None)

    def recreate(self: Pool) -> Pool:
        new_pool = base_recreate(self)
        monitor.recreated(new_pool)
        return new_pool

    namespace = {
        "connect": connect,
        "recreate": recreate,
        "__module__": __name__,
        "__qualname__": f"Instrumented{base.__name__}",
        "__doc__": f"{base.__name__} with pool-monitor's wait/pending/timeout measurement.",
        "_pool_monitor_base": base,
    }
    return type(f"Instrumented{base.__name__}", (base,), namespace)


def _failed(monitor: PoolMonitor, error: BaseException) -> None:
    """A checkout failed for another reason than a timeout: a connect error (do_connect ran
    but no `connect` event followed), a cancelled wait, or an error from a listener."""
    try:
        connecting = connect_started.get() is not None
        if connecting:
            connect_started.set(None)
        if not isinstance(error, Exception):
            monitor.ledger.count("cancelled_waits")
        elif connecting:
            monitor.ledger.count("connect_errors")
    except Exception as failure:  # pragma: no cover - defensive
        swallow(monitor, "connect", failure)


def _timed_out(monitor: PoolMonitor) -> None:
    try:
        monitor.ledger.count("timeouts")
    except Exception as error:  # pragma: no cover - defensive
        swallow(monitor, "connect", error)


def original_class(pool_class: type[Pool]) -> type[Pool]:
    """The class `instrumented_class` was built on (or `pool_class` itself)."""
    return getattr(pool_class, "_pool_monitor_base", pool_class)
