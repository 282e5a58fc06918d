"""Alert thresholds, `for` durations and severities: the one place their defaults live.

Why a module of its own: the committed rule files, the README's thresholds table, the
promtool tests and (later) the Helm chart's values all need the same numbers. Keeping them
here, and generating the rule files from them, means a changed default shows up everywhere
or the drift tests fail.

Overrides are plain mappings (threshold name -> number, alert name -> duration) so a Helm
values file or a command line can feed them without knowing these classes. A string value
that starts with ``{{`` is passed through untouched, so a Helm chart can render the rules
with its own template expressions in place of the numbers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

Severity = Literal["info", "warning", "critical"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "critical")

#: Prometheus duration syntax (model.ParseDuration), e.g. ``90s``, ``1h30m``.
_DURATION = re.compile(r"^(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?$")


@dataclass(frozen=True)
class Threshold:
    """A number an alert compares against. `name` is the key used in overrides."""

    name: str
    default: float
    unit: str
    meaning: str


@dataclass(frozen=True)
class AlertDefaults:
    """How long a condition must hold before the alert fires, and how loud it is."""

    alert: str
    for_: str
    severity: Severity
    thresholds: tuple[str, ...]


THRESHOLDS: tuple[Threshold, ...] = (
    Threshold(
        "pool_saturation_ratio", 0.9, "ratio", "used / max connections of one pool in one process"
    ),
    Threshold(
        "pending_requests", 0, "callers", "callers waiting for a connection (alert when above)"
    ),
    Threshold(
        "checkout_timeouts",
        0,
        "timeouts per 5m",
        "checkouts that hit pool_timeout in the last 5 minutes",
    ),
    Threshold(
        "wait_time_p95_seconds",
        0.1,
        "seconds",
        "95th percentile of the wait for a connection, over 5 minutes",
    ),
    Threshold(
        "long_held_connections",
        0,
        "connections",
        "live checkouts older than the application's long-held threshold",
    ),
    Threshold(
        "idle_in_use_share",
        0.8,
        "ratio",
        "share of hold time spent not executing SQL, over 5 minutes",
    ),
    Threshold(
        "idle_in_use_min_held_connections",
        0.5,
        "connections",
        "average connections held; below this the idle share is not alerted on",
    ),
    Threshold(
        "cross_thread_uses",
        0,
        "uses per 10m",
        "uses of a connection by a thread coming back to it after another thread",
    ),
    Threshold(
        "blocking_sessions",
        2,
        "sessions",
        "database sessions one code site's transactions block, directly or behind other "
        "waiters (alert when above)",
    ),
    Threshold(
        "pg_idle_in_transaction_seconds",
        30,
        "seconds",
        "age of the oldest idle-in-transaction backend of one application",
    ),
    Threshold(
        "pg_connections_usage_ratio",
        0.8,
        "ratio",
        "client backends / (max_connections - reserved connections)",
    ),
    Threshold(
        "monitor_errors", 0, "errors per 10m", "exceptions swallowed inside pool-monitor's hooks"
    ),
    Threshold(
        "sidecar_scan_age_seconds",
        30,
        "seconds",
        "time since the sidecar last scanned the snapshot directory successfully",
    ),
)

ALERTS: tuple[AlertDefaults, ...] = (
    AlertDefaults("PoolSaturated", "5m", "warning", ("pool_saturation_ratio",)),
    AlertDefaults("PoolPendingRequestsSustained", "2m", "warning", ("pending_requests",)),
    AlertDefaults("PoolCheckoutTimeouts", "1m", "critical", ("checkout_timeouts",)),
    AlertDefaults("PoolWaitTimeP95High", "5m", "warning", ("wait_time_p95_seconds",)),
    AlertDefaults("PoolLongHeldConnections", "2m", "warning", ("long_held_connections",)),
    AlertDefaults(
        "PoolHoldTimeMostlyIdle",
        "15m",
        "info",
        ("idle_in_use_share", "idle_in_use_min_held_connections"),
    ),
    AlertDefaults("PoolCrossThreadConnectionUse", "1m", "warning", ("cross_thread_uses",)),
    AlertDefaults("PoolCodeSiteBlockingSessions", "1m", "warning", ("blocking_sessions",)),
    AlertDefaults(
        "PostgresIdleInTransactionTooLong", "1m", "warning", ("pg_idle_in_transaction_seconds",)
    ),
    AlertDefaults("PostgresConnectionsNearLimit", "2m", "warning", ("pg_connections_usage_ratio",)),
    AlertDefaults("PostgresCollectorDown", "2m", "warning", ()),
    AlertDefaults("PoolMonitorErrors", "1m", "warning", ("monitor_errors",)),
    AlertDefaults("PoolMonitorSidecarScanStale", "1m", "warning", ("sidecar_scan_age_seconds",)),
)

THRESHOLD_BY_NAME: dict[str, Threshold] = {t.name: t for t in THRESHOLDS}
ALERT_BY_NAME: dict[str, AlertDefaults] = {a.alert: a for a in ALERTS}

Value = float | int | str


class OverrideError(ValueError):
    """An override names an unknown threshold or alert, or has an unusable value."""


def is_template(value: object) -> bool:
    """True for a Helm/Go template expression, which is passed through unvalidated."""
    return isinstance(value, str) and value.lstrip().startswith("{{")


@dataclass(frozen=True)
class Settings:
    """Effective thresholds, durations and severities after overrides."""

    thresholds: Mapping[str, Value]
    for_: Mapping[str, str]
    severity: Mapping[str, str]
    disabled: frozenset[str]

    def number(self, name: str) -> str:
        """The threshold as PromQL text: ``0.9``, ``30``, or a template expression."""
        return format_number(self.thresholds[name])


def format_number(value: Value) -> str:
    """Shortest PromQL literal for a number (``30`` not ``30.0``); templates unchanged."""
    if isinstance(value, str):
        return value
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def resolve(
    thresholds: Mapping[str, Value] | None = None,
    for_: Mapping[str, str] | None = None,
    severity: Mapping[str, str] | None = None,
    disabled: Iterable[str] = (),
) -> Settings:
    """Merge overrides onto the defaults, rejecting unknown names and bad values."""
    thresholds = dict(thresholds or {})
    for_ = dict(for_ or {})
    severity = dict(severity or {})
    disabled = frozenset(disabled)
    _unknown("threshold", thresholds, THRESHOLD_BY_NAME)
    _unknown("alert (for)", for_, ALERT_BY_NAME)
    _unknown("alert (severity)", severity, ALERT_BY_NAME)
    _unknown("alert (disabled)", disabled, ALERT_BY_NAME)
    for name, value in thresholds.items():
        if is_template(value):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OverrideError(f"threshold {name!r} must be a number, got {value!r}")
        if value < 0:
            raise OverrideError(f"threshold {name!r} must be >= 0, got {value!r}")
        if THRESHOLD_BY_NAME[name].unit == "ratio" and value > 1:
            raise OverrideError(f"threshold {name!r} is a ratio in [0, 1], got {value!r}")
    for name, value in for_.items():
        if not is_template(value) and not (
            isinstance(value, str) and _DURATION.match(value) and value
        ):
            raise OverrideError(
                f"'for' of alert {name!r} must be a Prometheus duration like '5m', got {value!r}"
            )
    for name, value in severity.items():
        if not is_template(value) and value not in SEVERITIES:
            raise OverrideError(
                f"severity of alert {name!r} must be one of {', '.join(SEVERITIES)}, got {value!r}"
            )
    return Settings(
        thresholds={t.name: thresholds.get(t.name, t.default) for t in THRESHOLDS},
        for_={a.alert: for_.get(a.alert, a.for_) for a in ALERTS},
        severity={a.alert: severity.get(a.alert, a.severity) for a in ALERTS},
        disabled=disabled,
    )


def _unknown(kind: str, given: Iterable[str], known: Mapping[str, object]) -> None:
    bad = sorted(set(given) - set(known))
    if bad:
        raise OverrideError(f"unknown {kind} name(s) {', '.join(bad)}; known: {', '.join(known)}")


def defaults_table() -> str:
    """The README's thresholds table (Markdown), generated so it cannot drift."""
    users: dict[str, list[str]] = {}
    for a in ALERTS:
        for t in a.thresholds:
            users.setdefault(t, []).append(a.alert)
    lines = [
        "| threshold | default | unit | used by | meaning |",
        "|---|---|---|---|---|",
    ]
    for t in THRESHOLDS:
        alerts = ", ".join(f"[{a}](#{a.lower()})" for a in users.get(t.name, []))
        lines.append(
            f"| `{t.name}` | {format_number(t.default)} | {t.unit} | {alerts} | {t.meaning} |"
        )
    lines += [
        "",
        "| alert | `for` | severity |",
        "|---|---|---|",
    ]
    lines += [f"| [{a.alert}](#{a.alert.lower()}) | {a.for_} | {a.severity} |" for a in ALERTS]
    return "\n".join(lines) + "\n"
