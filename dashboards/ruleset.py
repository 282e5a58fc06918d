"""Prometheus recording and alerting rules, rendered from `thresholds` so they are overridable.

Why generated: the committed `dashboards/rules/*.yml` are the rendering with defaults (a
drift test keeps them in sync), while the Helm chart and the Prometheus test harness call
`render_rules()` with their own thresholds and `for` durations.

Label policy (documented in the README): gauges describe one pool in one process, so rules
on them keep every label (an alert names the instance). Latency quantiles and shares are
computed per service (`namespace`, `job`, `service`, pool), pooling all replicas' buckets,
because one replica rarely has enough checkouts for a stable p95.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from dashboards import series as s
from dashboards.thresholds import Settings, Value, format_number, resolve
from monitor.sizing import WAITED_S

RATE_WINDOW = "5m"
#: Where each alert's runbook lives; the anchor is the alert name in lower case.
RUNBOOK_BASE_URL = "https://github.com/pool-monitor/pool-monitor/blob/main/dashboards/README.md"

#: The per-service key the quantile and share rules aggregate to.
SERVICE_POOL = (*s.TARGET_LABELS, s.POOL)
SERVICE_LOCK = (*s.TARGET_LABELS, s.LOCK)

WAIT, USE, CREATE = (
    "db.client.connection.wait_time",
    "db.client.connection.use_time",
    "db.client.connection.create_time",
)
LOCK_WAIT, LOCK_HOLD = "app.lock.wait_time", "app.lock.hold_time"

#: Which quantiles are recorded for which histogram (the dashboards use exactly these).
QUANTILES: Mapping[str, tuple[str, ...]] = {
    WAIT: ("0.5", "0.95", "0.99"),
    USE: ("0.5", "0.99"),
    CREATE: ("0.5", "0.99"),
    LOCK_WAIT: ("0.5", "0.95", "0.99"),
    LOCK_HOLD: ("0.5", "0.95", "0.99"),
}


def _by(labels: Iterable[str]) -> str:
    return ", ".join(labels)


def bucket_rate_name(otel_name: str) -> str:
    """Recorded per-service bucket rate of a histogram (feeds quantiles and heatmaps)."""
    level = "lock" if otel_name in (LOCK_WAIT, LOCK_HOLD) else "pool"
    return f"{level}:{s.m(otel_name)}_bucket:rate{RATE_WINDOW}"


def quantile_name(otel_name: str) -> str:
    """Recorded quantile series of a histogram; the `quantile` label picks p50/p95/p99."""
    level = "lock" if otel_name in (LOCK_WAIT, LOCK_HOLD) else "pool"
    return f"{level}:{s.m(otel_name)}:quantile_rate{RATE_WINDOW}"


SATURATION = "pool:db_client_connection_saturation:ratio"
SQL_RATE = f"pool:sqlalchemy_pool_sql_time_seconds:rate{RATE_WINDOW}"
IDLE_RATE = f"pool:sqlalchemy_pool_idle_in_use_time_seconds:rate{RATE_WINDOW}"
HOLD_RATE = f"pool:sqlalchemy_pool_hold_time_seconds:rate{RATE_WINDOW}"
IDLE_SHARE = f"pool:sqlalchemy_pool_idle_in_use_share:ratio_rate{RATE_WINDOW}"
SITE_USE_RATE = f"pool_site:sqlalchemy_pool_site_use_time_seconds:rate{RATE_WINDOW}"
SITE_IDLE_RATE = f"pool_site:sqlalchemy_pool_site_idle_in_use_time_seconds:rate{RATE_WINDOW}"
PG_USAGE = "pg:pg_app_backends:usable_ratio"
#: The measured inputs of the sizing model (monitor/sizing.py), per service and pool, from
#: Prometheus alone; the offered load (connections held on average) is `HOLD_RATE`.
CHECKOUT_RATE = f"pool:sqlalchemy_pool_checkouts:rate{RATE_WINDOW}"
USE_MEAN = f"pool:db_client_connection_use_time_seconds:mean{RATE_WINDOW}"
WAIT_MEAN = f"pool:db_client_connection_wait_time_seconds:mean{RATE_WINDOW}"
WAITED_RATIO = f"pool:db_client_connection_waited:ratio_rate{RATE_WINDOW}"
#: The fleet's connection budget: every pod, process and pool against the server.
FLEET_MAX = "fleet:db_client_connection_max:sum"
FLEET_RECOMMENDED = "fleet:pool_monitor_advice_recommended_connections:sum"
FLEET_BUDGET = "fleet:db_client_connection_max:budget_ratio"
#: A checkout that waited at most this long did not queue: `monitor.sizing.WAITED_S`, as
#: the `le` of the wait-time bucket that ends there (a bound of `SECONDS_BUCKETS`).
WAITED_LE = f"{WAITED_S:g}"


@dataclass(frozen=True)
class Recording:
    record: str
    expr: str
    labels: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"record": self.record, "expr": self.expr}
        if self.labels:
            out["labels"] = dict(self.labels)
        return out


def _histogram_rules(otel_name: str, key: tuple[str, ...]) -> list[Recording]:
    rate = bucket_rate_name(otel_name)
    rules = [
        Recording(
            rate, f"sum by ({_by((*key, 'le'))}) (rate({s.bucket(otel_name)}[{RATE_WINDOW}]))"
        )
    ]
    rules += [
        Recording(quantile_name(otel_name), f"histogram_quantile({q}, {rate})", {"quantile": q})
        for q in QUANTILES[otel_name]
    ]
    return rules


def _mean_rule(record: str, otel_name: str, key: str) -> Recording:
    """Mean of a histogram's observations over the window: rate(sum) / rate(count)."""
    stem = s.m(otel_name)
    return Recording(
        record,
        f"sum by ({key}) (rate({stem}_sum[{RATE_WINDOW}])) "
        f"/ (sum by ({key}) (rate({stem}_count[{RATE_WINDOW}])) > 0)",
    )


def recording_rules() -> list[Recording]:
    """Every recording rule, in evaluation order (later rules read earlier ones)."""
    used = f'{s.m("db.client.connection.count")}{{{s.STATE_LABEL}="used"}}'
    key = _by(SERVICE_POOL)
    site_key = _by((*SERVICE_POOL, s.SITE))
    rules = [
        # Per process: a pool lives in one process, so averaging replicas would hide one
        # that has run dry. `> 0` drops pools without a fixed size (NullPool, StaticPool).
        Recording(
            SATURATION,
            f"{used} / ignoring({s.STATE_LABEL}) ({s.m('db.client.connection.max')} > 0)",
        ),
    ]
    for name in (WAIT, USE, CREATE):
        rules += _histogram_rules(name, SERVICE_POOL)
    rules += [
        Recording(
            SQL_RATE, f"sum by ({key}) (rate({s.m('sqlalchemy.pool.sql_time')}[{RATE_WINDOW}]))"
        ),
        Recording(
            IDLE_RATE,
            f"sum by ({key}) (rate({s.m('sqlalchemy.pool.idle_in_use_time')}[{RATE_WINDOW}]))",
        ),
        # Connection-seconds held per second = connections held on average.
        Recording(HOLD_RATE, f"{SQL_RATE} + {IDLE_RATE}"),
        Recording(IDLE_SHARE, f"{IDLE_RATE} / ({HOLD_RATE} > 0)"),
        Recording(
            SITE_USE_RATE,
            f"sum by ({site_key}) (rate({s.m('sqlalchemy.pool.site_use_time')}[{RATE_WINDOW}]))",
        ),
        Recording(
            SITE_IDLE_RATE,
            f"sum by ({site_key}) "
            f"(rate({s.m('sqlalchemy.pool.site_idle_in_use_time')}[{RATE_WINDOW}]))",
        ),
    ]
    # The sizing model's measured inputs (monitor/sizing.py), all processes and replicas
    # of a service together: arrival rate λ, mean hold W, mean wait and the share of
    # checkouts that waited. The offered load λW is HOLD_RATE above (connections held on
    # average); per process it is that divided by the processes serving the pool.
    wait = s.m(WAIT)
    rules += [
        Recording(
            CHECKOUT_RATE,
            f"sum by ({key}) (rate({s.m('sqlalchemy.pool.checkouts')}[{RATE_WINDOW}]))",
        ),
        _mean_rule(USE_MEAN, USE, key),
        _mean_rule(WAIT_MEAN, WAIT, key),
        # Waited = waited longer than 1 ms, monitor.sizing's WAITED_S (`measured_wait`):
        # every checkout outside the bucket that ends at 1 ms.
        Recording(
            WAITED_RATIO,
            f'1 - sum by ({key}) (rate({wait}_bucket{{le="{WAITED_LE}"}}[{RATE_WINDOW}])) '
            f"/ (sum by ({key}) (rate({wait}_count[{RATE_WINDOW}])) > 0)",
        ),
    ]
    for name in (LOCK_WAIT, LOCK_HOLD):
        rules += _histogram_rules(name, SERVICE_LOCK)
    rules.append(
        # Per collector: the backends it sees against the connections ordinary roles may
        # open. Several sidecars watching one server each compute the same ratio.
        Recording(
            PG_USAGE,
            f"sum without ({s.APPLICATION}, {s.PG_STATE}) (pg_app_backends) "
            "/ (pg_max_connections - pg_reserved_connections > 0)",
        )
    )
    maximum = s.m("db.client.connection.max")
    rules += [
        # The fleet: every pod, process and pool this Prometheus scrapes (scrape the
        # sidecars, not the workers too, or each process counts twice).
        Recording(FLEET_MAX, f"sum({maximum})"),
        # Each sidecar's advice is per process: times its processes, per pod and pool
        # (the two gauges carry the same labels), over the pools with a size (`> 0`, as
        # the saturation rule), as /api/advice and `pool-monitor advise` count them.
        Recording(
            FLEET_RECOMMENDED,
            f"sum({s.ADVICE_RECOMMENDED} * {s.ADVICE_PROCESSES} and {maximum} > 0)",
        ),
        # One database assumed: every pool scraped here connects to the same PostgreSQL
        # server, whose usable connections (max_connections - reserved) every sidecar
        # watching it reports alike (hence max). Pools on several servers need one
        # Prometheus, or one rule with its own selectors, per server.
        Recording(
            FLEET_BUDGET,
            f"{FLEET_MAX} / (max(pg_max_connections) - max(pg_reserved_connections) > 0)",
        ),
    ]
    return rules


def recording_names() -> frozenset[str]:
    return frozenset(r.record for r in recording_rules())


# --------------------------------------------------------------------------- alerts

POOL_L = "{{ $labels.%s }}" % s.POOL  # noqa: UP031 - a Prometheus template, not Python's
INSTANCE_L = "{{ $labels.instance }}"
JOB_L = "{{ $labels.job }}"


@dataclass(frozen=True)
class Alert:
    alert: str
    group: str
    expr: str
    summary: str
    description: str


def _pct(value: Value) -> str:
    return value if isinstance(value, str) else f"{float(value) * 100:g}%"


def _secs(value: Value) -> str:
    return value if isinstance(value, str) else f"{format_number(value)}s"


def alert_rules(cfg: Settings) -> list[Alert]:
    """Every alert, with thresholds and durations from `cfg` written into expr and text."""
    t = cfg.thresholds
    n = cfg.number
    f = cfg.for_
    pool_group, pg_group, self_group = (
        "pool-monitor.pool",
        "pool-monitor.postgresql",
        ("pool-monitor.self"),
    )
    return [
        Alert(
            "PoolSaturated",
            pool_group,
            f"{SATURATION} > {n('pool_saturation_ratio')}",
            f"Pool {POOL_L} on {INSTANCE_L} is {{{{ $value | humanizePercentage }}}} used",
            f"Connections in use have stayed above {_pct(t['pool_saturation_ratio'])} of the "
            f"pool's maximum (pool_size + max_overflow) for {f['PoolSaturated']}. The next burst "
            "will queue for connections and then time out. Find the code sites holding "
            "connections longest (Sessions and code sites dashboard) before raising pool_size.",
        ),
        Alert(
            "PoolPendingRequestsSustained",
            pool_group,
            f"{s.m('db.client.connection.pending_requests')} > {n('pending_requests')}",
            f"{{{{ $value }}}} callers waiting for a connection from pool {POOL_L} on {INSTANCE_L}",
            f"More than {format_number(t['pending_requests'])} callers have been queueing for "
            f"a connection for {f['PoolPendingRequestsSustained']}: every connection is "
            "checked out. Each request is slowed by the wait and fails after pool_timeout. "
            "Check the wait-time panels and which code sites hold connections.",
        ),
        Alert(
            "PoolCheckoutTimeouts",
            pool_group,
            f"increase({s.m('db.client.connection.timeouts')}[5m]) > {n('checkout_timeouts')}",
            f"Pool {POOL_L} on {INSTANCE_L}: {{{{ $value | humanize }}}} checkouts timed out in 5m",
            "Callers gave up waiting for a connection after pool_timeout and got "
            "sqlalchemy.exc.TimeoutError: requests are failing. The pool is exhausted; find "
            "what holds connections (long-held, top code sites, idle-in-use share) and fix "
            "that before raising pool_size or pool_timeout.",
        ),
        Alert(
            "PoolWaitTimeP95High",
            pool_group,
            f'{quantile_name(WAIT)}{{quantile="0.95"}} > {n("wait_time_p95_seconds")}',
            f"Pool {POOL_L} ({JOB_L}): p95 wait for a connection is "
            "{{ $value | humanizeDuration }}",
            f"For {f['PoolWaitTimeP95High']} one checkout in twenty has waited longer than "
            f"{_secs(t['wait_time_p95_seconds'])} for a connection. That time is added to "
            "every request using the pool. Look at saturation and pending requests, then at "
            "hold time by code site.",
        ),
        Alert(
            "PoolLongHeldConnections",
            pool_group,
            # The gauge alone aliases: holds just past the threshold, sampled once per
            # scrape, can read 0 at every scrape. The events counter cannot miss one (the
            # watchdog counts each hold once as it crosses the threshold).
            f"{s.m('sqlalchemy.pool.long_held')} > {n('long_held_connections')} or "
            f"sum without (code_site) "
            f"(increase({s.m('sqlalchemy.pool.long_held_events')}[5m])) "
            f"> {n('long_held_connections')}",
            f"Pool {POOL_L} on {INSTANCE_L}: connections held past the long-held threshold",
            f"Connections have been checked out longer than the application's long-held "
            f"threshold, for {f['PoolLongHeldConnections']} now. The application log has a "
            "WARNING per connection with the code site that borrowed it and the holder's "
            "current stack: that shows what it is doing while holding the connection.",
        ),
        Alert(
            "PoolHoldTimeMostlyIdle",
            pool_group,
            f"{IDLE_SHARE} > {n('idle_in_use_share')} "
            f"and {HOLD_RATE} > {n('idle_in_use_min_held_connections')}",
            f"Pool {POOL_L} ({JOB_L}): {{{{ $value | humanizePercentage }}}} of hold time "
            "runs no SQL",
            f"For {f['PoolHoldTimeMostlyIdle']} more than {_pct(t['idle_in_use_share'])} of "
            "the time connections were checked out they executed no SQL: code holds a session "
            "across external calls, sleeps or CPU work. Find the sites in 'Top sites by "
            "idle-in-use seconds' and release the connection before the slow work.",
        ),
        Alert(
            "PoolCrossThreadConnectionUse",
            pool_group,
            # A site's series is born at its first use, with no zero sample before it:
            # increase() cannot see that first use, so a series younger than the window
            # with a value counts too.
            f"increase({s.m('sqlalchemy.pool.cross_thread_uses')}[10m]) "
            f"> {n('cross_thread_uses')} or ({s.m('sqlalchemy.pool.cross_thread_uses')} "
            f"> {n('cross_thread_uses')} unless "
            f"{s.m('sqlalchemy.pool.cross_thread_uses')} offset 10m)",
            f"Pool {POOL_L}: two threads took turns on one connection at "
            f"{{{{ $labels.{s.SITE} }}}}",
            "A thread used a connection again after another thread had used it in between: a "
            "Session or Connection is shared between threads that run at the same time. That "
            "corrupts transactions and causes DetachedInstanceError. Give each thread its own "
            "session (pass a sessionmaker, not a Session). Handing a session on, one thread "
            "after the other, is not reported.",
        ),
        Alert(
            "PoolCodeSiteBlockingSessions",
            pool_group,
            # Every sidecar watching the server sees the same lock waits: `max` over them,
            # per service. Roots no sidecar attributes to a hold are left out: with several
            # pods, the sidecars of the pods that do not hold a root report it (unknown).
            f"max by ({_by((*s.TARGET_LABELS, s.SITE, s.POOL))}) "
            f'({s.BLOCKED_BACKENDS}{{kind="transitive", {s.SITE}!="{s.UNKNOWN_SITE}"}}) '
            f"> {n('blocking_sessions')}",
            f"Code site {{{{ $labels.{s.SITE} }}}} (pool {POOL_L}) blocks "
            "{{ $value }} database sessions",
            "A transaction opened by a connection checked out at this code site holds locks "
            f"that more than {format_number(t['blocking_sessions'])} other sessions have been "
            "waiting for, directly or behind other waiters, for "
            f"{f['PoolCodeSiteBlockingSessions']}. "
            "Usually the code keeps the transaction open (idle in transaction) while it does "
            "something else. The sidecar's /api/blocking and the Blocking section of its live "
            "page show the holder: process, thread, trace and what it is doing now.",
        ),
        Alert(
            "PostgresIdleInTransactionTooLong",
            pg_group,
            f"pg_app_idle_in_transaction_max_seconds > {n('pg_idle_in_transaction_seconds')}",
            f"{{{{ $labels.{s.APPLICATION} }}}} has a backend idle in transaction for "
            "{{ $value | humanizeDuration }}",
            "A connection opened a transaction and then stopped sending statements for over "
            f"{_secs(t['pg_idle_in_transaction_seconds'])}. It holds its locks and a pool "
            "slot, and blocks vacuum. Usually code that holds a session across slow work; "
            "compare with long-held connections of the pool with the same application_name.",
        ),
        Alert(
            "PostgresConnectionsNearLimit",
            pg_group,
            f"{PG_USAGE} > {n('pg_connections_usage_ratio')}",
            "PostgreSQL client backends at {{ $value | humanizePercentage }} of "
            "max_connections minus reserved",
            f"Client backends have stayed above {_pct(t['pg_connections_usage_ratio'])} of "
            "the connections ordinary roles may open for "
            f"{f['PostgresConnectionsNearLimit']}. New connections will soon fail with "
            "'remaining connection slots are reserved'. Sum of every pool's max across all "
            "replicas must stay below the server's limit: see backends by application.",
        ),
        Alert(
            "PostgresCollectorDown",
            pg_group,
            "pg_up == 0 or absent(pg_up)",
            "pool-monitor's PostgreSQL collector is down or not scraped",
            "The sidecar cannot query PostgreSQL (pg_up is 0), or no pg_up series is scraped "
            f"at all, for {f['PostgresCollectorDown']}. The PostgreSQL dashboard and alerts "
            "are blind meanwhile. Check the sidecar's log, its database URL and the pg_monitor "
            "role.",
        ),
        Alert(
            "PoolMonitorErrors",
            self_group,
            f"increase({s.m('pool_monitor.errors')}[10m]) > {n('monitor_errors')}",
            f"pool-monitor swallowed {{{{ $value | humanize }}}} errors in pool {POOL_L} on "
            f"{INSTANCE_L}",
            "An exception was raised inside pool-monitor's hooks and swallowed so the "
            "application kept working, but the pool's numbers may now be wrong. The "
            "application log has the traceback (logged once); please report it.",
        ),
        Alert(
            "PoolMonitorSidecarScanStale",
            self_group,
            f"{s.SIDECAR_SCAN_AGE} > {n('sidecar_scan_age_seconds')}",
            f"pool-monitor sidecar on {INSTANCE_L} has not scanned its snapshots for "
            "{{ $value | humanizeDuration }}",
            "The sidecar's scan of the snapshot directory keeps failing or hangs (a file it "
            "cannot read, a stuck volume): every pool's numbers and live holds on this pod "
            "are frozen at the last good scan, and /readyz fails. The sidecar's log says why "
            "(once per streak); pool_monitor_sidecar_scan_errors_total counts the failures.",
        ),
    ]


# --------------------------------------------------------------------------- rendering

HEADER = (
    "# Generated by `python -m dashboards` from dashboards/ruleset.py and\n"
    "# dashboards/thresholds.py. Do not edit: change those and regenerate.\n"
)


def rule_groups(
    cfg: Settings, runbook_base_url: str = RUNBOOK_BASE_URL
) -> dict[str, dict[str, Any]]:
    """Rule files as data: {file name: {"groups": [...]}}."""
    alerts_by_group: dict[str, list[dict[str, Any]]] = {}
    for a in alert_rules(cfg):
        if a.alert in cfg.disabled:
            continue
        alerts_by_group.setdefault(a.group, []).append(
            {
                "alert": a.alert,
                "expr": a.expr,
                "for": cfg.for_[a.alert],
                "labels": {"severity": cfg.severity[a.alert]},
                "annotations": {
                    "summary": a.summary,
                    "description": a.description,
                    "runbook_url": f"{runbook_base_url}#{a.alert.lower()}",
                },
            }
        )
    return {
        "recording.yml": {
            "groups": [
                {
                    "name": "pool-monitor.recording",
                    "rules": [r.to_dict() for r in recording_rules()],
                }
            ]
        },
        "alerts.yml": {
            "groups": [{"name": name, "rules": rules} for name, rules in alerts_by_group.items()]
        },
    }


class _Dumper(yaml.SafeDumper):
    """Indents lists under their key, the way Prometheus' own examples are written."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def to_yaml(data: Mapping[str, Any]) -> str:
    return yaml.dump(
        dict(data), Dumper=_Dumper, sort_keys=False, width=1_000_000, allow_unicode=True
    )


def render_rules(
    thresholds: Mapping[str, Value] | None = None,
    for_: Mapping[str, str] | None = None,
    severity: Mapping[str, str] | None = None,
    disabled: Iterable[str] = (),
    runbook_base_url: str = RUNBOOK_BASE_URL,
) -> dict[str, str]:
    """Rule files as YAML text, {file name: text}. No arguments: the committed files.

    `thresholds` maps names from `dashboards.thresholds.THRESHOLDS` to numbers; `for_` and
    `severity` map alert names to a duration / severity; `disabled` drops alerts (e.g.
    `PostgresCollectorDown` where no sidecar collector runs). Unknown names raise
    `OverrideError`. Values starting with ``{{`` pass through for Helm templating.
    """
    cfg = resolve(thresholds, for_, severity, disabled)
    return {name: HEADER + to_yaml(doc) for name, doc in rule_groups(cfg, runbook_base_url).items()}
