"""Which pools are monitored in this process: the registry of `PoolMonitor`s.

Its own module so that everything that only needs to *find* monitors (the exporters, the
snapshot writer, the watchdog) imports this and `monitor.pool_monitor`, never
`monitor.instrument`, which imports them: imports flow one way.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable

from sqlalchemy.engine import Engine

from monitor.pool_monitor import PoolMonitor

#: Engine -> its monitor. Weak: the registry never keeps an engine alive.
by_engine: weakref.WeakKeyDictionary[Engine, PoolMonitor] = weakref.WeakKeyDictionary()
#: Guards `by_engine` and `callbacks`; replaced in a forked child (use as `registry.lock`).
lock = threading.Lock()
#: Called for every monitor, present and future (the OpenTelemetry bridges use it).
callbacks: list[Callable[[PoolMonitor], None]] = []


def monitors() -> list[PoolMonitor]:
    """Every active monitor in this process."""
    with lock:
        return [pm for pm in by_engine.values() if pm.active]


def on_every_monitor(callback: Callable[[PoolMonitor], None]) -> None:
    """Call `callback` for each active monitor now, and for each one instrumented later."""
    with lock:
        callbacks.append(callback)
        current = [pm for pm in by_engine.values() if pm.active]
    for pm in current:
        callback(pm)


def _after_fork_in_child() -> None:
    """A forked child starts from zero: its parent's holds, counts and (possibly held)
    locks are not its own."""
    global lock
    lock = threading.Lock()
    for pm in list(by_engine.values()):
        pm.ledger.reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
