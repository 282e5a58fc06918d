"""Per-pool state: live holds, counters, histograms and per-site totals.

Written by the hooks (one short lock per hook), read by the exporters at collection time.
Gauges are not kept here: they are read from the live pool when collected (see `gauges`).
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from typing import Any

from monitor.catalogue import OTHER_SITE
from monitor.histogram import Histogram
from monitor.sites import SiteKey

#: Indexes into a site's totals list.
USE, IDLE, CHECKOUTS, LONG_HELD, CROSS_THREAD, CONCURRENT = range(6)
SITE_FIELDS = ("use_time", "idle_in_use_time", "checkouts", "long_held_events",
               "cross_thread_uses", "concurrent_uses")  # fmt: skip

#: Bounded hand-off of raw observations to the OpenTelemetry bridge (only when enabled).
OTEL_QUEUE_LIMIT = 100_000


class Hold:
    """One live checkout: who borrowed the connection, where, and how it is being used."""

    __slots__ = ("alerted", "depth", "open", "pid", "pool", "site", "site_totals", "sql",
                 "sql_t0", "start", "start_wall", "task", "thread")  # fmt: skip

    def __init__(self, start: float, start_wall: float, thread: int, task: Any,
                 site: SiteKey | None, pid: int | None, pool: Any) -> None:  # fmt: skip
        self.start = start
        self.start_wall = start_wall
        self.thread = thread
        self.task = task
        self.site = site
        self.pid = pid
        self.pool = pool
        self.site_totals: list[float] = []
        self.sql = 0.0
        self.sql_t0 = 0.0
        self.depth = 0
        self.open = True
        self.alerted = False


class Counters:
    __slots__ = ("cancelled_waits", "checkouts", "closes", "connect_errors", "connects",
                 "detaches", "errors", "idle_in_use_time", "invalidations_hard",
                 "invalidations_soft", "sql_time", "timeouts", "untracked_returns")  # fmt: skip

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def to_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.__slots__}


class SiteTable:
    """Totals per code site, at most `limit` named sites; later ones share `other`.

    A site keeps its own series once it has one, so every exported counter only grows.
    """

    __slots__ = ("by_site", "limit", "other")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.by_site: dict[SiteKey | None, list[float]] = {}
        self.other = [0.0] * len(SITE_FIELDS)

    def totals(self, site: SiteKey | None) -> list[float]:
        """The totals list for `site` (caller holds the ledger lock)."""
        totals = self.by_site.get(site)
        if totals is None:
            if len(self.by_site) >= self.limit:
                return self.other
            totals = self.by_site[site] = [0.0] * len(SITE_FIELDS)
        return totals


class Ledger:
    """Everything one instrumented pool has measured in this process."""

    __slots__ = ("counters", "create_time", "holds", "lock", "otel_queue", "seq", "sites",
                 "use_time", "wait_time", "waiting", "warned_sites")  # fmt: skip

    def __init__(self, max_sites: int) -> None:
        self.sites = SiteTable(max_sites)
        self.otel_queue: deque[tuple[str, float]] | None = None
        self.reset()

    def reset(self) -> None:
        """Start from zero (a forked child must not inherit its parent's numbers or a lock
        another thread held at fork time)."""
        self.lock = threading.Lock()
        self.holds: dict[Any, Hold] = {}
        self.waiting: dict[int, None] = {}
        self.seq = itertools.count()
        self.counters = Counters()
        self.wait_time = Histogram()
        self.use_time = Histogram()
        self.create_time = Histogram()
        self.sites = SiteTable(self.sites.limit)
        self.warned_sites: set[tuple[str, SiteKey | None]] = set()
        if self.otel_queue is not None:
            self.otel_queue = deque(maxlen=OTEL_QUEUE_LIMIT)

    # -- called with the lock held ------------------------------------------------------
    def end_hold(self, hold: Hold, now: float) -> float:
        """Close a hold: its hold time, SQL time and idle-in-use time go to the totals."""
        hold.open = False
        held = now - hold.start
        if held < 0.0:
            held = 0.0
        sql = hold.sql
        if hold.depth and hold.sql_t0:  # returned mid-statement (e.g. a streaming cursor)
            sql += now - hold.sql_t0
        if sql > held:
            sql = held
        idle = held - sql
        self.use_time.observe(held)
        counters = self.counters
        counters.sql_time += sql
        counters.idle_in_use_time += idle
        totals = hold.site_totals
        totals[USE] += held
        totals[IDLE] += idle
        if self.otel_queue is not None:
            self.otel_queue.append(("use_time", held))
        hold.task = None
        return held

    # -- read side ------------------------------------------------------------------------
    def live_holds(self) -> list[Hold]:
        with self.lock:
            return list(self.holds.values())

    def site_totals(self, name_of: Any) -> dict[str, dict[str, float]]:
        """{field: {site name: value}} including `other` (only when it has data)."""
        with self.lock:
            rows = [(name_of(site), list(t)) for site, t in self.sites.by_site.items()]
            other = list(self.sites.other)
        if any(other):
            rows.append((OTHER_SITE, other))
        out: dict[str, dict[str, float]] = {f: {} for f in SITE_FIELDS}
        for name, totals in rows:
            for index, field_name in enumerate(SITE_FIELDS):
                column = out[field_name]
                column[name] = column.get(name, 0.0) + totals[index]
        return out
