"""Attach to and detach from an engine; the `PoolMonitor` that owns one pool's numbers.

`PoolMonitor.snapshot()` is the one data model: the Prometheus and OpenTelemetry exporters,
the snapshot files and the sidecar all read it, so they cannot disagree.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from monitor.config import Settings, load_settings
from monitor.gauges import read_gauges
from monitor.hooks import (
    DIALECT_EVENTS,
    EXECUTE_METHODS,
    POOL_EVENTS,
    build_hooks,
    swallow,
    timed_execute,
)
from monitor.ledger import Hold, Ledger
from monitor.naming import task_name, thread_name
from monitor.poolclass import instrumented_class, original_class
from monitor.sites import SiteFinder

SNAPSHOT_VERSION = 1

log = logging.getLogger("monitor")
long_held_log = logging.getLogger("monitor.long_held")

_registry: weakref.WeakKeyDictionary[Engine, PoolMonitor] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()
#: Called for every monitor, present and future (the OpenTelemetry bridges use it).
_monitor_callbacks: list[Callable[[PoolMonitor], None]] = []

_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433,
                  "oracle": 1521}  # fmt: skip


@dataclass(frozen=True)
class LongHeldEvent:
    """What `on_long_held` callbacks receive: one connection held past the threshold."""

    pool: str
    age_s: float
    site: str
    thread: str
    task: str | None
    backend_pid: int | None
    stack: tuple[str, ...]


def _sync_engine(engine: Any) -> Engine:
    """The Engine that owns the pool: AsyncEngine wraps one; `engine.execution_options()`
    returns an OptionEngine that shares its parent's pool and dialect."""
    sync = getattr(engine, "sync_engine", engine)
    if not isinstance(sync, Engine):
        raise TypeError(f"instrument() needs a SQLAlchemy Engine or AsyncEngine, got "
                        f"{type(engine).__name__}")  # fmt: skip
    while isinstance(getattr(sync, "_proxied", None), Engine):
        sync = sync._proxied  # type: ignore[attr-defined]
    return sync


def default_pool_name(engine: Engine) -> str:
    """Semantic conventions: the pool's logging name, else `host:port/database`."""
    logging_name = getattr(engine.pool, "_orig_logging_name", None)
    if logging_name:
        return str(logging_name)
    url = engine.url
    host = url.host or url.query.get("host") or "localhost"
    if isinstance(host, tuple):
        host = host[0]
    port = url.port or _DEFAULT_PORTS.get(url.get_backend_name())
    address = f"{host}:{port}" if port else str(host)
    return f"{address}/{url.database or ''}"


class PoolMonitor:
    """The monitor of one engine's pool (across `dispose()` and recreation)."""

    def __init__(self, engine: Engine, name: str, settings: Settings) -> None:
        self.name = name
        self.settings = settings
        self.sites = SiteFinder(settings.site_exclude, settings.site_include)
        self.ledger = Ledger(settings.max_sites, self.sites.name)
        self.active = False
        self._engine_ref = weakref.ref(engine)
        self._hooks = build_hooks(self)
        self.checked_out = self._hooks["checked_out"]
        self._pool_class: type | None = None
        # Weak: the registry is keyed weakly by engine, so nothing here may keep the engine
        # (or its pool, which references it) alive once the application drops it.
        self._listening: list[tuple[weakref.ref[Any], str, Callable[..., Any]]] = []

    # -- wiring ---------------------------------------------------------------------------
    @property
    def engine(self) -> Engine | None:
        return self._engine_ref()

    def _attach(self) -> None:
        engine = self.engine
        assert engine is not None
        self._swap_pool_class(engine.pool)
        for name in POOL_EVENTS:
            self._listen(engine.pool, name, self._hooks[name])
        for name in DIALECT_EVENTS:
            self._listen(engine, name, self._hooks[name])
        wrappers = timed_execute(engine.dialect, self._hooks["statement_started"],
                                 self._hooks["statement_finished"])  # fmt: skip
        for name, wrapper in wrappers.items():
            setattr(engine.dialect, name, wrapper)
        self.active = True

    def _listen(self, target: Any, name: str, fn: Callable[..., Any]) -> None:
        event.listen(target, name, fn)
        self._listening.append((weakref.ref(target), name, fn))

    def _swap_pool_class(self, pool: Any) -> None:
        base = original_class(type(pool))
        if self._pool_class is None or original_class(self._pool_class) is not base:
            self._pool_class = instrumented_class(base, self)
        pool.__class__ = self._pool_class

    def recreated(self, pool: Any) -> None:
        """Called by the subclass's `recreate()` (what `engine.dispose()` uses): a safety
        net for pool classes whose `recreate()` does not reuse `self.__class__` or drops
        the listeners. Not an `engine_disposed` listener: any ConnectionEvents listener
        costs every checkout ~2 µs (see hooks.timed_execute)."""
        try:
            if not self.active:
                return
            if type(pool) is not self._pool_class:
                self._swap_pool_class(pool)
            for name in POOL_EVENTS:
                fn = self._hooks[name]
                # recreate() copies listeners without registering them under the new
                # pool, so event.contains() cannot see them: look in the dispatch itself.
                if fn not in list(getattr(pool.dispatch, name)):
                    self._listen(pool, name, fn)
        except Exception as exc:
            swallow(self, "recreate", exc)

    def _detach(self) -> None:
        self.active = False
        for target_ref, name, fn in reversed(self._listening):
            target = target_ref()
            if target is not None and event.contains(target, name, fn):
                event.remove(target, name, fn)
        self._listening.clear()
        engine = self.engine
        if engine is not None:
            for name in EXECUTE_METHODS:
                if getattr(engine.dialect.__dict__.get(name), "__pool_monitor__", False):
                    delattr(engine.dialect, name)
            pool = engine.pool
            for name in POOL_EVENTS:  # copies made by recreate() after a dispose()
                _remove_copied_listener(pool, name, self._hooks[name])
            if isinstance(pool, self._pool_class or ()):
                pool.__class__ = original_class(type(pool))

    # -- long-held ------------------------------------------------------------------------
    def due_long_held(self, now: float) -> list[Hold]:
        """Holds that crossed the threshold since the last scan (each returned once)."""
        threshold = self.settings.long_held_threshold
        if not threshold or not self.active:
            return []
        due: list[Hold] = []
        with self.ledger.lock:
            # A copy first: checkouts add to the dict without the lock.
            for hold in list(self.ledger.holds.values()):
                if not hold.alerted and now - hold.start >= threshold:
                    hold.alerted = True
                    due.append(hold)
        return due

    def report_return(self, hold: Hold, held: float) -> None:
        """A connection that raised a long-held alert came back: say for how long in all."""
        site = self.sites.name(hold.site)
        long_held_log.info(
            "pool %r: long-held connection from %s returned after %.3f s in all",
            self.name, site, held,
            extra={"pool": self.name, "site": site, "held_s": held,
                   "thread_name": thread_name(hold.thread), "task_name": task_name(hold.task),
                   "backend_pid": hold.pid},
        )  # fmt: skip

    # -- reading --------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Everything this monitor knows now, as plain JSON-ready data."""
        now = time.perf_counter()
        wall = time.time()
        data = self.ledger.read()
        holds: list[Hold] = data["holds"]
        counters = data["counters"]
        sites = data["sites"]
        threshold = self.settings.long_held_threshold
        engine = self.engine
        pool = engine.pool if engine is not None else None
        on_pool = sum(1 for h in holds if h.pool is pool)
        pool_gauges = read_gauges(pool, on_pool, len(holds) - on_pool)
        count = {"used": pool_gauges.used}
        if pool_gauges.idle is not None:
            count = {"idle": pool_gauges.idle, **count}
        ages = [now - h.start for h in holds]
        gauges: dict[str, Any] = {
            "db.client.connection.count": count,
            "db.client.connection.max": pool_gauges.max,
            "db.client.connection.idle.max": pool_gauges.idle_max,
            "db.client.connection.pending_requests": data["pending"],
            "sqlalchemy.pool.overflow": pool_gauges.overflow,
            "sqlalchemy.pool.oldest_checkout_age": max(ages, default=0.0),
            "sqlalchemy.pool.long_held": sum(1 for a in ages if threshold and a >= threshold),
        }
        gauges = {k: v for k, v in gauges.items() if v is not None}
        for field_name in ("checkouts", "long_held_events", "cross_thread_uses",
                           "concurrent_uses"):  # fmt: skip
            sites[field_name] = {k: int(v) for k, v in sites[field_name].items()}
        result_counters: dict[str, Any] = {
            "db.client.connection.timeouts": counters["timeouts"],
            "sqlalchemy.pool.checkouts": counters["checkouts"],
            "sqlalchemy.pool.invalidations": {"hard": counters["invalidations_hard"],
                                              "soft": counters["invalidations_soft"]},
            "sqlalchemy.pool.connect_errors": counters["connect_errors"],
            "sqlalchemy.pool.long_held_events": sites["long_held_events"],
            "sqlalchemy.pool.sql_time": counters["sql_time"],
            "sqlalchemy.pool.idle_in_use_time": counters["idle_in_use_time"],
            "sqlalchemy.pool.site_use_time": sites["use_time"],
            "sqlalchemy.pool.site_idle_in_use_time": sites["idle_in_use_time"],
            "sqlalchemy.pool.site_checkouts": sites["checkouts"],
            "sqlalchemy.pool.cross_thread_uses": sites["cross_thread_uses"],
            "sqlalchemy.pool.concurrent_uses": sites["concurrent_uses"],
            "pool_monitor.errors": counters["errors"],
        }  # fmt: skip
        return {
            "version": SNAPSHOT_VERSION,
            "pool": self.name,
            "pool_class": original_class(type(pool)).__name__ if pool is not None else None,
            "settings": {"long_held_threshold": threshold, "max_sites": self.settings.max_sites},
            "gauges": gauges,
            "counters": result_counters,
            "histograms": data["histograms"],
            "holds": [self._hold_dict(h, now, wall, threshold) for h in holds],
            "internal": counters,
        }

    def _hold_dict(self, hold: Hold, now: float, wall: float, threshold: float
                   ) -> dict[str, Any]:  # fmt: skip
        age = now - hold.start
        sql = hold.sql + (now - hold.sql_t0 if hold.depth and hold.sql_t0 else 0.0)
        return {
            "age_s": age,
            "started_at": wall - age,
            "site": self.sites.name(hold.site),
            "thread": thread_name(hold.thread),
            "thread_id": hold.thread,
            "task": task_name(hold.task),
            "backend_pid": hold.pid,
            "sql_time_s": sql,
            "executing": bool(hold.depth),
            "long_held": bool(threshold) and age >= threshold,
        }

    def __repr__(self) -> str:
        return f"<PoolMonitor pool={self.name!r} active={self.active}>"


def _remove_copied_listener(pool: Any, name: str, fn: Callable[..., Any]) -> None:
    """Remove `fn` from a pool made by `recreate()`. Its listeners are copies registered
    under the *original* pool; once that pool is collected `event.remove` cannot reach
    them, so they are taken out of the pool's own listener collection."""
    if event.contains(pool, name, fn):
        event.remove(pool, name, fn)
        return
    listeners = getattr(getattr(pool.dispatch, name), "listeners", None)
    if listeners is not None and fn in listeners:
        listeners.remove(fn)


def instrument(engine: Any, pool_name: str | None = None, **settings: Any) -> PoolMonitor:
    """Start monitoring `engine`'s pool (an `Engine` or `AsyncEngine`).

    Settings are keyword arguments with `POOL_MONITOR_<NAME>` environment variables as
    defaults; an invalid value raises `ConfigError` naming it. Instrumenting the same
    engine twice returns the same monitor.
    """
    sync = _sync_engine(engine)
    resolved = load_settings(settings)
    if pool_name is not None and (not isinstance(pool_name, str) or not pool_name.strip()):
        from monitor.config import ConfigError

        raise ConfigError(f"pool_name must be a non-empty string, got {pool_name!r}")
    with _registry_lock:
        existing = _registry.get(sync)
        if existing is not None and existing.active:
            return existing
        pm = PoolMonitor(sync, _unique_name(pool_name, sync), resolved)
        pm._attach()
        _registry[sync] = pm
        callbacks = list(_monitor_callbacks)
    for callback in callbacks:
        callback(pm)
    from monitor import watchdog

    watchdog.ensure_running()
    if resolved.snapshot_dir:
        from monitor.exporters import snapshot

        snapshot.ensure_writer(resolved.snapshot_dir, resolved.snapshot_interval)
    return pm


def uninstrument(engine: Any) -> None:
    """Remove every listener and restore the pool class. Its numbers stop being exported."""
    sync = _sync_engine(engine)
    with _registry_lock:
        pm = _registry.pop(sync, None)
    if pm is not None:
        pm._detach()


def _unique_name(pool_name: str | None, engine: Engine) -> str:
    """Two pools under one name would export duplicate series (Prometheus drops them): an
    explicit clash is an error; a derived default name gets a `#2`, `#3`… suffix."""
    taken = {pm.name for pm in _registry.values() if pm.active}
    if pool_name is not None:
        if pool_name in taken:
            from monitor.config import ConfigError

            raise ConfigError(f"pool_name {pool_name!r} is already used by another "
                              f"instrumented engine; pool names must be unique per process")
        return pool_name
    name = default_pool_name(engine)
    suffix = 2
    candidate = name
    while candidate in taken:
        candidate = f"{name}#{suffix}"
        suffix += 1
    return candidate


def monitors() -> list[PoolMonitor]:
    """Every active monitor in this process."""
    with _registry_lock:
        return [pm for pm in _registry.values() if pm.active]


def on_every_monitor(callback: Callable[[PoolMonitor], None]) -> None:
    """Call `callback` for each active monitor now, and for each one instrumented later."""
    with _registry_lock:
        _monitor_callbacks.append(callback)
        current = [pm for pm in _registry.values() if pm.active]
    for pm in current:
        callback(pm)


def _after_fork_in_child() -> None:
    """A forked child starts from zero: its parent's holds, counts and (possibly held)
    locks are not its own."""
    global _registry_lock
    _registry_lock = threading.Lock()
    for pm in list(_registry.values()):
        pm.ledger.reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

__all__ = ["LongHeldEvent", "PoolMonitor", "instrument", "monitors", "on_every_monitor",
           "uninstrument"]  # fmt: skip
