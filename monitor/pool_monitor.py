"""`PoolMonitor`: what one engine's pool has measured, and the wiring that measures it.

`PoolMonitor.snapshot()` is the one data model: the Prometheus and OpenTelemetry exporters,
the snapshot files and the sidecar all read it, so they cannot disagree. Which monitors
exist is `monitor.registry`'s business; attaching one to an engine is `monitor.instrument`.
"""

from __future__ import annotations

import itertools
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine

from monitor import listeners, poolpatch
from monitor.config import Settings
from monitor.gauges import read_gauges
from monitor.hooks import (
    DIALECT_METHODS,
    POOL_EVENTS,
    build_hooks,
    dialect_wrappers,
    swallow,
)
from monitor.ledger import Hold, Ledger
from monitor.naming import task_name, thread_name
from monitor.sites import SiteFinder
from monitor.tracing import trace_ids

SNAPSHOT_VERSION = 1

long_held_log = logging.getLogger("monitor.long_held")

_serials = itertools.count(1)

_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433, "oracle": 1521}


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
    #: The OpenTelemetry trace and span the connection was checked out under, if any
    #: (hex, as trace backends write them).
    trace_id: str | None = None
    span_id: str | None = None


def _sync_engine(engine: Any) -> Engine:
    """The Engine that owns the pool: AsyncEngine wraps one; `engine.execution_options()`
    returns an OptionEngine that shares its parent's pool and dialect."""
    sync = getattr(engine, "sync_engine", engine)
    if not isinstance(sync, Engine):
        raise TypeError(
            f"instrument() needs a SQLAlchemy Engine or AsyncEngine, got {type(engine).__name__}"
        )
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
        self.ledger = Ledger(settings.max_sites, self.sites.name, settings.exemplar_window)
        # Unique in this process for its whole life (`id()` is reused): the documents'
        # `monitor_id`, and what a board slot names its hold's pool by.
        self.serial = next(_serials)
        self.active = False
        self._engine_ref = weakref.ref(engine)
        self.hooks = build_hooks(self)
        # Every pool we patched: the engine's, and those `dispose()` retired while
        # connections were still out (their returns still come to us). Weak: nothing here
        # may keep a pool (or through it the engine) alive once the application drops it.
        self._pools: weakref.WeakSet[Any] = weakref.WeakSet()
        self._dialect_saved: dict[str, Any] = {}  # instance attributes we wrapped

    # -- wiring ---------------------------------------------------------------------------
    @property
    def engine(self) -> Engine | None:
        return self._engine_ref()

    def _attach(self) -> None:
        engine = self.engine
        assert engine is not None
        dialect = engine.dialect
        wrappers = dialect_wrappers(
            dialect, self.hooks["statement_started"], self.hooks["statement_finished"]
        )
        self._dialect_saved = {n: dialect.__dict__[n] for n in wrappers if n in dialect.__dict__}
        for name, wrapper in wrappers.items():
            setattr(dialect, name, wrapper)
        self._attach_pool(engine.pool)
        self.active = True

    def _attach_pool(self, pool: Any) -> None:
        for name in POOL_EVENTS:
            listeners.add(pool, name, self.hooks[name])
        poolpatch.patch(pool, self)
        self._pools.add(pool)

    def recreated(self, pool: Any) -> None:
        """Called by the patched `recreate()` (what `engine.dispose()` uses). The new pool
        has our listeners already (`recreate` copies them); its methods need patching. Not
        an `engine_disposed` listener: any ConnectionEvents listener costs every checkout
        ~2 µs (see hooks.dialect_wrappers)."""
        try:
            if self.active:
                self._attach_pool(pool)
        except Exception as exc:
            swallow(self, "recreate", exc)

    def _detach(self) -> None:
        self.active = False
        self.hooks["release_all"]()  # their returns will not come to us any more
        for pool in list(self._pools):
            poolpatch.unpatch(pool)
            for name in POOL_EVENTS:
                listeners.remove(pool, name, self.hooks[name])
        self._pools.clear()
        engine = self.engine
        if engine is not None:
            dialect = engine.dialect
            for name in DIALECT_METHODS:  # ours only; what was there before comes back
                if getattr(dialect.__dict__.get(name), "__pool_monitor__", False):
                    if name in self._dialect_saved:
                        setattr(dialect, name, self._dialect_saved[name])
                    else:
                        delattr(dialect, name)

    def backend_pid(self, hold: Hold) -> int | None:
        """The server backend's pid of `hold`'s connection (recorded at connect)."""
        return self.ledger.pids.get(hold.record)

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
            self.name,
            site,
            held,
            extra={
                "pool": self.name,
                "site": site,
                "held_s": held,
                "thread_name": thread_name(hold.thread),
                "task_name": task_name(hold.task),
                "backend_pid": self.backend_pid(hold),
                "trace_id": None,
                "span_id": None,
                **trace_fields(hold),
            },
        )

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
        on_pool = sum(1 for h in holds if h.record._ConnectionRecord__pool is pool)
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
        for field_name in ("checkouts", "long_held_events", "cross_thread_uses", "concurrent_uses"):
            sites[field_name] = {k: int(v) for k, v in sites[field_name].items()}
        result_counters: dict[str, Any] = {
            "db.client.connection.timeouts": counters["timeouts"],
            "sqlalchemy.pool.checkouts": counters["checkouts"],
            "sqlalchemy.pool.invalidations": {
                "hard": counters["invalidations_hard"],
                "soft": counters["invalidations_soft"],
            },
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
        }
        return {
            "version": SNAPSHOT_VERSION,
            "pool": self.name,
            "pool_class": type(pool).__name__ if pool is not None else None,
            "settings": {"long_held_threshold": threshold, "max_sites": self.settings.max_sites},
            "gauges": gauges,
            "counters": result_counters,
            "histograms": data["histograms"],
            "holds": [self._hold_dict(h, now, wall, threshold) for h in holds],
            "internal": counters,
        }

    def _hold_dict(self, hold: Hold, now: float, wall: float, threshold: float) -> dict[str, Any]:
        age = now - hold.start
        sql = hold.sql + (now - hold.sql_t0 if hold.depth and hold.sql_t0 else 0.0)
        return {
            "age_s": age,
            "started_at": wall - age,
            "site": self.sites.name(hold.site),
            "thread": thread_name(hold.thread),
            "thread_id": hold.thread,
            "task": task_name(hold.task),
            "backend_pid": self.backend_pid(hold),
            "sql_time_s": sql,
            "executing": bool(hold.depth),
            "long_held": bool(threshold) and age >= threshold,
            **({"board_slot": hold.slot, "started_mono": hold.start} if hold.board else {}),
            **trace_fields(hold),
        }

    def __repr__(self) -> str:
        return f"<PoolMonitor pool={self.name!r} active={self.active}>"


def trace_fields(hold: Hold) -> dict[str, str]:
    """`trace_id` and `span_id` of the span a hold was checked out under, if any."""
    ids = trace_ids(hold.ctx) if hold.ctx is not None else None
    return {} if ids is None else {"trace_id": ids.trace_id, "span_id": ids.span_id}
