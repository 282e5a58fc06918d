"""The rules and every dashboard query against a real Prometheus, scraping a fake exporter.

The fake serves every catalogue metric and the sidecar's pg_* series under their contract
names (via prometheus_client, on 127.0.0.1), so this proves the wiring — recording rules,
label joins, alert `for` timers, threshold overrides, every panel's query — before the demo
exists. The end-to-end test against the demo reuses `dashboards.promharness`.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from dashboards import build_dashboards
from dashboards.inventory import dashboard_expressions, rule_expressions, variable_queries
from dashboards.promharness import (
    Prometheus,
    PrometheusError,
    ScrapeTarget,
    require_binary,
    running_prometheus,
)
from dashboards.promql import substitute
from dashboards.ruleset import USE, WAIT, bucket_rate_name, quantile_name, render_rules
from dashboards.series import ADVICE_SERIES, bucket
from monitor.catalogue import METRICS, SECONDS_BUCKETS
from monitor.sizing import measured_wait

POOLS = {"api": (10, 0, 10), "background": (2, 3, 10), "shared": (4, 1, 5)}  # used, idle, max
#: The sidecar's sizing advice per pool (two processes each, so api's size per process is
#: 5): arrival rate, mean hold, offered load, predicted / measured P(wait) and mean wait,
#: recommended size per process, model warnings.
ADVICE = {
    "api": (60.0, 0.075, 4.5, 0.63, 0.12, 0.7, 0.2, 9, 2),
    "background": (10.0, 0.05, 0.5, 0.0016, 0.00002, 0.0, 0.0004, 2, 0),
    "shared": (20.0, 0.05, 1.0, 0.2, 0.01, 0.1, 0.0004, 3, 0),
}
ADVICE_PROCESSES = 2
SITES = (
    "app/orders.py:12:list_orders",
    "demo_app/scenarios/external_call.py:30:anti_process_image",
    "demo_app/scenarios/external_call.py:50:three_stage_process_image",
    "demo_app/scenarios/duplicate_rows.py:37:unsafe_get_project",
    "demo_app/scenarios/duplicate_rows.py:47:safe_get_project",
    "demo_app/scenarios/idempotent_payment.py:68:naive_process_payment",
    "demo_app/scenarios/idempotent_payment.py:108:idempotent_process_payment",
    "demo_app/scenarios/lost_update.py:79:naive_increase_like",
    "demo_app/scenarios/lost_update.py:94:pessimistic_increase_like",
    "demo_app/scenarios/lost_update.py:111:optimistic_increase_like",
    "demo_app/scenarios/shared_session.py:106:shared_send_heartbeat",
    "demo_app/scenarios/shared_session.py:165:factory_send_heartbeat",
)
CROSS_THREAD_SITE = "demo_app/scenarios/shared_session.py:106:shared_send_heartbeat"
#: Alerts whose `for` is cut to 1 s. PostgresCollectorDown keeps its 2m: `absent(pg_up)`
#: is true until the first scrape, and must not fire from that race.
SHORT_FOR = {
    a: "1s"
    for a in (
        "PoolSaturated",
        "PoolPendingRequestsSustained",
        "PoolCheckoutTimeouts",
        "PoolWaitTimeP95High",
        "PoolLongHeldConnections",
        "PoolHoldTimeMostlyIdle",
        "PoolCrossThreadConnectionUse",
        "PoolCodeSiteBlockingSessions",
        "PostgresIdleInTransactionTooLong",
        "PostgresConnectionsNearLimit",
        "PoolMonitorErrors",
    )
}
#: 3 callers wait in pool api: with the threshold raised to 5 that alert must stay quiet.
THRESHOLDS = {"pending_requests": 5}
EXPECTED_FIRING = {
    ("PoolSaturated", "api"),
    ("PoolCheckoutTimeouts", "api"),
    ("PoolWaitTimeP95High", "api"),
    ("PoolLongHeldConnections", "api"),
    ("PoolCrossThreadConnectionUse", "api"),
    ("PoolCodeSiteBlockingSessions", "api"),
    ("PoolMonitorErrors", "api"),
    ("PostgresIdleInTransactionTooLong", "orders-api"),
    ("PostgresConnectionsNearLimit", ""),
}


class FakeExporter:
    """A registry with every catalogue metric, the pg_* series, the sidecar's blocking and
    advice gauges and the snapshot-error counter; a thread keeps counters and histograms
    moving so rates are non-zero. The hold-
    and wait-time observations carry exemplars (`trace_id`, `span_id`), as pool-monitor's
    do under a sampled trace; prometheus_client serves them when asked for OpenMetrics."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.registry = CollectorRegistry()
        r = self.registry
        self.m: dict[str, Any] = {}
        for metric in METRICS:
            labels = list(metric.prometheus_labels)
            name = metric.prometheus_name
            if metric.kind == "histogram":
                self.m[name] = Histogram(
                    name, metric.description, labels, registry=r, buckets=SECONDS_BUCKETS
                )
            elif metric.kind == "counter":
                self.m[name] = Counter(name, metric.description, labels, registry=r)
            else:
                self.m[name] = Gauge(name, metric.description, labels, registry=r)
        self.snapshot_errors = Counter("pool_monitor_snapshot_errors_total", "x", registry=r)
        pg = {
            name: Gauge(name, "x", labels, registry=r)
            for name, labels in (
                ("pg_app_backends", ["application_name", "state"]),
                ("pg_app_idle_in_transaction_max_seconds", ["application_name"]),
                ("pg_app_transaction_max_seconds", ["application_name"]),
                ("pg_app_blocked_backends", ["application_name"]),
                ("pg_app_lock_wait_max_seconds", ["application_name"]),
                ("pg_max_connections", []),
                ("pg_reserved_connections", []),
                ("pg_up", []),
            )
        }
        for app, state, n in (
            ("orders-api", "active", 60),
            ("orders-api", "idle", 20),
            ("orders-background", "idle in transaction", 10),
        ):
            pg["pg_app_backends"].labels(app, state).set(n)
        for app, age in (("orders-api", 45), ("orders-background", 5)):
            pg["pg_app_idle_in_transaction_max_seconds"].labels(app).set(age)
            pg["pg_app_transaction_max_seconds"].labels(app).set(age + 1)
            pg["pg_app_blocked_backends"].labels(app).set(1)
            pg["pg_app_lock_wait_max_seconds"].labels(app).set(2)
        pg["pg_max_connections"].set(100)
        # The sidecar's lock-wait graph: a root at an api site blocks 4 sessions (3
        # directly), an unknown root 5 (which the alert leaves out).
        blocked = Gauge(
            "pool_monitor_blocking_blocked_backends",
            "x",
            ["code_site", "db_client_connection_pool_name", "kind"],
            registry=r,
        )
        lock_wait = Gauge(
            "pool_monitor_blocking_root_lock_wait_max_seconds",
            "x",
            ["code_site", "db_client_connection_pool_name"],
            registry=r,
        )
        for site, pool, direct, transitive in (
            (SITES[0], "api", 3, 4),
            ("(unknown)", "(unknown)", 5, 5),
        ):
            blocked.labels(site, pool, "direct").set(direct)
            blocked.labels(site, pool, "transitive").set(transitive)
            lock_wait.labels(site, pool).set(12.5)
        Gauge("pool_monitor_blocking_longest_chain", "x", registry=r).set(2)
        # The sidecar's sizing advice (`pool_monitor_advice_*`), one value per pool.
        advice = {
            name: Gauge(name, "x", ["db_client_connection_pool_name"], registry=r)
            for name in ADVICE_SERIES
        }
        for pool, values in ADVICE.items():
            advice[ADVICE_SERIES[0]].labels(pool).set(ADVICE_PROCESSES)
            for name, value in zip(ADVICE_SERIES[1:], values, strict=True):
                advice[name].labels(pool).set(value)
        pg["pg_reserved_connections"].set(3)
        pg["pg_up"].set(1)
        for pool, (used, idle, size) in POOLS.items():
            self.gauge("db_client_connection_count", pool, "used").set(used)
            self.gauge("db_client_connection_count", pool, "idle").set(idle)
            self.gauge("db_client_connection_max", pool).set(size)
            self.gauge("db_client_connection_idle_max", pool).set(size)
            self.gauge("db_client_connection_pending_requests", pool).set(3 if pool == "api" else 0)
            self.gauge("sqlalchemy_pool_overflow", pool).set(0)
            self.gauge("sqlalchemy_pool_oldest_checkout_age_seconds", pool).set(7)
            self.gauge("sqlalchemy_pool_long_held", pool).set(1 if pool == "api" else 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-exporter", daemon=True)

    def gauge(self, name: str, *labels: str) -> Any:
        return self.m[name].labels(*labels)

    def trace(self) -> dict[str, str]:
        n = next(self._ids)
        return {"trace_id": f"{n:032x}", "span_id": f"{n:016x}"}

    def tick(self) -> None:
        m = self.m
        for pool in POOLS:
            m["sqlalchemy_pool_checkouts_total"].labels(pool).inc()
            m["db_client_connection_wait_time_seconds"].labels(pool).observe(
                0.2 if pool == "api" else 0.0004, self.trace()
            )
            m["db_client_connection_use_time_seconds"].labels(pool).observe(0.05, self.trace())
            m["db_client_connection_create_time_seconds"].labels(pool).observe(0.01)
            m["sqlalchemy_pool_invalidations_total"].labels(pool, "hard").inc()
            m["sqlalchemy_pool_invalidations_total"].labels(pool, "soft").inc()
            m["sqlalchemy_pool_connect_errors_total"].labels(pool).inc()
            # 10% SQL, 90% idle, but only ~0.1 connections held: below the idle alert's
            # activity guard, so PoolHoldTimeMostlyIdle stays quiet.
            m["sqlalchemy_pool_sql_time_seconds_total"].labels(pool).inc(0.001)
            m["sqlalchemy_pool_idle_in_use_time_seconds_total"].labels(pool).inc(0.009)
            for site in SITES:
                m["sqlalchemy_pool_site_use_time_seconds_total"].labels(pool, site).inc(0.01)
                m["sqlalchemy_pool_site_idle_in_use_time_seconds_total"].labels(pool, site).inc(
                    0.005
                )
                m["sqlalchemy_pool_site_checkouts_total"].labels(pool, site).inc()
                long_held = 1 if pool == "api" else 0  # as the long_held gauge above
                m["sqlalchemy_pool_long_held_events_total"].labels(pool, site).inc(long_held)
                m["sqlalchemy_pool_concurrent_uses_total"].labels(pool, site).inc(0)
        m["db_client_connection_timeouts_total"].labels("api").inc()
        m["pool_monitor_errors_total"].labels("api").inc()
        m["sqlalchemy_pool_cross_thread_uses_total"].labels("api", CROSS_THREAD_SITE).inc()
        for pool in ("background", "shared"):
            m["db_client_connection_timeouts_total"].labels(pool).inc(0)
            m["pool_monitor_errors_total"].labels(pool).inc(0)
        m["app_lock_wait_time_seconds"].labels("session-store").observe(0.003)
        m["app_lock_hold_time_seconds"].labels("session-store").observe(0.002)
        self.snapshot_errors.inc(0)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.tick()

    def __enter__(self) -> FakeExporter:
        self.tick()
        self.server, _ = start_http_server(0, addr="127.0.0.1", registry=self.registry)
        self.address = f"127.0.0.1:{self.server.server_port}"
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Env:
    prom: Prometheus
    exporter: FakeExporter


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    binary = require_binary("prometheus")
    with (
        FakeExporter() as exporter,
        running_prometheus(
            [ScrapeTarget("fake", exporter.address, {"namespace": "shop", "service": "orders"})],
            thresholds=THRESHOLDS,
            for_=SHORT_FOR,
            features=("exemplar-storage",),
            binary=binary,
        ) as prom,
    ):
        prom.wait_for_targets_up(timeout=20)
        yield Env(prom, exporter)


def test_a_parse_error_is_an_http_400(env: Env) -> None:
    with pytest.raises(PrometheusError) as excinfo:
        env.prom.query("sum(rate(db_client_connection_count[1m])")
    assert excinfo.value.status == 400
    assert excinfo.value.error_type == "bad_data"


def test_recording_rules_produce_data(env: Env) -> None:
    prom = env.prom
    [api] = prom.wait_for_data(
        'pool:db_client_connection_saturation:ratio{db_client_connection_pool_name="api"}'
    )
    assert api["metric"] == {
        "__name__": "pool:db_client_connection_saturation:ratio",
        "db_client_connection_pool_name": "api",
        "instance": env.exporter.address,
        "job": "fake",
        "namespace": "shop",
        "service": "orders",
    }
    assert float(api["value"][1]) == 1.0
    assert (
        prom.value(
            'pool:db_client_connection_saturation:ratio{db_client_connection_pool_name="shared"}'
        )
        == 0.8
    )
    # All api checkouts wait 0.2 s: the (0.1, 0.25] bucket.
    [p95] = prom.wait_for_data(
        "pool:db_client_connection_wait_time_seconds:quantile_rate5m"
        '{db_client_connection_pool_name="api", quantile="0.95"}'
    )
    assert p95["metric"]["namespace"] == "shop" and "instance" not in p95["metric"]
    assert 0.1 < float(p95["value"][1]) <= 0.25
    [usage] = prom.wait_for_data("pg:pg_app_backends:usable_ratio")
    assert float(usage["value"][1]) == pytest.approx(90 / 97)


def _by_pool(prom: Prometheus, expr: str) -> dict[str, float]:
    return {
        r["metric"]["db_client_connection_pool_name"]: float(r["value"][1])
        for r in prom.wait_for_data(expr)
    }


def test_sizing_recording_rules_measure_what_the_model_reads(env: Env) -> None:
    """The sizing inputs per service, from the exporter's steady ticks: every checkout
    holds 0.05 s; api's wait 0.2 s, the others' 0.4 ms. Whether a checkout waited is
    `monitor.sizing.measured_wait`'s verdict on the same wait, bucketed."""
    prom = env.prom
    rates = _by_pool(prom, "pool:sqlalchemy_pool_checkouts:rate5m")
    assert set(rates) == set(POOLS) and all(v > 0 for v in rates.values()), rates
    holds = _by_pool(prom, "pool:db_client_connection_use_time_seconds:mean5m")
    assert holds == pytest.approx(dict.fromkeys(POOLS, 0.05))
    waits = _by_pool(prom, "pool:db_client_connection_wait_time_seconds:mean5m")
    assert waits == pytest.approx({"api": 0.2, "background": 0.0004, "shared": 0.0004})
    waited = _by_pool(prom, "pool:db_client_connection_waited:ratio_rate5m")

    def verdict(wait: float) -> float:
        counts = [0.0] * (len(SECONDS_BUCKETS) + 1)
        counts[next((i for i, b in enumerate(SECONDS_BUCKETS) if wait <= b), -1)] = 10
        share = measured_wait(SECONDS_BUCKETS, counts, 10 * wait)
        assert share is not None
        return share[0]

    assert waited == pytest.approx({pool: verdict(w) for pool, w in waits.items()})
    assert waited == pytest.approx({"api": 1.0, "background": 0.0, "shared": 0.0})
    # 10 + 10 + 5 connections; recommended 2 processes x (9 + 2 + 3); server 100 - 3.
    [fleet] = prom.wait_for_data("fleet:db_client_connection_max:sum")
    assert float(fleet["value"][1]) == 25
    [recommended] = prom.wait_for_data("fleet:pool_monitor_advice_recommended_connections:sum")
    assert recommended["metric"] == {
        "__name__": "fleet:pool_monitor_advice_recommended_connections:sum"
    }
    assert float(recommended["value"][1]) == 28
    [budget] = prom.wait_for_data("fleet:db_client_connection_max:budget_ratio")
    assert float(budget["value"][1]) == pytest.approx(25 / 97)


def test_alerts_fire_with_short_for_and_respect_threshold_overrides(env: Env) -> None:
    prom = env.prom
    saturated = prom.wait_for_alert("PoolSaturated", "firing")
    assert saturated["labels"]["severity"] == "warning"
    assert saturated["annotations"]["summary"] == (
        f"Pool api on {env.exporter.address} is 100% used"
    )

    def firing() -> set[tuple[str, str]]:
        return {
            (
                a["labels"]["alertname"],
                a["labels"].get("db_client_connection_pool_name")
                or a["labels"].get("application_name", ""),
            )
            for a in prom.alerts()
            if a["state"] == "firing"
        }

    prom.wait_for(lambda: firing() >= EXPECTED_FIRING, "the expected alerts to fire", timeout=30)
    assert firing() == EXPECTED_FIRING
    # Would fire under the default threshold (0): 3 callers are waiting.
    assert (
        prom.value('db_client_connection_pending_requests{db_client_connection_pool_name="api"}')
        == 3
    )
    states = {a["labels"]["alertname"]: a["state"] for a in prom.alerts()}
    assert "PoolPendingRequestsSustained" not in states
    assert "PostgresCollectorDown" not in states  # pg_up is 1


def test_every_rule_evaluates_without_error(env: Env) -> None:
    prom = env.prom

    def evaluated() -> list[dict[str, Any]] | None:
        rules = [r for g in prom.rule_groups() for r in g["rules"]]
        done = all(not r["lastEvaluation"].startswith("0001-") for r in rules)
        return rules if done and rules else None

    rules = prom.wait_for(evaluated, "every rule to be evaluated", timeout=20)
    assert len(rules) == 46
    assert {
        r["name"]: (r["health"], r.get("lastError", "")) for r in rules if r["health"] != "ok"
    } == {}
    for expression in rule_expressions(render_rules()):
        prom.query(expression.expr)  # raises on a parse (400) or evaluation (422) error


def test_every_dashboard_query_parses_and_returns_data(env: Env) -> None:
    """Each panel query and variable, with Grafana's variables set to "All", must parse
    (no HTTP 400), evaluate (no 422) and return at least one series."""
    models = build_dashboards()
    expressions = dashboard_expressions(models) + variable_queries(models)
    assert len(expressions) > 70
    prom = env.prom
    pending = {e.source: substitute(e.expr) for e in expressions}
    errors: dict[str, str] = {}

    def probe() -> bool:
        for source, expr in list(pending.items()):
            try:
                result = prom.query(expr)
            except PrometheusError as exc:
                if exc.status in (400, 422):
                    errors[source] = f"{exc} :: {expr}"
                    del pending[source]
                    continue
                raise
            if result:
                del pending[source]
        return not pending

    with contextlib.suppress(TimeoutError):  # the asserts below say what is missing
        prom.wait_for(probe, "every dashboard query to return data", timeout=30, interval=0.5)
    assert errors == {}
    assert pending == {}, "queries that returned no data"


def test_exemplar_queries_bring_trace_ids_and_recording_rules_none(env: Env) -> None:
    """What Grafana asks for the dots: each dashboard query with exemplars on, through
    `/api/v1/query_exemplars`, brings the exporter's exemplars, labelled exactly `trace_id`
    and `span_id`, from the raw hold- and wait-time buckets. The recording rules' series,
    which the other lines of those panels read, bring none: Prometheus keeps exemplars only
    with scraped series, hence the queries of the raw buckets."""
    queries = {
        e.source: substitute(e.expr)
        for e in dashboard_expressions(build_dashboards(), exemplars_only=True)
    }
    assert len(queries) == 5
    prom = env.prom

    def fetched() -> dict[str, list[dict[str, Any]]] | None:
        now = time.time()
        found = {source: prom.exemplars(expr, now - 60, now) for source, expr in queries.items()}
        return found if all(found.values()) else None

    found = prom.wait_for(fetched, "exemplars for every query with exemplars on", timeout=20)
    raw = {bucket(WAIT), bucket(USE)}
    for source, series_list in found.items():
        for series in series_list:
            assert series["seriesLabels"]["__name__"] in raw, source
            for exemplar in series["exemplars"]:
                labels = exemplar["labels"]
                assert set(labels) == {"trace_id", "span_id"}, (source, labels)
                assert re.fullmatch("[0-9a-f]{32}", labels["trace_id"]), labels
                assert re.fullmatch("[0-9a-f]{16}", labels["span_id"]), labels
    now = time.time()
    for recorded in (quantile_name(WAIT), quantile_name(USE), bucket_rate_name(WAIT)):
        assert prom.wait_for_data(recorded), recorded
        assert prom.exemplars(recorded, now - 60, now) == [], recorded
