"""Per-pool state: live holds, counters, histograms and per-site totals.

Written by the hooks (one short lock per hook), read by the exporters at collection time.
Gauges are not kept here: they are read from the live pool when collected (see `gauges`).
"""

from __future__ import annotations

import itertools
import threading
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
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
#: Where the `connect` hook records a connection's server backend pid.
PID_KEY = "pool_monitor.backend_pid"
#: Returned holds waiting to be folded; past this, the returning thread folds them itself.
CLOSED_LIMIT = 20_000


class Hold:
    """One live checkout: who borrowed the connection, where, and how it is being used."""

    __slots__ = ("alerted", "depth", "end", "open", "pool", "record", "site", "sql", "sql_t0",
                 "start", "task", "thread", "waited")  # fmt: skip

    def __init__(self, start: float, waited: float, thread: int, task: Any,
                 site: SiteKey | None, record: Any, pool: Any) -> None:  # fmt: skip
        self.start = start
        self.waited = waited
        self.thread = thread
        self.task = task
        self.site = site
        self.record = record
        self.pool = pool
        self.sql = 0.0
        self.sql_t0 = 0.0
        self.depth = 0
        self.end = 0.0
        self.open = True
        self.alerted = False

    @property
    def pid(self) -> int | None:
        """The server backend's pid (recorded at connect, read only when reported)."""
        try:
            return self.record.info.get(PID_KEY)
        except Exception:
            return None


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
    Its name is fixed when it gets one (`pin`), however many code objects come later.
    """

    __slots__ = ("by_site", "limit", "names", "other", "pin")

    def __init__(self, limit: int, pin: Callable[[SiteKey | None], str]) -> None:
        self.limit = limit
        self.pin = pin
        self.by_site: dict[SiteKey | None, list[float]] = {}
        self.names: dict[SiteKey | None, str] = {}
        self.other = [0.0] * len(SITE_FIELDS)

    def totals(self, site: SiteKey | None) -> list[float]:
        """The totals list for `site` (caller holds the ledger lock)."""
        totals = self.by_site.get(site)
        if totals is None:
            if len(self.by_site) >= self.limit:
                return self.other
            self.names[site] = self.pin(site)
            totals = self.by_site[site] = [0.0] * len(SITE_FIELDS)
        return totals


class Ledger:
    """Everything one instrumented pool has measured in this process."""

    __slots__ = ("closed", "counters", "create_time", "holds", "lock", "logged_once",
                 "otel_queue", "seq", "sites", "use_time", "wait_time", "waiting")  # fmt: skip

    def __init__(self, max_sites: int, pin: Callable[[SiteKey | None], str]) -> None:
        self.lock = threading.Lock()
        self.holds: dict[Any, Hold] = {}
        #: Returned holds not yet folded into the totals (see `drain`).
        self.closed: deque[Hold] = deque()
        self.waiting: dict[int, None] = {}
        self.otel_queue: deque[tuple[str, float]] | None = None
        self.seq = itertools.count()  # tokens for `waiting`; only uniqueness matters
        self.sites = SiteTable(max_sites, pin)
        self._zero()

    def _zero(self) -> None:
        self.counters = Counters()
        self.wait_time = Histogram()
        self.use_time = Histogram()
        self.create_time = Histogram()
        self.sites = SiteTable(self.sites.limit, self.sites.pin)
        self.logged_once: set[tuple[str, SiteKey | None]] = set()

    def reset_after_fork(self) -> None:
        """Start from zero in a forked child: the parent's holds and counts are not its
        own, and a lock another thread held at fork time would never be released. Done in
        place (`_at_fork_reinit`, as the standard library does), because the hooks keep
        direct references to the lock and the holds dict."""
        reinit = getattr(self.lock, "_at_fork_reinit", None)
        if reinit is not None:
            reinit()
        self.holds.clear()
        self.closed.clear()
        self.waiting.clear()
        if self.otel_queue is not None:
            self.otel_queue.clear()
        self._zero()

    # -- folding returned holds into the totals (off the hot path) ------------------------
    def drain(self) -> None:
        """Fold every returned hold into the totals. Checkin only appends to `closed` (an
        atomic deque append, no lock); this runs on every read and watchdog tick."""
        with self.lock:
            self._drain_locked()

    def _drain_locked(self) -> None:
        """Fold returned holds in one tight loop (locals, inline bucket search): this work
        still competes with the application for the GIL wherever it runs, so it is kept
        small, not merely moved."""
        closed = self.closed
        if not closed:
            return
        popleft = closed.popleft
        bounds = self.wait_time.bounds
        wait_counts = self.wait_time.counts
        use_counts = self.use_time.counts
        by_site = self.sites.by_site
        totals_for = self.sites.totals
        otel = self.otel_queue
        wait_sum = use_sum = sql_sum = idle_sum = 0.0
        folded = 0
        while True:
            try:
                hold = popleft()
            except IndexError:
                break
            end = hold.end
            held = end - hold.start
            if held < 0.0:
                held = 0.0
            sql = hold.sql
            if hold.depth and hold.sql_t0:  # returned mid-statement (a streaming cursor)
                sql += end - hold.sql_t0
            if sql > held:
                sql = held
            idle = held - sql
            waited = hold.waited
            wait_counts[bisect_left(bounds, waited)] += 1
            use_counts[bisect_left(bounds, held)] += 1
            wait_sum += waited
            use_sum += held
            sql_sum += sql
            idle_sum += idle
            folded += 1
            totals = by_site.get(hold.site) or totals_for(hold.site)
            totals[USE] += held
            totals[IDLE] += idle
            totals[CHECKOUTS] += 1
            if otel is not None:
                otel.append(("wait_time", waited))
                otel.append(("use_time", held))
            hold.task = None
        self.wait_time.sum += wait_sum
        self.use_time.sum += use_sum
        counters = self.counters
        counters.checkouts += folded
        counters.sql_time += sql_sum
        counters.idle_in_use_time += idle_sum

    # -- read side ------------------------------------------------------------------------
    def read(self, name_of: Any) -> dict[str, Any]:
        """A consistent copy of everything, live holds included: their checkouts and waits
        count now, their hold time when they return."""
        with self.lock:
            self._drain_locked()
            holds = list(self.holds.values())
            counters = self.counters.to_dict()
            wait_time = Histogram()
            wait_time.counts = list(self.wait_time.counts)
            wait_time.sum = self.wait_time.sum
            use_time = self.use_time.to_dict()
            create_time = self.create_time.to_dict()
            names = self.sites.names
            named = [(names[site], list(t)) for site, t in self.sites.by_site.items()]
            other = list(self.sites.other)
            known = set(self.sites.by_site)
            full = len(known) >= self.sites.limit
            pending = len(self.waiting)
        counters["checkouts"] += len(holds)
        sites: dict[str, list[float]] = {}
        for name, totals in named:
            _add(sites, name, totals)
        if any(other):
            _add(sites, OTHER_SITE, other)
        for hold in holds:
            wait_time.observe(hold.waited)
            live = [0.0] * len(SITE_FIELDS)
            live[CHECKOUTS] = 1
            in_table = hold.site in known or not full
            _add(sites, name_of(hold.site) if in_table else OTHER_SITE, live)
        columns: dict[str, dict[str, float]] = {f: {} for f in SITE_FIELDS}
        for name, totals in sites.items():
            for index, field_name in enumerate(SITE_FIELDS):
                columns[field_name][name] = totals[index]
        return {"holds": holds, "counters": counters, "pending": pending, "sites": columns,
                "histograms": {"db.client.connection.create_time": create_time,
                               "db.client.connection.wait_time": wait_time.to_dict(),
                               "db.client.connection.use_time": use_time}}  # fmt: skip


def _add(sites: dict[str, list[float]], name: str, totals: list[float]) -> None:
    existing = sites.get(name)
    if existing is None:
        sites[name] = list(totals)
    else:
        for index, value in enumerate(totals):
            existing[index] += value
