"""Per-pool state: live holds, counters, histograms and per-site totals.

The hooks write with atomic operations only: a checkout stores its hold in `holds`, a
return moves it to the `closed` queue. Everything else is *folded* once per hold, when the
ledger is read (every exporter reads) or on a watchdog tick: a returned hold's checkout
and use in one pass, and a hold still out has its checkout counted when read (`counted`
keeps it from being counted again when it returns). Folding each event exactly once is
what keeps every exported counter monotonic however reads and returns interleave. Gauges
are not kept here: they are read from the live pool when collected (see `gauges`).
"""

from __future__ import annotations

import threading
import time
import weakref
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from typing import Any

from monitor.catalogue import OTHER_SITE
from monitor.histogram import Histogram
from monitor.sites import SiteKey
from monitor.tracing import trace_ids

#: Indexes into a site's totals list.
USE, IDLE, CHECKOUTS, LONG_HELD, CROSS_THREAD, CONCURRENT = range(6)
SITE_FIELDS = (
    "use_time",
    "idle_in_use_time",
    "checkouts",
    "long_held_events",
    "cross_thread_uses",
    "concurrent_uses",
)

#: Raw observations kept per OpenTelemetry bridge between two of its collections.
OTEL_QUEUE_LIMIT = 200_000
#: Holds waiting to be folded; past this, the returning thread folds them itself.
FOLD_LIMIT = 20_000


class Hold:
    """One checkout: who borrowed the connection, where, and how it is being used."""

    __slots__ = (
        "alerted",
        "board",
        "counted",
        "ctx",
        "depth",
        "end",
        "exec_thread",
        "fairy_ref",
        "record",
        "shared",
        "site",
        "slot",
        "sql",
        "sql_t0",
        "start",
        "task_ref",
        "thread",
        "user",
        "users",
        "waited",
    )

    def __init__(
        self,
        start: float,
        waited: float,
        thread: int,
        task: Any,
        site: SiteKey | None,
        record: Any,
        fairy_ref: Any,
    ) -> None:
        self.start = start
        self.waited = waited
        self.thread = thread  # the thread that checked it out
        self.user = thread  # the thread that used it last
        self.users: dict[int, str] | None = None  # every thread that used it, once shared
        # Weak: a task that leaks a connection and dies must stay collectable, so that
        # SQLAlchemy's return-on-GC still gives the slot back.
        self.task_ref = weakref.ref(task) if task is not None else None
        self.site = site
        self.record = record
        # SQLAlchemy's own weak reference from the record to the checkout's fairy, new on
        # every checkout: while `record.fairy_ref is hold.fairy_ref`, this hold is the
        # record's current one (what tells a late `detach` from the next holder's hold).
        self.fairy_ref = fairy_ref
        self.sql = 0.0
        self.sql_t0 = 0.0
        self.depth = 0
        self.exec_thread = 0
        self.end = 0.0  # until it is returned
        self.counted = False  # its checkout is in the totals (folded while still out)
        self.alerted = False
        self.shared = False  # set once it changed hands: from then on, locked
        # Its slot on the process's board (`monitor.exporters.board`), if it got one.
        self.board: Any = None
        self.slot = 0
        # The OpenTelemetry span context current at checkout (set by the hook when
        # tracing is on and a span is current); its ids are read off the hot path.
        self.ctx: Any = None

    @property
    def task(self) -> Any:
        return self.task_ref() if self.task_ref is not None else None


class Counters:
    __slots__ = (
        "cancelled_waits",
        "checkouts",
        "closes",
        "connect_errors",
        "connects",
        "detaches",
        "errors",
        "handoffs",
        "idle_in_use_time",
        "invalidations_hard",
        "invalidations_soft",
        "otel_dropped",
        "sql_time",
        "timeouts",
        "untracked_checkouts",
        "untracked_returns",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def to_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.__slots__}


class SiteTable:
    """Totals per code site, at most `limit` named sites; later ones share `other`.

    A site keeps its own series once it has one, so every exported counter only grows.
    """

    __slots__ = ("by_site", "limit", "name_of", "names", "other")

    def __init__(self, limit: int, name_of: Callable[[SiteKey | None], str]) -> None:
        self.limit = limit
        self.name_of = name_of
        self.by_site: dict[SiteKey | None, list[float]] = {}
        self.names: dict[SiteKey | None, str] = {}
        self.other = [0.0] * len(SITE_FIELDS)

    def totals(self, site: SiteKey | None) -> list[float]:
        """The totals list for `site` (caller holds the ledger lock)."""
        totals = self.by_site.get(site)
        if totals is None:
            if len(self.by_site) >= self.limit:
                return self.other
            self.names[site] = self.name_of(site)
            totals = self.by_site[site] = [0.0] * len(SITE_FIELDS)
        return totals


class Exemplars:
    """One exemplar per histogram bucket: a traced observation, the slowest of the last
    `window` seconds (an older one gives way to the next, whatever its value), so each
    scrape sees the slowest recent request of each bucket. Caller holds the ledger lock.

    Each is `(value, unix time, perf_counter time, trace id, span id)`, ids in hex: the
    wall time is fixed when it is recorded, so Prometheus, which stores an exemplar again
    whenever its timestamp changes, sees the same one on every scrape."""

    __slots__ = ("bounds", "by_bucket", "window")

    def __init__(self, bounds: tuple[float, ...], window: float) -> None:
        self.bounds = bounds
        self.window = window
        self.by_bucket: list[tuple[float, float, float, str, str] | None] = [None] * (
            len(bounds) + 1
        )

    def offer(self, value: float, at: float, ctx: Any, wall_offset: float) -> None:
        """Keep `value` (observed at perf_counter `at` under span context `ctx`) if it is
        its bucket's slowest, or the bucket's exemplar is older than the window. Only
        sampled spans: an unsampled trace id leads to no trace."""
        index = bisect_left(self.bounds, value)
        old = self.by_bucket[index]
        if old is not None and value < old[0] and at - old[2] <= self.window:
            return
        try:
            if not ctx.trace_flags.sampled:  # most traces, under head sampling: no ids
                return
        except Exception:
            return
        ids = trace_ids(ctx)
        if ids is None:
            return
        self.by_bucket[index] = (value, at + wall_offset, at, ids.trace_id, ids.span_id)

    def to_list(self) -> list[dict[str, Any] | None] | None:
        """Per bucket, `{value, timestamp, trace_id, span_id}` or None; None if empty."""
        if not any(self.by_bucket):
            return None
        return [
            None
            if e is None
            else {"value": e[0], "timestamp": e[1], "trace_id": e[3], "span_id": e[4]}
            for e in self.by_bucket
        ]


def wall_offset() -> float:
    """unix time − perf_counter time, now: turns a perf_counter reading into unix time."""
    return time.time() - time.perf_counter()


class Ledger:
    """Everything one instrumented pool has measured in this process."""

    __slots__ = (
        "closed",
        "counters",
        "create_time",
        "exemplar_window",
        "holds",
        "lock",
        "logged_once",
        "otel_queues",
        "pids",
        "sites",
        "use_exemplars",
        "use_time",
        "wait_exemplars",
        "wait_time",
        "waiting",
    )

    def __init__(
        self,
        max_sites: int,
        name_of: Callable[[SiteKey | None], str],
        exemplar_window: float = 15.0,
    ) -> None:
        self.exemplar_window = exemplar_window
        self.lock = threading.Lock()
        self.holds: dict[Any, Hold] = {}  # live holds by connection record
        self.closed: deque[Hold] = deque()  # returns not yet folded
        self.waiting: list[None] = []  # one entry per caller inside `pool.connect()`
        # Server backend pid by connection record, set at connect. Our own side table, not
        # `record.info` (that is the application's `Connection.info` dict); weak, so a
        # closed record goes with its pid.
        self.pids: weakref.WeakKeyDictionary[Any, int | None] = weakref.WeakKeyDictionary()
        # One per OTel bridge: (histogram, value, span context or None).
        self.otel_queues: list[deque[tuple[str, float, Any]]] = []
        self.sites = SiteTable(max_sites, name_of)
        self._zero()

    def _zero(self) -> None:
        self.counters = Counters()
        self.wait_time = Histogram()
        self.use_time = Histogram()
        self.create_time = Histogram()
        self.wait_exemplars = Exemplars(self.wait_time.bounds, self.exemplar_window)
        self.use_exemplars = Exemplars(self.use_time.bounds, self.exemplar_window)
        self.sites = SiteTable(self.sites.limit, self.sites.name_of)
        self.logged_once: set[tuple[str, SiteKey | None]] = set()

    def reset_after_fork(self) -> None:
        """Start from zero in a forked child: the parent's holds and counts are not its
        own, and a lock another thread held at fork time would never be released. Done in
        place (`_at_fork_reinit`, as the standard library does), because the hooks keep
        direct references to the lock, the holds dict and the queues."""
        reinit = getattr(self.lock, "_at_fork_reinit", None)
        if reinit is not None:
            reinit()
        for container in (self.holds, self.closed, self.waiting, self.pids, *self.otel_queues):
            container.clear()
        self._zero()

    def count(self, counter: str) -> None:
        """Add one to a `Counters` field (the rare events: closes, invalidations, …)."""
        with self.lock:
            setattr(self.counters, counter, getattr(self.counters, counter) + 1)

    def add_otel_queue(self) -> deque[tuple[str, float, Any]]:
        queue: deque[tuple[str, float, Any]] = deque()
        with self.lock:
            self.otel_queues = [*self.otel_queues, queue]
        return queue

    # -- folding (off the hot path) ---------------------------------------------------------
    def drain(self) -> None:
        """Fold every returned hold into the totals."""
        with self.lock:
            self._fold_closed()

    def count_checkout(self, hold: Hold) -> None:
        """Count the checkout of a hold that is still out (or that no return will reach).
        Caller holds the lock."""
        hold.counted = True
        self.wait_time.counts[bisect_left(self.wait_time.bounds, hold.waited)] += 1
        self.wait_time.sum += hold.waited
        self.counters.checkouts += 1
        self.sites.totals(hold.site)[CHECKOUTS] += 1
        if hold.ctx is not None:
            self.wait_exemplars.offer(hold.waited, hold.start, hold.ctx, wall_offset())
        for queue in self.otel_queues:
            self._to_otel(queue, "wait_time", hold.waited, hold.ctx)

    def _fold_closed(self) -> None:
        """Returned holds: the checkout (unless counted while out), and the hold, SQL and
        idle-in-use time, per pool and per site. One pass, locals only: this runs once for
        every checkout the application makes."""
        closed = self.closed
        if not closed:
            return
        popleft = closed.popleft
        use_bounds, use_counts = self.use_time.bounds, self.use_time.counts
        wait_bounds, wait_counts = self.wait_time.bounds, self.wait_time.counts
        no_wait = wait_bounds[0]
        last_site: Any = object()
        totals: list[float] = []
        by_site = self.sites.by_site
        totals_for = self.sites.totals
        otel = self.otel_queues
        offset: float | None = None  # wall_offset(), once per fold that needs it
        checkouts = 0
        wait_sum = use_sum = sql_sum = idle_sum = 0.0
        try:
            for _ in range(len(closed)):  # only this (locked) reader pops: all are there
                hold = popleft()
                site = hold.site
                if site is not last_site:  # runs of one site are the rule, and `find`
                    last_site = site  # returns one tuple per site: skip the hashing
                    totals = by_site.get(site)
                    if totals is None:
                        totals = totals_for(site)
                if not hold.counted:
                    waited = hold.waited
                    if waited <= no_wait:  # the rule, unless the pool is saturated
                        wait_counts[0] += 1
                    else:
                        wait_counts[bisect_left(wait_bounds, waited)] += 1
                    wait_sum += waited
                    checkouts += 1
                    totals[CHECKOUTS] += 1
                    if otel:
                        for queue in otel:
                            self._to_otel(queue, "wait_time", waited, hold.ctx)
                held = hold.end - hold.start
                if held < 0.0:
                    held = 0.0
                sql = hold.sql
                if hold.depth and hold.sql_t0:  # returned mid-statement (streaming cursor)
                    sql += hold.end - hold.sql_t0
                if sql > held:
                    sql = held
                idle = held - sql
                use_counts[bisect_left(use_bounds, held)] += 1
                use_sum += held
                sql_sum += sql
                idle_sum += idle
                totals[USE] += held
                totals[IDLE] += idle
                ctx = hold.ctx
                if ctx is not None:  # traced: the exemplar candidates
                    if offset is None:
                        offset = wall_offset()
                    if not hold.counted:
                        self.wait_exemplars.offer(hold.waited, hold.start, ctx, offset)
                    self.use_exemplars.offer(held, hold.end, ctx, offset)
                if otel:
                    for queue in otel:
                        self._to_otel(queue, "use_time", held, ctx)
        finally:  # an error mid-way must not leave counts and histograms disagreeing
            self.wait_time.sum += wait_sum
            self.use_time.sum += use_sum
            counters = self.counters
            counters.checkouts += checkouts
            counters.sql_time += sql_sum
            counters.idle_in_use_time += idle_sum

    def _to_otel(
        self, queue: deque[tuple[str, float, Any]], kind: str, value: float, ctx: Any = None
    ) -> None:
        if len(queue) >= OTEL_QUEUE_LIMIT:  # no collection for a long time: say so
            self.counters.otel_dropped += 1
            return
        queue.append((kind, value, ctx))

    def record_create_time(self, elapsed: float) -> None:
        with self.lock:
            self.create_time.observe(elapsed)
            self.counters.connects += 1
            for queue in self.otel_queues:
                self._to_otel(queue, "create_time", elapsed)

    # -- read side ------------------------------------------------------------------------
    def read(self) -> dict[str, Any]:
        """A consistent copy of everything, after folding what is queued."""
        with self.lock:
            self._fold_closed()
            holds = list(self.holds.values())
            for hold in holds:
                if not hold.counted:
                    self.count_checkout(hold)
            names = self.sites.names
            rows = [(names[site], list(t)) for site, t in self.sites.by_site.items()]
            other = list(self.sites.other)
            result = {
                "holds": holds,
                "pending": len(self.waiting),
                "counters": self.counters.to_dict(),
                "histograms": {
                    "db.client.connection.create_time": self.create_time.to_dict(),
                    "db.client.connection.wait_time": _with_exemplars(
                        self.wait_time.to_dict(), self.wait_exemplars
                    ),
                    "db.client.connection.use_time": _with_exemplars(
                        self.use_time.to_dict(), self.use_exemplars
                    ),
                },
            }
        if any(other):
            rows.append((OTHER_SITE, other))
        columns: dict[str, dict[str, float]] = {f: {} for f in SITE_FIELDS}
        for name, totals in rows:
            for index, field_name in enumerate(SITE_FIELDS):
                column = columns[field_name]
                column[name] = column.get(name, 0.0) + totals[index]
        result["sites"] = columns
        return result


def _with_exemplars(hist: dict[str, Any], exemplars: Exemplars) -> dict[str, Any]:
    listed = exemplars.to_list()
    if listed is not None:
        hist["exemplars"] = listed
    return hist
