"""The pool subclass that measures what no SQLAlchemy event sees: waiting callers, wait
time and checkout timeouts (`QueuePool._do_get` raises `TimeoutError` without an event).

`instrument()` swaps the class of the engine's live pool for `Instrumented<PoolClass>`.
Every built-in `recreate()` builds `self.__class__(...)`, so the subclass, and the monitor
it carries as a class attribute, survive `engine.dispose()` with no re-wiring.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import Pool

from monitor.hooks import connect_started, swallow

if TYPE_CHECKING:
    from monitor.instrument import PoolMonitor

_perf = time.perf_counter


def instrumented_class(base: type[Pool], monitor: PoolMonitor) -> type[Pool]:
    """A subclass of `base` whose `connect()` is timed for `monitor`. One per monitor, so
    pools of different engines never share state."""
    base_connect = base.connect

    def connect(self: Pool) -> Any:
        if not monitor.active:
            return base_connect(self)
        ledger = monitor.ledger
        token = next(ledger.seq)
        waiting = ledger.waiting
        waiting[token] = None  # dict set/pop are atomic: no lock for the pending count
        started = _perf()
        try:
            connection = base_connect(self)
        except sa_exc.TimeoutError:
            _count(monitor, "timeouts")
            raise
        except BaseException as error:
            _failed(monitor, error)
            raise
        else:
            waited = _perf() - started
            try:
                with ledger.lock:
                    ledger.wait_time.observe(waited)
                if ledger.otel_queue is not None:
                    ledger.otel_queue.append(("wait_time", waited))
            except Exception as error:  # pragma: no cover - defensive
                swallow(monitor, "wait_time", error)
            return connection
        finally:
            waiting.pop(token, None)

    namespace = {
        "connect": connect,
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
            _count(monitor, "cancelled_waits")
        elif connecting:
            _count(monitor, "connect_errors")
    except Exception as failure:  # pragma: no cover - defensive
        swallow(monitor, "connect", failure)


def _count(monitor: PoolMonitor, counter: str) -> None:
    try:
        ledger = monitor.ledger
        with ledger.lock:
            setattr(ledger.counters, counter, getattr(ledger.counters, counter) + 1)
    except Exception as error:  # pragma: no cover - defensive
        swallow(monitor, "connect", error)


def original_class(pool_class: type[Pool]) -> type[Pool]:
    """The class `instrumented_class` was built on (or `pool_class` itself)."""
    return getattr(pool_class, "_pool_monitor_base", pool_class)
