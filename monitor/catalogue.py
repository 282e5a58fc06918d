"""The metric catalogue: one definition per metric, shared by every exporter.

The names, kinds and units here are a contract with the dashboards, the alert rules and the
Helm chart; the reference users read, docs/metrics.md, is generated from it. The Prometheus
names are derived the way the OpenTelemetry Prometheus exporter derives them, so a user
sees the same series whether they scrape us directly or go through an OpenTelemetry
Collector.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "updowncounter", "gauge", "histogram"]

POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"
CODE_SITE = "code.site"
KIND = "kind"
LOCK_NAME = "lock.name"

#: Bucket bounds (seconds) for every duration histogram.
SECONDS_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)

#: The label value under which sites beyond the top-K are aggregated.
OTHER_SITE = "other"


@dataclass(frozen=True)
class Metric:
    """One catalogue entry. `attribute` is the one attribute besides the pool name, if any."""

    name: str
    kind: Kind
    unit: str
    description: str
    attribute: str | None = None
    per_pool: bool = True

    @property
    def prometheus_name(self) -> str:
        """The series name OpenTelemetry's Prometheus exporter gives this metric."""
        base = re.sub(r"[^a-zA-Z0-9:]", "_", self.name)
        if self.unit == "s":
            base += "_seconds"
        if self.kind == "counter":
            base += "_total"
        return base

    @property
    def attributes(self) -> tuple[str, ...]:
        keys = (POOL_NAME,) if self.per_pool else ()
        return (*keys, self.attribute) if self.attribute else keys

    @property
    def prometheus_labels(self) -> tuple[str, ...]:
        return tuple(prometheus_label(a) for a in self.attributes)


def prometheus_label(attribute: str) -> str:
    return attribute.replace(".", "_")


def _m(
    name: str,
    kind: Kind,
    unit: str,
    description: str,
    attribute: str | None = None,
    per_pool: bool = True,
) -> Metric:
    return Metric(name, kind, unit, description, attribute, per_pool)


METRICS: tuple[Metric, ...] = (
    _m(
        "db.client.connection.count",
        "updowncounter",
        "{connection}",
        "Open connections by state (idle in the pool, or used by the application).",
        STATE,
    ),
    _m(
        "db.client.connection.max",
        "updowncounter",
        "{connection}",
        "Most open connections allowed: pool_size + max_overflow.",
    ),
    _m(
        "db.client.connection.idle.max",
        "updowncounter",
        "{connection}",
        "Most idle connections kept in the pool: pool_size.",
    ),
    _m(
        "db.client.connection.pending_requests",
        "updowncounter",
        "{request}",
        "Callers waiting for a connection right now.",
    ),
    _m(
        "db.client.connection.timeouts",
        "counter",
        "{timeout}",
        "Checkouts that gave up after pool_timeout.",
    ),
    _m(
        "db.client.connection.create_time", "histogram", "s", "Time to open a new DBAPI connection."
    ),
    _m(
        "db.client.connection.wait_time",
        "histogram",
        "s",
        "Time from asking the pool for a connection to getting one.",
    ),
    _m(
        "db.client.connection.use_time",
        "histogram",
        "s",
        "Time a connection was held: checkout to return.",
    ),
    _m(
        "sqlalchemy.pool.overflow",
        "gauge",
        "{connection}",
        "Overflow connections open now (beyond pool_size).",
    ),
    _m("sqlalchemy.pool.checkouts", "counter", "{checkout}", "Connections checked out."),
    _m(
        "sqlalchemy.pool.invalidations",
        "counter",
        "{invalidation}",
        "Connections invalidated, by kind (hard: closed now; soft: replaced at next checkout).",
        KIND,
    ),
    _m(
        "sqlalchemy.pool.connect_errors",
        "counter",
        "{error}",
        "Attempts to open a DBAPI connection that failed.",
    ),
    _m("sqlalchemy.pool.oldest_checkout_age", "gauge", "s", "Age of the longest live checkout."),
    _m(
        "sqlalchemy.pool.long_held",
        "gauge",
        "{connection}",
        "Live checkouts held longer than the long-held threshold.",
    ),
    _m(
        "sqlalchemy.pool.long_held_events",
        "counter",
        "{event}",
        "Long-held alerts raised, by the code site that checked the connection out.",
        CODE_SITE,
    ),
    _m(
        "sqlalchemy.pool.sql_time",
        "counter",
        "s",
        "Time spent inside DBAPI execute calls while connections were held.",
    ),
    _m(
        "sqlalchemy.pool.idle_in_use_time",
        "counter",
        "s",
        "Time connections were held but not executing SQL.",
    ),
    _m(
        "sqlalchemy.pool.site_use_time",
        "counter",
        "s",
        "Hold time by code site (top sites; the rest under 'other').",
        CODE_SITE,
    ),
    _m(
        "sqlalchemy.pool.site_idle_in_use_time",
        "counter",
        "s",
        "Held-but-not-executing time by code site.",
        CODE_SITE,
    ),
    _m(
        "sqlalchemy.pool.site_checkouts",
        "counter",
        "{checkout}",
        "Checkouts by code site.",
        CODE_SITE,
    ),
    _m(
        "sqlalchemy.pool.cross_thread_uses",
        "counter",
        "{use}",
        "Statements run on a connection from a thread other than the one that checked it out.",
        CODE_SITE,
    ),
    _m(
        "sqlalchemy.pool.concurrent_uses",
        "counter",
        "{use}",
        "Statements that overlapped another statement on the same connection.",
        CODE_SITE,
    ),
    _m(
        "pool_monitor.errors",
        "counter",
        "{error}",
        "Exceptions swallowed inside pool-monitor's hooks (must stay 0).",
    ),
    _m(
        "app.lock.wait_time",
        "histogram",
        "s",
        "Time spent waiting to acquire an instrumented application lock.",
        LOCK_NAME,
        per_pool=False,
    ),
    _m(
        "app.lock.hold_time",
        "histogram",
        "s",
        "Time an instrumented application lock was held.",
        LOCK_NAME,
        per_pool=False,
    ),
)

BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}
POOL_METRICS: tuple[Metric, ...] = tuple(m for m in METRICS if m.per_pool)
LOCK_METRICS: tuple[Metric, ...] = tuple(m for m in METRICS if not m.per_pool)
