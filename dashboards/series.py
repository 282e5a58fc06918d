"""The series a dashboard or rule may query, and the label names they carry.

Why: the metric names are a contract (docs/metrics.md). Panels look names up here instead of
typing them, so a typo fails at generation time, and the tests check every expression
against `allowed_metric_names()` so nothing outside the contract sneaks in.
"""

from __future__ import annotations

from collections.abc import Iterable

from monitor.catalogue import BY_NAME, CODE_SITE, KIND, LOCK_NAME, METRICS, POOL_NAME, STATE
from monitor.catalogue import prometheus_label as _label

#: Prometheus label names of the catalogue's attributes.
POOL = _label(POOL_NAME)  # db_client_connection_pool_name
STATE_LABEL = _label(STATE)  # db_client_connection_state
SITE = _label(CODE_SITE)  # code_site
KIND_LABEL = _label(KIND)  # kind
LOCK = _label(LOCK_NAME)  # lock_name

#: Labels a Kubernetes scrape (ServiceMonitor/PodMonitor) adds; dashboards filter on them.
#: Series without them (a plain static scrape) still match, because every filter is a
#: regex that the "All" value (`.*`) turns into match-anything, including the empty value.
TARGET_LABELS: tuple[str, ...] = ("namespace", "job", "service")

#: Series served by the sidecar's PostgreSQL collector (docs/metrics.md, "Sidecar").
PG_SERIES: tuple[str, ...] = (
    "pg_app_backends",
    "pg_app_idle_in_transaction_max_seconds",
    "pg_app_transaction_max_seconds",
    "pg_app_blocked_backends",
    "pg_app_lock_wait_max_seconds",
    "pg_max_connections",
    "pg_reserved_connections",
    "pg_up",
)
APPLICATION = "application_name"
PG_STATE = "state"

#: The sidecar's own failure counter (reading worker snapshots).
SNAPSHOT_ERRORS = "pool_monitor_snapshot_errors_total"
#: The sidecar's own health, read by the alert on a stuck or failing scan.
SIDECAR_SCAN_AGE = "pool_monitor_sidecar_last_scan_age_seconds"

#: The sidecar's lock-wait graph (`/api/blocking`), by the root blocker's code site and pool.
BLOCKED_BACKENDS = "pool_monitor_blocking_blocked_backends"
BLOCKING_CHAIN = "pool_monitor_blocking_longest_chain"
BLOCKING_LOCK_WAIT = "pool_monitor_blocking_root_lock_wait_max_seconds"
BLOCKING_SERIES: tuple[str, ...] = (BLOCKED_BACKENDS, BLOCKING_CHAIN, BLOCKING_LOCK_WAIT)
#: `code_site` of roots no instrumented hold is attributed to (`monitor.sidecar.blocking`).
UNKNOWN_SITE = "(unknown)"

#: The sidecar's sizing advice (`/api/advice`, `monitor.sidecar.advice`): per pool and per
#: process, over the sidecar's advice window; exported once the window has two scans.
ADVICE_PROCESSES = "pool_monitor_advice_processes"
ADVICE_ARRIVAL_RATE = "pool_monitor_advice_arrival_rate"
ADVICE_MEAN_HOLD = "pool_monitor_advice_mean_hold_seconds"
ADVICE_OFFERED_LOAD = "pool_monitor_advice_offered_load"
ADVICE_PREDICTED_P_WAIT = "pool_monitor_advice_predicted_wait_probability"
ADVICE_PREDICTED_WAIT = "pool_monitor_advice_predicted_mean_wait_seconds"
ADVICE_MEASURED_P_WAIT = "pool_monitor_advice_measured_wait_probability"
ADVICE_MEASURED_WAIT = "pool_monitor_advice_measured_mean_wait_seconds"
ADVICE_RECOMMENDED = "pool_monitor_advice_recommended_max_connections"
ADVICE_WARNINGS = "pool_monitor_advice_model_warnings"
ADVICE_SERIES: tuple[str, ...] = (
    ADVICE_PROCESSES,
    ADVICE_ARRIVAL_RATE,
    ADVICE_MEAN_HOLD,
    ADVICE_OFFERED_LOAD,
    ADVICE_PREDICTED_P_WAIT,
    ADVICE_PREDICTED_WAIT,
    ADVICE_MEASURED_P_WAIT,
    ADVICE_MEASURED_WAIT,
    ADVICE_RECOMMENDED,
    ADVICE_WARNINGS,
)

_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def m(otel_name: str) -> str:
    """Prometheus name of a catalogue metric, by its OpenTelemetry name."""
    return BY_NAME[otel_name].prometheus_name


def bucket(otel_name: str) -> str:
    """The `_bucket` series of a catalogue histogram."""
    metric = BY_NAME[otel_name]
    if metric.kind != "histogram":
        raise ValueError(f"{otel_name} is a {metric.kind}, not a histogram")
    return metric.prometheus_name + "_bucket"


def catalogue_series() -> frozenset[str]:
    """Every series name the exporters produce for the catalogue (histograms expanded)."""
    names: set[str] = set()
    for metric in METRICS:
        if metric.kind == "histogram":
            names.update(metric.prometheus_name + s for s in _HISTOGRAM_SUFFIXES)
        else:
            names.add(metric.prometheus_name)
    return frozenset(names)


def allowed_metric_names(recording_rules: Iterable[str] = ()) -> frozenset[str]:
    """Catalogue series + sidecar PostgreSQL, blocking and advice series + snapshot errors
    + our recordings."""
    return (
        catalogue_series()
        | set(PG_SERIES)
        | {SNAPSHOT_ERRORS, SIDECAR_SCAN_AGE}
        | set(BLOCKING_SERIES)
        | set(ADVICE_SERIES)
        | set(recording_rules)
    )
