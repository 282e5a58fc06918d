"""End to end (issue 6, part 4): a real Prometheus scrapes the real demo, with our rules.

The stack is the demo as `pool-monitor demo` runs it (`demo_app.stack.DemoStack`): the fake
external API, the demo service with two uvicorn workers, and the `pool-monitor sidecar`
with the PostgreSQL DSN, on the session's PostgreSQL, everything on 127.0.0.1. Debian's
`prometheus` (`dashboards.promharness`) scrapes it every second with the generated rules;
the runner's own drivers (`demo_app.runner.drive_all`) play every scenario, anti-pattern
and fix, time-scaled (0.5 s external latency). Then:

(a) every expression of every generated dashboard, and every variable query, returns data
    through the HTTP API: at least one finite value (an all-NaN answer is an empty panel in
    Grafana), once with every variable on "All" (`.*`) and once with the target labels,
    pool, application and lock selected (`.*` also matches a *missing* label, so only the
    second pass proves the recording rules keep the labels the filters use). A trailing
    `or vector(0)` fallback is stripped first: otherwise the panel "has data" even when the
    demo never produced the series;
(b) the alerts the anti-patterns should raise reach `firing` (1 s `for` overrides), for the
    pools and applications that misbehave; the anti-vs-fix dashboard shows the difference;
(c) alerts that must stay quiet never even become pending (monitor errors, the collector
    down), and no alert fires for a subject outside what the scenarios explain.

What is scraped, and why only the sidecar: the demo service's own `/metrics` answers for
*one* worker per scrape (whichever uvicorn worker accepts the connection), so its counters
would jump between the two workers' values (Prometheus reads every jump down as a counter
reset, and rates come out wrong), and scraping it next to the sidecar would count every
worker twice in every `sum`. The sidecar serves the workers' pools merged plus the `pg_*`
series; the Helm chart's PodMonitor scrapes only the sidecar for the same reason. The
target gets `namespace` and `service` labels, as that PodMonitor's scrape gives them.

Alerts are watched *while* the scenarios run: the gauge-based ones (saturation, pending
requests, long-held, idle in transaction) are only true under load.

Bounded: about 55 s on two cores (scenarios ~40 s), plus PostgreSQL's start when this
module runs alone; every wait has a timeout; processes are stopped by pid by `DemoStack`
and `running_prometheus`. Missing `prometheus`: skipped (before PostgreSQL starts), or a
failure when `CI` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from rich.console import Console

from dashboards import build_dashboards
from dashboards.inventory import (
    Expression,
    dashboard_expressions,
    rule_expressions,
    variable_queries,
)
from dashboards.promharness import (
    Prometheus,
    PrometheusError,
    ScrapeTarget,
    require_binary,
    running_prometheus,
)
from dashboards.promql import substitute
from dashboards.ruleset import render_rules
from dashboards.thresholds import ALERTS
from demo_app.plan import Plan
from demo_app.runner import drive_all
from demo_app.scenarios import SCENARIOS
from demo_app.schema import create_schema
from demo_app.stack import DemoStack

#: The fake external API's latency; every pool timeout and the long-held threshold scale
#: with it (api/shared pools time out after 0.25 s, long-held from 0.25 s).
LATENCY_S = 0.5

#: The runner's load, cut to fit the test's time budget. Each load window spans several
#: snapshot + scan + scrape periods (1 s each), so Prometheus sees counters *grow*: a
#: series that first appears at its final value has no rate. The external-call users are
#: still 5x the api pool's 6 connections (both workers), so `anti` exhausts it.
PLAN = Plan(
    name="prometheus-integration",
    external_users=30,
    external_duration_s=6.0,
    isolation_api_users=10,
    isolation_api_think_s=0.05,
    isolation_duration_s=5.0,
    duplicate_tasks=8,
    duplicate_every=4,
    duplicate_requests=80,
    duplicate_users=5,
    payment_keys=16,
    payment_retries=3,
    shared_session_runs=8,  # enough turns taken to span several scrapes
    store_writes=400,
)

#: The runner's scenarios in its order, then `idempotent_payment` and `shared_session` once
#: more. `idempotent_payment`'s variants last about a second (all keys' attempts run at
#: once), and `shared_session/shared` as little when SQLAlchemy aborts its runs early (a CI
#: run saw every cross-thread use land between two scrapes), so their code-site series can
#: be born between two scrapes at their final values, and a rate over a series Prometheus
#: first saw at its final value is 0 (the dashboard's "share without SQL" is then 0/0). A
#: code site cannot exist before its first checkout; in the replay Prometheus already knows
#: the sites, as it would for any service that has been running for a while.
SCENARIO_ORDER = [*SCENARIOS, "idempotent_payment", "shared_session"]

#: Target labels, as the Helm chart's PodMonitor scrape gives them.
JOB, NAMESPACE, SERVICE = "pool-monitor", "pool-monitor-it", "pool-monitor-demo"
POOLS = ("api", "background", "shared", "worker")
APPS = tuple(f"demo-{pool}" for pool in POOLS)  # each engine's application_name
LOCK = "session-store"

#: Every alert's `for` cut to 1 s, except the collector-down one: `absent(pg_up)` is true
#: before the first scrape, and that race must not fire it.
FOR = {a.alert: "1s" for a in ALERTS} | {"PostgresCollectorDown": "5s"}
# Saturation is used/max merged over both workers, and pool_isolation/shared saturates the
# shared pool for only a few seconds: two consecutive 1 s evaluations at >= 0.9 are not
# guaranteed (seen once in a fresh-clone CI run: pending, never firing). One evaluation
# proves the alert fires from real data; what `for` does is promtool's test to show.
FOR["PoolSaturated"] = FOR["PoolPendingRequestsSustained"] = "0s"  # the same, for queueing
THRESHOLDS: dict[str, float] = {
    # A 0.5 s call never reaches the production 30 s. 0.1 s, a fifth of the call the
    # anti-patterns keep a transaction open across, is still far above the milliseconds a
    # statement takes, so only a transaction left open across slow work crosses it.
    "pg_idle_in_transaction_seconds": 0.1,
    # The demo's pools can open at most 40 backends, of the embedded server's 97 usable
    # (max_connections 100 - 3 reserved): at the default 0.8 this alert cannot fire here.
    # 0.05 (more than ~5 backends) proves the join of the real pg_* series instead.
    "pg_connections_usage_ratio": 0.05,
    # The hold-mostly-idle guard is an *average over the rule's fixed 5m window*: 0.5
    # connections means 150 connection-seconds held in 5 minutes. The anti-pattern's load
    # lasts ~7 s here (~40 connection-seconds, 0.13 on average), so the production guard
    # scales to ~0.01; 0.05 still keeps the worker pool's light use (~0.005) below it.
    "idle_in_use_min_held_connections": 0.05,
}
#: Everything else keeps its production default: the time-scaled demo crosses them itself.

#: (alert, subject) that must reach `firing`. The subject is the pool, else the
#: application_name; cross-thread alerts also carry the code site (checked separately).
EXPECTED_FIRING = {
    # external_call/anti: 30 users on 6 connections, each held across a 0.5 s call.
    ("PoolSaturated", "api"),
    ("PoolPendingRequestsSustained", "api"),
    ("PoolCheckoutTimeouts", "api"),
    ("PoolWaitTimeP95High", "api"),
    ("PoolHoldTimeMostlyIdle", "api"),
    # pool_isolation/shared: render jobs hold the shared pool across their render, and
    # the API's reads queue behind them.
    ("PoolSaturated", "shared"),
    ("PoolPendingRequestsSustained", "shared"),
    ("PoolCheckoutTimeouts", "shared"),
    ("PoolWaitTimeP95High", "shared"),
    ("PoolLongHeldConnections", "shared"),
    ("PostgresIdleInTransactionTooLong", "demo-shared"),
    # shared_session/shared: the heartbeat thread runs statements on the worker's Session.
    ("PoolCrossThreadConnectionUse", "worker"),
    # The threshold override above.
    ("PostgresConnectionsNearLimit", ""),
}
#: (alert, subject) that may also fire, with why; anything else firing fails the test.
ALLOWED_FIRING = {
    # Sampled gauges under external_call/anti. Its holds run in lock-step: the 6 requests
    # that got a connection hold it for exactly latency + a few ms, and a waiting caller
    # takes each one back at once, so every hold has nearly the same age. Sampled every 1 s
    # (snapshots) or 5 s (the sidecar's PostgreSQL poll), that age drifts by ~15 ms per
    # second: for a whole 7 s window it can stay under the 0.25 s long-held threshold (the
    # gauge reads 0 although every request holds 0.5 s), or under 0.1 s idle in
    # transaction. Measured in this test: oldest checkout age 0.13-0.23 s at every
    # snapshot of one run, 0.26-0.36 s in another. Not required, so the test is not
    # flaky; the long-held *events* counter, which counts every hold that crosses the
    # threshold, is checked in test_demo_dashboard_shows_anti_pattern_vs_fix instead.
    ("PoolLongHeldConnections", "api"): "external_call/anti (sampling phase permitting)",
    ("PostgresIdleInTransactionTooLong", "demo-api"): "external_call/anti (idem)",
    # pool_isolation/split: the same jobs now fill the background pool, by design (it is
    # sized for them and waits patiently; the point is that the API's pool stays free).
    ("PoolSaturated", "background"): "split's jobs use the whole background pool",
    ("PoolPendingRequestsSustained", "background"): "split's jobs queue for their own pool",
    ("PoolWaitTimeP95High", "background"): "split's jobs wait for their own pool",
    ("PoolLongHeldConnections", "background"): "split's jobs hold across the render",
    ("PoolHoldTimeMostlyIdle", "background"): "split's jobs hold across the render",
    ("PostgresIdleInTransactionTooLong", "demo-background"): "split's jobs, idem",
    ("PoolHoldTimeMostlyIdle", "shared"): "shared's jobs hold across the render",
    # shared_session holds a run's session for steps x step_s = 0.5 s, over the 0.25 s
    # long-held threshold, with its transaction open; a checkout that opens a new
    # connection counts as pending while it connects.
    ("PoolLongHeldConnections", "worker"): "shared_session runs hold 0.5 s",
    ("PostgresIdleInTransactionTooLong", "demo-worker"): "shared_session's open transactions",
    ("PoolPendingRequestsSustained", "worker"): "checkouts opening new connections",
}
#: Alerts that must never become even pending: nothing in the demo may trip them.
QUIET = ("PoolMonitorErrors", "PostgresCollectorDown", "PoolMonitorSidecarScanStale")
#: Cross-thread use may only be reported at the shared-session anti-pattern's own sites.
CROSS_THREAD_SITE = re.compile(r"^demo_app/scenarios/shared_session\.py:\d+:shared_")

#: Dashboard expressions allowed to return no finite value, with the reason. Only for what
#: a short run genuinely cannot produce, never for a bug (see the module docstring).
KNOWN_GAPS: dict[str, str] = {
    # Lock waits exist only while a lock is held: the demo's row locks (lost_update's
    # FOR UPDATE, idempotent_payment's ON CONFLICT claims) last milliseconds, and these
    # instant queries run after the scenarios, when nothing blocks (the series are absent,
    # not 0). tests/test_sidecar_blocking.py proves them on a real pile-up.
    'pool-overview.json: "Sessions blocked, by root blocker\'s code site" (A)': "nothing blocks",
    'pool-overview.json: "Longest lock wait, by root blocker\'s code site" (A)': "idem",
}
#: Alerts that may fire for any of the demo's pools, with why (neither required nor quiet).
ALLOWED_ANY_POOL = {
    # A poll (every 5 s, cached until the next) can catch the concurrent claims of
    # idempotent_payment (3 attempts per key on ON CONFLICT) or lost_update's FOR UPDATE
    # queueing behind their holders: more than 2 sessions behind one site, for a moment.
    "PoolCodeSiteBlockingSessions": "row-lock queues of the concurrent scenarios",
}

OR_VECTOR_0 = re.compile(r"\s+or\s+vector\(0\)\s*$")


def subject(labels: dict[str, str]) -> str:
    """Who an alert is about: its pool, its application, or "" (the whole server)."""
    if "application_name" in labels:
        return labels["application_name"] or "(no application_name)"
    return labels.get("db_client_connection_pool_name", "")


@dataclass
class Seen:
    """What the alert watcher saw of one alert instance."""

    labels: dict[str, str]
    annotations: dict[str, str]
    states: dict[str, float] = field(default_factory=dict)  # state -> first seen (unix time)


class AlertWatcher:
    """Polls `/api/v1/alerts` in a thread and remembers every state each alert reached."""

    def __init__(self, prom: Prometheus, interval: float = 0.25) -> None:
        self.prom = prom
        self.interval = interval
        self.seen: dict[tuple[str, str, str], Seen] = {}
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alert-watcher", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                alerts = self.prom.alerts()
            except (PrometheusError, OSError) as exc:
                self.errors.append(repr(exc))
                continue
            now = time.time()
            with self._lock:
                for alert in alerts:
                    labels = alert["labels"]
                    key = (labels["alertname"], subject(labels), labels.get("code_site", ""))
                    seen = self.seen.setdefault(key, Seen(labels, alert["annotations"]))
                    seen.states.setdefault(alert["state"], now)

    def snapshot(self) -> dict[tuple[str, str, str], Seen]:
        with self._lock:
            return dict(self.seen)

    def fired(self) -> set[tuple[str, str]]:
        return {(a, s) for (a, s, _), seen in self.snapshot().items() if "firing" in seen.states}

    def __enter__(self) -> AlertWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@dataclass
class Run:
    prom: Prometheus
    watcher: AlertWatcher
    spans: list[tuple[str, float, float]]  # scenario/variant, start, end (unix time)

    def during(self, at: float) -> str:
        """The scenario/variant that was running at `at`, or had just ended (for messages:
        what Prometheus sees lags up to ~3 s, one snapshot + scan + scrape period)."""
        label = "before the scenarios"
        for name, start, end in self.spans:
            if start <= at:
                label = name if at <= end else f"{name} (+{at - end:.1f} s)"
        return label


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    """Session-scoped so that a missing binary skips before PostgreSQL starts."""
    return require_binary("prometheus")


@pytest.fixture(scope="module")
def run(
    prometheus_binary: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Run]:
    started = time.monotonic()
    timings: dict[str, float] = {}
    log_dir = tmp_path_factory.mktemp("demo-logs")
    create_schema(database_url, reset=True)
    with DemoStack(
        database_url, latency_s=LATENCY_S, log_dir=log_dir, workers=2, base_port=None
    ) as stack:
        timings["stack_up_s"] = time.monotonic() - started
        assert stack.sidecar_url, f"the sidecar is part of this test: {stack.sidecar_note}"
        target = ScrapeTarget(
            JOB,
            stack.sidecar_url.removeprefix("http://"),
            {"namespace": NAMESPACE, "service": SERVICE},
        )
        with running_prometheus(
            [target], thresholds=THRESHOLDS, for_=FOR, binary=prometheus_binary
        ) as prom:
            prom.wait_for_targets_up(timeout=20)
            # Every pool's series (at 0) and the PostgreSQL collector's must be stored
            # before the load starts: a counter first seen at its final value has no rate.
            prom.wait_for(
                lambda: len(prom.query("db_client_connection_max")) == len(POOLS),
                "every pool's series",
                timeout=20,
            )
            prom.wait_for_data("pg_up == 1", timeout=20)
            time.sleep(2)  # two more scrapes of the idle stack: the baseline
            timings["prometheus_up_s"] = time.monotonic() - started
            with AlertWatcher(prom) as watcher:
                log = io.StringIO()
                console = Console(file=log, width=120, force_terminal=False)
                results, sampler = asyncio.run(
                    asyncio.wait_for(drive_all(stack, PLAN, SCENARIO_ORDER, console), 120)
                )
                timings["scenarios_s"] = time.monotonic() - started - timings["prometheus_up_s"]
                spans = [(s.label, s.start, s.end or s.start) for s in sampler.spans]
                failed = {k: v["error"] for k, v in results.items() if "error" in v}
                assert not failed, f"scenarios failed: {failed}\n{log.getvalue()}"
                assert stack.alive(), "a demo process exited during the scenarios"
                yield Run(prom, watcher, spans)
    timings["total_s"] = time.monotonic() - started
    print(f"\ntimings: { {k: round(v, 1) for k, v in timings.items()} }")


# -- sanity: the scrape and the rules --------------------------------------------------
def test_sidecar_is_scraped_and_every_rule_evaluates_without_error(run: Run) -> None:
    [target] = run.prom.targets()
    assert target["health"] == "up", target
    assert target["labels"] == {
        "instance": target["labels"]["instance"],
        "job": JOB,
        "namespace": NAMESPACE,
        "service": SERVICE,
    }
    rules = [r for g in run.prom.rule_groups() for r in g["rules"]]
    assert len(rules) == len(rule_expressions(render_rules(THRESHOLDS, FOR)))
    # Real label sets (target labels, every pool, site and application) can make a join
    # many-to-many where synthetic series did not: each rule must evaluate cleanly.
    assert {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"} == {}


# -- (a) every dashboard expression returns data ---------------------------------------
def _expressions() -> list[Expression]:
    models = build_dashboards()
    return dashboard_expressions(models) + variable_queries(models)


ALL: dict[str, str] = {}  # every variable "All": substitute() turns unknown variables into `.*`
SELECTED = {
    "namespace": NAMESPACE,
    "job": JOB,
    "service": SERVICE,
    "pool": "api",
    "application": "demo-api",
    "lock": LOCK,
}


def _finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


@pytest.mark.parametrize("variables", [ALL, SELECTED], ids=["all", "selected"])
def test_every_dashboard_expression_returns_data(run: Run, variables: dict[str, str]) -> None:
    """Each panel query and variable, `or vector(0)` stripped, returns a finite value."""
    expressions = _expressions()
    assert len(expressions) > 90
    queries = {}
    for e in expressions:
        expr = OR_VECTOR_0.sub("", substitute(e.expr, variables))
        queries[f"{e.source} :: {expr}"] = expr
    pending = dict(queries)
    empty: dict[str, str] = {}
    errors: dict[str, str] = {}

    # As Grafana shows a panel over the run, not only at its last instant: a panel of one
    # scenario's code sites (a 1m rate) has data just after that scenario, and may not by
    # the end of a slow run. So a query empty now is also read after each scenario.
    moments = sorted({min(end + 4, time.time()) for _, _, end in run.spans})

    def finite_somewhen(expr: str) -> bool:
        return _finite(run.prom.query(expr)) or any(
            _finite(run.prom.query(expr, at=at)) for at in moments
        )

    def probe() -> bool:
        for key, expr in list(pending.items()):
            try:
                found = finite_somewhen(expr)
            except PrometheusError as exc:
                errors[key] = str(exc)
                del pending[key]
                continue
            if found:
                del pending[key]
            else:
                result = run.prom.query(expr)
                empty[key] = "no series" if not result else "only NaN/Inf"
        return not pending

    # Normally a single pass: the data is there once the scenarios are done.
    with contextlib.suppress(TimeoutError):  # the asserts below say what is missing
        run.prom.wait_for(probe, "every dashboard query to return data", timeout=10, interval=1)
    assert errors == {}
    missing = {k: empty.get(k, "?") for k in pending}
    unexpected = {k: why for k, why in missing.items() if k.split(" :: ")[0] not in KNOWN_GAPS}
    assert unexpected == {}, "dashboard queries without data from the real demo:\n" + "\n".join(
        f"  {why}: {key}" for key, why in unexpected.items()
    )


def _options(run: Run, query: str, label: str) -> set[str]:
    return {r["metric"].get(label, "") for r in run.prom.query(query)}


def test_dashboard_variables_offer_the_demo_s_pools_applications_and_locks(run: Run) -> None:
    found: dict[str, set[str]] = {}
    for e in variable_queries(build_dashboards()):
        label = e.expr.split("(", 2)[1].split(")")[0].strip()
        found.setdefault(e.source.split("$")[1], set()).update(
            _options(run, substitute(e.expr), label)
        )
    # PostgreSQL may serve other clients too (a shared DATABASE_URL, other tests' pools).
    applications = found.pop("application")
    assert applications >= set(APPS)
    assert "pool-monitor-sidecar" not in applications  # the sidecar leaves itself out
    assert found == {
        "namespace": {NAMESPACE},
        "job": {JOB},
        "service": {SERVICE},
        "pool": set(POOLS),
        "lock": {LOCK},
    }


# -- (b) the expected alerts fire -----------------------------------------------------
def _describe(run: Run, keys: set[tuple[str, str]] | None = None) -> str:
    lines = []
    for (alert, subj, site), seen in sorted(run.watcher.snapshot().items()):
        if keys is not None and (alert, subj) not in keys:
            continue
        states = ", ".join(f"{s} during {run.during(t)}" for s, t in seen.states.items())
        lines.append(f"  {alert}[{subj}{' ' + site if site else ''}]: {states}")
    return "\n".join(lines) or "  (none)"


def test_expected_alerts_reach_firing(run: Run) -> None:
    # Most fired during their scenario; give the window-based ones a few more evaluations.
    with contextlib.suppress(TimeoutError):  # the assert below says which
        run.prom.wait_for(
            lambda: run.watcher.fired() >= EXPECTED_FIRING, "the expected alerts", timeout=15
        )
    missing = EXPECTED_FIRING - run.watcher.fired()
    assert not missing, f"never fired: {sorted(missing)}\nseen:\n{_describe(run)}"
    for seen in run.watcher.snapshot().values():
        if "firing" in seen.states:
            assert seen.labels["severity"] in ("info", "warning", "critical"), seen.labels
            assert seen.annotations["summary"] and seen.annotations["runbook_url"], seen
            assert "{{" not in seen.annotations["summary"], seen.annotations  # templated
    print(f"\nalerts seen:\n{_describe(run)}")


def test_cross_thread_alert_names_only_the_shared_session_anti_pattern(run: Run) -> None:
    sites = {
        site
        for (alert, _, site), seen in run.watcher.snapshot().items()
        if alert == "PoolCrossThreadConnectionUse" and "firing" in seen.states
    }
    assert sites, _describe(run)
    assert all(CROSS_THREAD_SITE.match(site) for site in sites), sites


DEMO = "demo-anti-pattern-vs-fix.json"


def _demo_query(title: str, ref: str, contains: str) -> str:
    """A panel query of the anti-vs-fix dashboard, by title, refId and a piece of it (the
    scenario's module in its code_site filter: titles repeat across scenarios)."""
    for e in dashboard_expressions({DEMO: build_dashboards()[DEMO]}):
        if e.source == f"{DEMO}: {title!r} ({ref})" and contains in e.expr:
            return substitute(e.expr)
    raise LookupError(f"{DEMO} has no {title!r} ({ref}) containing {contains!r}")


def test_demo_dashboard_shows_anti_pattern_vs_fix(run: Run) -> None:
    """The side-by-side panels, read as Grafana would just after each scenario, tell the
    anti-pattern (A) from the fix (B)."""

    def panel(title: str, ref: str, scenario: str, contains: str = "") -> float:
        end = max(e for label, _, e in run.spans if label.startswith(f"{scenario}/"))
        at = min(end + 4, time.time())  # + the snapshot, scan and scrape periods
        query = _demo_query(title, ref, contains or f"/{scenario}.py:")
        [result] = run.prom.query(query, at=at)
        return float(result["value"][1])

    held = {v: panel("Connections held (average)", v, "external_call") for v in "AB"}
    # The anti-pattern's holds are bounded by the pool (every connection out for the 0.5 s
    # call); the fix's are its SQL only, CPU-bound, so they stretch on a busy machine (2
    # busy loops on 2 cores: 4.5x, quiet: over 10x). 2x tells them apart at any speed.
    assert held["A"] > 2 * held["B"] > 0, held
    assert panel("Share of hold time without SQL", "A", "external_call") > 0.8
    long_held = {v: panel("Long-held events per second", v, "external_call") for v in "AB"}
    assert long_held["A"] > 10 * long_held["B"], long_held
    cross = {v: panel("Cross-thread uses per second", v, "shared_session") for v in "AB"}
    assert cross["A"] > 0 and cross["B"] == 0, cross
    assert panel("Callers waiting for the session-store lock", "A", "session_store", LOCK) > 0


# -- (c) what must stay quiet ----------------------------------------------------------
def test_quiet_alerts_never_become_active(run: Run) -> None:
    active = {
        (a, s, site): seen.states
        for (a, s, site), seen in run.watcher.snapshot().items()
        if a in QUIET
    }
    assert active == {}, _describe(run)
    assert run.watcher.errors == []
    # Not quiet for lack of data: the series they watch exist, at their healthy values.
    errors = run.prom.query("pool_monitor_errors_total")
    assert {r["metric"]["db_client_connection_pool_name"] for r in errors} == set(POOLS)
    assert {float(r["value"][1]) for r in errors} == {0.0}
    assert run.prom.value("min_over_time(pg_up[10m])") == 1.0


def test_no_alert_fires_outside_what_the_scenarios_explain(run: Run) -> None:
    # Per-application alerts about other clients of a shared PostgreSQL are not the demo's.
    demo = {(a, s) for a, s in run.watcher.fired() if s in (*POOLS, *APPS, "")}
    unexplained = {
        (a, s)
        for a, s in demo - EXPECTED_FIRING - set(ALLOWED_FIRING)
        if not (a in ALLOWED_ANY_POOL and s in POOLS)
    }
    assert not unexplained, f"{sorted(unexplained)}\nseen:\n{_describe(run, unexplained)}"


def test_every_alert_is_classified() -> None:
    """A new alert must be added to the expectations above (firing or quiet)."""
    classified = {a for a, _ in EXPECTED_FIRING} | set(QUIET) | set(ALLOWED_ANY_POOL)
    assert classified == {a.alert for a in ALERTS}
