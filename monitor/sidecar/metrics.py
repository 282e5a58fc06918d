"""The sidecar's `/metrics`: merged pools, PostgreSQL's side, and the sidecar's own health.

The merged pool series go through the same `samples` → `families` path as the in-process
exporter, so a dashboard cannot tell a sidecar scrape from a worker scrape except by the
numbers being whole-pod. The sidecar's health lives in a registry of its own: the data
registry carries only what the workers and PostgreSQL measured.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.core import Metric as PromMetric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from monitor.catalogue import CODE_SITE, POOL_NAME, prometheus_label
from monitor.exporters.prometheus import families
from monitor.exporters.samples import lock_samples, pool_samples
from monitor.sidecar import blocking
from monitor.sidecar.advice import AdviceCollector, AdviceWindow
from monitor.sidecar.aggregate import View
from monitor.sidecar.postgres import PostgresCollector

APP = "application_name"
log = logging.getLogger("monitor.sidecar.metrics")


class MergedPoolsCollector(Collector):
    """Every pool summed over every worker process (exited ones' counters included)."""

    def __init__(self, view: Callable[[], View]) -> None:
        self._view = view

    def collect(self) -> Iterator[PromMetric]:
        view = self._view()
        yield from families([*pool_samples(view.pools), *lock_samples(view.locks)])

    def describe(self) -> list[PromMetric]:
        return []


class PostgresMetrics(Collector):
    """`pg_up`, `pg_max_connections`, `pg_reserved_connections` and `pg_app_*` (cached)."""

    def __init__(self, collector: PostgresCollector) -> None:
        self._pg = collector

    def collect(self) -> Iterator[PromMetric]:
        view = self._pg.view
        if not view.configured:
            return
        up = GaugeMetricFamily("pg_up", "1 if the sidecar's last PostgreSQL poll succeeded.")
        up.add_metric([], 1 if view.up else 0)
        yield up
        if not view.up:
            return  # stale server figures would mislead more than none
        for name, value, doc in (
            ("pg_max_connections", view.max_connections, "Server max_connections."),
            (
                "pg_reserved_connections",
                view.reserved_connections,
                "superuser_reserved_connections + reserved_connections (16+).",
            ),
        ):
            family = GaugeMetricFamily(name, doc)
            family.add_metric([], value or 0)
            yield family
        backends = GaugeMetricFamily(
            "pg_app_backends",
            "Client backends by application_name and state.",
            labels=[APP, "state"],
        )
        per_app = {
            "pg_app_idle_in_transaction_max_seconds": (
                "Longest time a backend of this application has been idle in transaction.",
                lambda s: s.idle_in_transaction_max_s,
            ),
            "pg_app_transaction_max_seconds": (
                "Age of this application's oldest open transaction.",
                lambda s: s.transaction_max_s,
            ),
            "pg_app_blocked_backends": (
                "Backends of this application waiting on a lock another backend holds.",
                lambda s: s.blocked,
            ),
            "pg_app_lock_wait_max_seconds": (
                "Longest current lock wait among this application's backends.",
                lambda s: s.lock_wait_max_s,
            ),
        }
        out = {
            name: GaugeMetricFamily(name, doc, labels=[APP]) for name, (doc, _) in per_app.items()
        }
        for app, stats in sorted(view.apps.items()):
            for state, n in sorted(stats.backends.items()):
                backends.add_metric([app, state], n)
            for name, (_, read) in per_app.items():
                out[name].add_metric([app], read(stats))
        yield backends
        yield from out.values()

    def describe(self) -> list[PromMetric]:
        return []


class BlockingMetrics(Collector):
    """`pool_monitor_blocking_*`: who blocks whom, by the root blocker's code site and pool
    (`blocking.by_site`, at most `MAX_SITE_SERIES` label sets), from the cached poll and
    the latest holds, joined as `/api/checkouts`' `blocked_by` is: a scrape never polls.
    A failure here is logged once per streak and leaves only these series out."""

    def __init__(self, view: Callable[[], View], pg: PostgresCollector) -> None:
        self._view = view
        self._pg = pg
        self._failing = False

    def collect(self) -> Iterator[PromMetric]:
        pg = self._pg.view
        if not pg.configured or not pg.up:
            return  # as for pg_app_*: stale server figures would mislead more than none
        try:
            forest = blocking.build(self._view(), pg, time.time(), max_sample_age=math.inf)
            sites = blocking.by_site(forest)
        except Exception:
            if not self._failing:
                log.exception("building the lock-wait graph failed; blocking series left out")
            self._failing = True
            return
        self._failing = False
        labels = [prometheus_label(CODE_SITE), prometheus_label(POOL_NAME)]
        blocked = GaugeMetricFamily(
            "pool_monitor_blocking_blocked_backends",
            "Backends waiting on a lock behind a root blocker (one that blocks others and "
            "waits on nobody), by its code site and pool: kind=direct waits on it, "
            "kind=transitive also through other waiters (distinct backends). Roots no "
            "instrumented hold is attributed to are (unknown); beyond "
            f"{blocking.MAX_SITE_SERIES} label sets, (other).",
            labels=[*labels, "kind"],
        )
        wait = GaugeMetricFamily(
            "pool_monitor_blocking_root_lock_wait_max_seconds",
            "Longest current lock wait among the backends a root blocker's code site and "
            "pool block, directly or not.",
            labels=labels,
        )
        for site in sites:
            blocked.add_metric([site.code_site, site.pool, "direct"], site.direct)
            blocked.add_metric([site.code_site, site.pool, "transitive"], site.transitive)
            wait.add_metric([site.code_site, site.pool], site.lock_wait_max_s)
        yield blocked
        yield _gauge(
            "pool_monitor_blocking_longest_chain",
            "Edges on the longest chain of lock waits under any root blocker (1: its "
            "waiters wait on it directly; 0: nothing blocks).",
            blocking.longest_chain(forest),
        )
        yield wait

    def describe(self) -> list[PromMetric]:
        return []


def no_scans() -> tuple[int, float]:
    """Scan health when nobody reports it (no snapshot directory): no errors, age 0."""
    return 0, 0.0


class HealthCollector(Collector):
    """The sidecar itself: snapshot errors, processes seen, scan and poll timings."""

    def __init__(
        self,
        view: Callable[[], View],
        pg: PostgresCollector,
        scans: Callable[[], tuple[int, float]] = no_scans,
    ) -> None:
        self._view = view
        self._pg = pg
        self._scans = scans

    def collect(self) -> Iterator[PromMetric]:
        view = self._view()
        scan_errors, scan_age = self._scans()
        failed = CounterMetricFamily(
            "pool_monitor_sidecar_scan_errors",
            "Scans of the snapshot directory that failed (the next one runs on schedule).",
        )
        failed.add_metric([], scan_errors)
        yield failed
        yield _gauge(
            "pool_monitor_sidecar_last_scan_age_seconds",
            "Seconds since a scan of the snapshot directory last succeeded (at scrape time): "
            "grows while scans hang or fail, and /readyz fails past max(10 s, 5 intervals).",
            scan_age,
        )
        errors = CounterMetricFamily(
            "pool_monitor_snapshot_errors",
            "Snapshot files skipped, by reason (each version of a bad file counted once).",
            labels=["reason"],
        )
        for reason, n in sorted(view.errors.items()):
            errors.add_metric([reason], n)
        yield errors
        processes = GaugeMetricFamily(
            "pool_monitor_sidecar_processes",
            "Worker processes known from snapshot files, by state.",
            labels=["state"],
        )
        states = {"live": 0, "standby": 0, "dead": 0, "exited": 0}
        write_errors = 0
        for proc in view.processes:
            states[proc["state"]] = states.get(proc["state"], 0) + 1
            if proc["state"] == "live":
                write_errors += proc.get("write_errors") or 0
        for state, n in states.items():
            processes.add_metric([state], n)
        yield processes
        yield _gauge(
            "pool_monitor_sidecar_worker_write_errors",
            "Failed snapshot writes the live workers report (a full or read-only volume).",
            write_errors,
        )
        yield _gauge(
            "pool_monitor_sidecar_snapshot_dir_readable",
            "1 if the snapshot directory could be listed at the last scan.",
            0 if view.dir_error else 1,
        )
        yield _gauge(
            "pool_monitor_sidecar_scan_duration_seconds",
            "Time the last scan and merge of the snapshot files took.",
            view.scan_s,
        )
        yield _gauge(
            "pool_monitor_sidecar_last_scan_timestamp_seconds",
            "When the snapshot files were last scanned (unix time).",
            view.scanned_at,
        )
        if self._pg.view.configured:
            pg = self._pg
            polls = CounterMetricFamily(
                "pool_monitor_sidecar_postgres_polls", "PostgreSQL polls attempted."
            )
            polls.add_metric([], pg.polls)
            yield polls
            errors = CounterMetricFamily(
                "pool_monitor_sidecar_postgres_poll_errors", "PostgreSQL polls that failed."
            )
            errors.add_metric([], pg.errors)
            yield errors
            yield _gauge(
                "pool_monitor_sidecar_postgres_poll_duration_seconds",
                "Time the last PostgreSQL poll took.",
                pg.view.poll_s,
            )
            if pg.last_success is not None:
                yield _gauge(
                    "pool_monitor_sidecar_postgres_last_success_timestamp_seconds",
                    "When PostgreSQL was last polled successfully (unix time).",
                    pg.last_success,
                )

    def describe(self) -> list[PromMetric]:
        return []


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc)
    family.add_metric([], value)
    return family


class Registries:
    """The data registry (pools + PostgreSQL) and the health registry, exposed together."""

    def __init__(
        self,
        view: Callable[[], View],
        pg: PostgresCollector,
        scans: Callable[[], tuple[int, float]] = no_scans,
        advice: AdviceWindow | None = None,
    ) -> None:
        self.data = CollectorRegistry(auto_describe=False)
        self.data.register(MergedPoolsCollector(view))
        self.data.register(PostgresMetrics(pg))
        self.data.register(BlockingMetrics(view, pg))
        if advice is not None:
            self.data.register(AdviceCollector(advice))
        self.health = CollectorRegistry(auto_describe=False)
        self.health.register(HealthCollector(view, pg, scans))

    def exposition(self) -> bytes:
        """Both registries in the plain text format."""
        return self.render(None)[0]

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """Both registries in the format the scraper asked for (`Accept`), and its media
        type: OpenMetrics, which carries the exemplars, when it lists it (Prometheus does
        by default); the plain text format, without exemplars, otherwise."""
        try:
            encoder, media_type = choose_encoder(accept or "")
        except Exception:  # a malformed header (`version=abc`): the format every scraper reads
            encoder, media_type = choose_encoder("")
        return encoder(_Both(self.data, self.health)), media_type


class _Both:
    """Two registries read as one: OpenMetrics has a single `# EOF`, so they cannot be
    concatenated like text expositions."""

    def __init__(self, *registries: CollectorRegistry) -> None:
        self._registries = registries

    def collect(self) -> Iterator[PromMetric]:
        for registry in self._registries:
            yield from registry.collect()
