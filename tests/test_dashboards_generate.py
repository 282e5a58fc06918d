"""Dashboards and rules as generated: drift, structure, allowed metrics, overrides, docs.

No Prometheus needed; see test_dashboards_promtool.py and test_dashboards_prometheus.py
for the checks that run the real binaries.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

import dashboards
from dashboards import build_dashboards
from dashboards.__main__ import main as cli_main
from dashboards.__main__ import stale_files
from dashboards.inventory import dashboard_expressions, panels, rule_expressions, variable_queries
from dashboards.panels import Q
from dashboards.promql import label_values_metric, metric_names, substitute
from dashboards.ruleset import recording_names, render_rules
from dashboards.series import (
    ADVICE_SERIES,
    BLOCKING_SERIES,
    PG_SERIES,
    SIDECAR_SCAN_AGE,
    SNAPSHOT_ERRORS,
    allowed_metric_names,
)
from dashboards.thresholds import ALERTS, THRESHOLDS, OverrideError, defaults_table
from dashboards.writer import TABLE_BEGIN, TABLE_END, expected_files, with_thresholds_table
from monitor.catalogue import METRICS, SECONDS_BUCKETS
from monitor.sizing import WAITED_S

PKG = Path(dashboards.__file__).resolve().parent
ALLOWED = allowed_metric_names(recording_names())
POOL_FILTER = (
    'namespace=~"$namespace", job=~"$job", service=~"$service", '
    'db_client_connection_pool_name=~"$pool"'
)
#: The histograms whose observations carry exemplars (trace_id, span_id).
EXEMPLAR_BUCKETS = {
    "db_client_connection_use_time_seconds_bucket",
    "db_client_connection_wait_time_seconds_bucket",
}


@pytest.fixture(scope="module")
def models() -> dict[str, dict[str, Any]]:
    return build_dashboards()


# ----------------------------------------------------------------------------- drift


def test_committed_files_equal_generator_output() -> None:
    expected = expected_files()
    assert sorted(expected) == [
        "json/demo-anti-pattern-vs-fix.json",
        "json/pool-overview.json",
        "json/postgresql.json",
        "json/sessions-and-code-sites.json",
        "rules/alerts.yml",
        "rules/recording.yml",
    ]
    for rel, text in expected.items():
        committed = (PKG / rel).read_text(encoding="utf-8")
        assert committed == text, f"{rel} is stale: run `python -m dashboards`"
    assert sorted(p.name for p in (PKG / "json").glob("*.json")) == sorted(
        rel.split("/")[1] for rel in expected if rel.startswith("json/")
    ), "json/ holds a file the generator does not make"
    assert stale_files(PKG) == []


def test_readme_thresholds_table_is_current() -> None:
    readme = (PKG / "README.md").read_text(encoding="utf-8")
    assert with_thresholds_table(readme) == readme, "run `python -m dashboards`"
    block = readme.split(TABLE_BEGIN)[1].split(TABLE_END)[0]
    assert block == "\n" + defaults_table()
    assert "| `pool_saturation_ratio` | 0.9 | ratio |" in block
    assert "| [PoolSaturated](#poolsaturated) | 5m | warning |" in block


def test_generate_writes_the_same_bytes_and_check_flags_edits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "README.md").write_text(f"# x\n{TABLE_BEGIN}\nold\n{TABLE_END}\n")
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "removed-board.json").write_text("{}")
    written = dashboards.generate(tmp_path)
    assert len(written) == 7
    assert not (tmp_path / "json" / "removed-board.json").exists()
    for rel, text in expected_files().items():
        assert (tmp_path / rel).read_text(encoding="utf-8") == text
    assert cli_main(["--check", "--out", str(tmp_path)]) == 0

    path = tmp_path / "rules" / "alerts.yml"
    path.write_text(path.read_text().replace("for: 5m", "for: 6m", 1))
    assert cli_main(["--check", "--out", str(tmp_path)]) == 1
    assert f"out of date: {path}" in capsys.readouterr().err


def test_dashboard_json_is_deterministic() -> None:
    first = expected_files()
    assert expected_files() == first


# ----------------------------------------------------------------------------- structure


def test_dashboards_have_uids_titles_and_variables(models: dict[str, dict[str, Any]]) -> None:
    uids = {name: m["uid"] for name, m in models.items()}
    assert uids == {
        "pool-overview.json": "pool-monitor-overview",
        "sessions-and-code-sites.json": "pool-monitor-sessions",
        "postgresql.json": "pool-monitor-postgresql",
        "demo-anti-pattern-vs-fix.json": "pool-monitor-demo",
    }
    variables = {name: [v["name"] for v in m["templating"]["list"]] for name, m in models.items()}
    assert variables == {
        "pool-overview.json": ["datasource", "namespace", "job", "service", "pool"],
        "sessions-and-code-sites.json": [
            "datasource",
            "namespace",
            "job",
            "service",
            "pool",
            "lock",
        ],
        "postgresql.json": ["datasource", "namespace", "job", "service", "application"],
        "demo-anti-pattern-vs-fix.json": ["datasource", "namespace", "job", "service"],
    }
    for model in models.values():
        ds, *queries = model["templating"]["list"]
        assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
        for var in queries:
            assert var["type"] == "query"
            assert var["includeAll"] and var["multi"] and var["allValue"] == ".*"
            assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_pool_variable_uses_the_catalogue_pool_label(models: dict[str, dict[str, Any]]) -> None:
    pool = next(
        v for v in models["pool-overview.json"]["templating"]["list"] if v["name"] == "pool"
    )
    assert pool["query"] == (
        'label_values(db_client_connection_count{namespace=~"$namespace", job=~"$job", '
        'service=~"$service"}, db_client_connection_pool_name)'
    )


def test_every_panel_is_described_has_a_unit_and_queries_prometheus(
    models: dict[str, dict[str, Any]],
) -> None:
    for name, model in models.items():
        ids = []
        for panel in panels(model):
            ids.append(panel["id"])
            if panel["type"] == "row":
                continue
            where = f"{name}: {panel['title']!r}"
            assert len(panel.get("description", "")) >= 80, f"{where}: description too thin"
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{where}: no unit"
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            assert panel["targets"], f"{where}: no query"
            for target in panel["targets"]:
                assert target["datasource"] == panel["datasource"], where
                assert target["expr"].strip(), where
            refs = [t["refId"] for t in panel["targets"]]
            assert len(set(refs)) == len(refs), where
            grid = panel["gridPos"]
            assert 0 < grid["w"] <= 24 and grid["x"] + grid["w"] <= 24, where
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"


def test_overview_has_the_panels_the_issue_asks_for(models: dict[str, dict[str, Any]]) -> None:
    titles = [p["title"] for p in panels(models["pool-overview.json"])]
    assert titles == [
        "Is the pool running dry?",
        "Saturation now (worst process)",
        "Callers waiting now",
        "Checkout timeouts in range",
        "pool-monitor errors in range",
        "Connections",
        "Connections by state vs max: $pool",
        "Saturation by process",
        "Overflow connections",
        "Callers waiting (pending requests)",
        "Waiting for a connection",
        "Wait time p50 / p95 / p99",
        "Wait-time distribution",
        "Checkout timeouts",
        "Checkouts per second",
        "Holding and opening connections",
        "Hold (use) time p50 / p99",
        "Connect time p50 / p99",
        "Invalidations by kind",
        "Connect errors",
        "Sizing: how big should the pool be? (advice per process, next to the wait)",
        "Offered load vs size, per process",
        "P(wait): predicted vs measured",
        "Mean wait per checkout: predicted vs measured",
        "Pool size per process: current vs recommended",
        "Fleet connections: current vs recommended sizes vs the server",
        "Fleet budget used",
        "Blocking: whose transactions hold the locks others wait for",
        "Sessions blocked, by root blocker's code site",
        "Longest lock wait, by root blocker's code site",
        "Longest lock-wait chain",
    ]
    heat = next(p for p in panels(models["pool-overview.json"]) if p["type"] == "heatmap")
    assert heat["targets"][0]["format"] == "heatmap"
    assert heat["targets"][0]["exemplar"] is True
    assert heat["targets"][0]["expr"] == (
        f"sum by (le) (rate(db_client_connection_wait_time_seconds_bucket{{{POOL_FILTER}}}"
        "[$__rate_interval]))"
    )


def _target(model: dict[str, Any], title: str, ref: str) -> dict[str, Any]:
    panel = next(p for p in panels(model) if p.get("title") == title)
    return next(t for t in panel["targets"] if t["refId"] == ref)


def test_exemplars_on_exactly_the_raw_hold_and_wait_histogram_queries(
    models: dict[str, dict[str, Any]],
) -> None:
    """Grafana draws exemplar dots for targets with `exemplar: true`. Prometheus keeps
    exemplars only with scraped series, so a target asks for them exactly when it reads the
    raw hold- or wait-time buckets (never recording rules, counters or gauges), and always
    as a range query (Grafana asks no exemplars for an instant one)."""
    with_exemplars = set()
    for name, model in models.items():
        for panel in panels(model):
            for target in panel.get("targets") or []:
                where = (name, panel["title"], target["refId"])
                reads_raw = bool(metric_names(target["expr"]) & EXEMPLAR_BUCKETS)
                assert target.get("exemplar", False) is reads_raw, where
                if reads_raw:
                    assert metric_names(target["expr"]) <= EXEMPLAR_BUCKETS, where
                    assert target["range"] is True and target["instant"] is False, where
                    with_exemplars.add(where)
    assert with_exemplars == {
        ("pool-overview.json", "Wait time p50 / p95 / p99", "B"),
        ("pool-overview.json", "Wait-time distribution", "A"),
        ("pool-overview.json", "Hold (use) time p50 / p99", "B"),
        ("demo-anti-pattern-vs-fix.json", "Wait time p95 by pool", "A"),
        ("demo-anti-pattern-vs-fix.json", "Wait time p95 by pool", "B"),
    }
    overview = models["pool-overview.json"]
    for title, metric in (
        ("Hold (use) time p50 / p99", "db_client_connection_use_time_seconds"),
        ("Wait time p50 / p95 / p99", "db_client_connection_wait_time_seconds"),
    ):
        # The quantile lines stay on the recording rule (the alert's numbers), no exemplars.
        assert "exemplar" not in _target(overview, title, "A"), title
        assert _target(overview, title, "B") == {
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "editorMode": "code",
            "exemplar": True,
            "expr": (
                "histogram_quantile(0.99, sum by (db_client_connection_pool_name, le) "
                f"(rate({metric}_bucket{{{POOL_FILTER}}}[$__rate_interval])))"
            ),
            "instant": False,
            "legendFormat": "{{db_client_connection_pool_name}} p99 (short window)",
            "range": True,
            "refId": "B",
        }, title
    for title in ("Checkouts per second", "Checkout timeouts", "Connect time p50 / p99"):
        assert "exemplar" not in _target(overview, title, "A"), title


def _queries(model: dict[str, Any], title: str) -> list[tuple[str, str, str, bool]]:
    """(refId, expr, legend, instant) of each target of the panel titled `title`."""
    panel = next(p for p in panels(model) if p.get("title") == title)
    return [
        (t["refId"], t["expr"], t.get("legendFormat", ""), t["instant"]) for t in panel["targets"]
    ]


def test_sizing_row_puts_the_advice_next_to_the_measured_wait(
    models: dict[str, dict[str, Any]],
) -> None:
    overview = models["pool-overview.json"]
    by_title = {p["title"]: p for p in panels(overview)}

    def mx(metric: str) -> str:
        return f"max by (db_client_connection_pool_name) ({metric}{{{POOL_FILTER}}})"

    size = (
        f"max by (db_client_connection_pool_name) (db_client_connection_max{{{POOL_FILTER}}} "
        f"/ pool_monitor_advice_processes{{{POOL_FILTER}}})"
    )
    pool = "{{db_client_connection_pool_name}}"
    assert _queries(overview, "Offered load vs size, per process") == [
        ("A", mx("pool_monitor_advice_offered_load"), f"{pool} offered load", False),
        ("B", size, f"{pool} size", False),
    ]
    assert _queries(overview, "P(wait): predicted vs measured") == [
        ("A", mx("pool_monitor_advice_predicted_wait_probability"), f"{pool} predicted", False),
        ("B", mx("pool_monitor_advice_measured_wait_probability"), f"{pool} measured", False),
        (
            "C",
            f"pool:db_client_connection_waited:ratio_rate5m{{{POOL_FILTER}}}",
            f"{pool} measured (5m)",
            False,
        ),
    ]
    assert _queries(overview, "Mean wait per checkout: predicted vs measured") == [
        ("A", mx("pool_monitor_advice_predicted_mean_wait_seconds"), f"{pool} predicted", False),
        ("B", mx("pool_monitor_advice_measured_mean_wait_seconds"), f"{pool} measured", False),
        (
            "C",
            f"pool:db_client_connection_wait_time_seconds:mean5m{{{POOL_FILTER}}}",
            f"{pool} measured (5m)",
            False,
        ),
    ]
    assert _queries(overview, "Pool size per process: current vs recommended") == [
        ("A", mx("pool_monitor_advice_processes"), "", True),
        ("B", size, "", True),
        ("C", mx("pool_monitor_advice_recommended_max_connections"), "", True),
        ("D", mx("pool_monitor_advice_model_warnings"), "", True),
    ]
    assert _queries(overview, "Fleet connections: current vs recommended sizes vs the server") == [
        ("A", "fleet:db_client_connection_max:sum", "at current sizes", False),
        (
            "B",
            "fleet:pool_monitor_advice_recommended_connections:sum",
            "at recommended sizes",
            False,
        ),
        (
            "C",
            "max(pg_max_connections) - max(pg_reserved_connections)",
            "server's usable connections",
            False,
        ),
    ]
    assert _queries(overview, "Fleet budget used") == [
        ("A", "fleet:db_client_connection_max:budget_ratio", "fleet", False)
    ]
    # Units, and the default target of the advice as the dashed line.
    units = {
        title: by_title[title]["fieldConfig"]["defaults"]["unit"]
        for title in (
            "Offered load vs size, per process",
            "P(wait): predicted vs measured",
            "Mean wait per checkout: predicted vs measured",
            "Fleet budget used",
        )
    }
    assert units == {
        "Offered load vs size, per process": "short",
        "P(wait): predicted vs measured": "percentunit",
        "Mean wait per checkout: predicted vs measured": "s",
        "Fleet budget used": "percentunit",
    }
    for title, target in (
        ("P(wait): predicted vs measured", 0.01),
        ("Mean wait per checkout: predicted vs measured", 0.005),
    ):
        defaults = by_title[title]["fieldConfig"]["defaults"]
        assert defaults["thresholds"]["steps"] == [
            {"color": "green", "value": None},
            {"color": "red", "value": target},
        ], title
        assert defaults["custom"]["thresholdsStyle"] == {"mode": "dashed"}, title
    # The size per process, and the server's limit, are drawn dashed.
    assert by_title["Offered load vs size, per process"]["fieldConfig"]["overrides"] == [
        {
            "matcher": {"id": "byRegexp", "options": " size$"},
            "properties": [
                {"id": "custom.fillOpacity", "value": 0},
                {"id": "custom.lineStyle", "value": {"dash": [10, 10], "fill": "dash"}},
            ],
        }
    ]
    fleet = by_title["Fleet connections: current vs recommended sizes vs the server"]
    assert [o["matcher"] for o in fleet["fieldConfig"]["overrides"]] == [
        {"id": "byName", "options": "server's usable connections"}
    ]
    # The table joins its four queries into one row per pool, named columns.
    table = by_title["Pool size per process: current vs recommended"]
    assert table["type"] == "table"
    assert all(t["format"] == "table" for t in table["targets"])
    assert table["transformations"] == [
        {"id": "merge", "options": {}},
        {
            "id": "organize",
            "options": {
                "excludeByName": {"Time": True},
                "renameByName": {
                    "Value #A": "processes",
                    "Value #B": "size now",
                    "Value #C": "recommended",
                    "Value #D": "model warnings",
                },
            },
        },
    ]
    assert table["options"]["sortBy"] == [{"desc": True, "displayName": "model warnings"}]
    assert table["fieldConfig"]["overrides"] == [
        {
            "matcher": {"id": "byName", "options": "model warnings"},
            "properties": [
                {"id": "custom.cellOptions", "value": {"type": "color-text"}},
                {
                    "id": "thresholds",
                    "value": {
                        "mode": "absolute",
                        "steps": [
                            {"color": "green", "value": None},
                            {"color": "orange", "value": 1},
                        ],
                    },
                },
            ],
        }
    ]
    assert by_title["Fleet budget used"]["fieldConfig"]["defaults"]["thresholds"]["steps"] == [
        {"color": "green", "value": None},
        {"color": "orange", "value": 0.8},
        {"color": "red", "value": 1},
    ]
    # How to read them: per process, and where the warnings' words are.
    sizing = [
        by_title[t]
        for t in (
            "Offered load vs size, per process",
            "P(wait): predicted vs measured",
            "Mean wait per checkout: predicted vs measured",
            "Pool size per process: current vs recommended",
        )
    ]
    per_process = "The model is per process: each worker process has its own pool"
    for panel in sizing:
        assert per_process in panel["description"], panel["title"]
    assert "/api/advice" in table["description"]
    for panel in (fleet, by_title["Fleet budget used"]):
        assert "one database server" in panel["description"], panel["title"]
    # One row: three panels, then three, filling the width.
    assert [(p["gridPos"]["x"], p["gridPos"]["w"]) for p in (*sizing[:3], table, fleet)] == [
        (0, 8),
        (8, 8),
        (16, 8),
        (0, 10),
        (10, 10),
    ]
    assert (
        by_title["Fleet budget used"]["gridPos"]["x"],
        by_title["Fleet budget used"]["gridPos"]["w"],
    ) == (20, 4)


def test_sizing_recording_rules_are_exact() -> None:
    """The sizing model's inputs and the fleet budget, as recorded (their values are
    checked by promtool in rules/tests/recording_test.yml)."""
    doc = yaml.safe_load(render_rules()["recording.yml"])
    rules = {r["record"]: r["expr"] for g in doc["groups"] for r in g["rules"]}
    key = "namespace, job, service, db_client_connection_pool_name"
    wait = "db_client_connection_wait_time_seconds"
    sizing = {
        "pool:sqlalchemy_pool_checkouts:rate5m",
        "pool:db_client_connection_use_time_seconds:mean5m",
        "pool:db_client_connection_wait_time_seconds:mean5m",
        "pool:db_client_connection_waited:ratio_rate5m",
        "fleet:db_client_connection_max:sum",
        "fleet:pool_monitor_advice_recommended_connections:sum",
        "fleet:db_client_connection_max:budget_ratio",
    }
    assert {name: expr for name, expr in rules.items() if name in sizing} == {
        "pool:sqlalchemy_pool_checkouts:rate5m": (
            f"sum by ({key}) (rate(sqlalchemy_pool_checkouts_total[5m]))"
        ),
        "pool:db_client_connection_use_time_seconds:mean5m": (
            f"sum by ({key}) (rate(db_client_connection_use_time_seconds_sum[5m])) "
            f"/ (sum by ({key}) (rate(db_client_connection_use_time_seconds_count[5m])) > 0)"
        ),
        "pool:db_client_connection_wait_time_seconds:mean5m": (
            f"sum by ({key}) (rate(db_client_connection_wait_time_seconds_sum[5m])) "
            f"/ (sum by ({key}) (rate(db_client_connection_wait_time_seconds_count[5m])) > 0)"
        ),
        "pool:db_client_connection_waited:ratio_rate5m": (
            f'1 - sum by ({key}) (rate({wait}_bucket{{le="0.001"}}[5m])) '
            f"/ (sum by ({key}) (rate({wait}_count[5m])) > 0)"
        ),
        "fleet:db_client_connection_max:sum": "sum(db_client_connection_max)",
        "fleet:pool_monitor_advice_recommended_connections:sum": (
            "sum(pool_monitor_advice_recommended_max_connections * pool_monitor_advice_processes "
            "and db_client_connection_max > 0)"
        ),
        "fleet:db_client_connection_max:budget_ratio": (
            "fleet:db_client_connection_max:sum "
            "/ (max(pg_max_connections) - max(pg_reserved_connections) > 0)"
        ),
    }
    # The waited bucket is monitor.sizing's threshold, a bucket bound of the histogram.
    assert WAITED_S in SECONDS_BUCKETS and f"{WAITED_S:g}" == "0.001"
    # The offered load is the existing hold rate, not a second copy of it.
    assert rules["pool:sqlalchemy_pool_hold_time_seconds:rate5m"] == (
        "pool:sqlalchemy_pool_sql_time_seconds:rate5m + "
        "pool:sqlalchemy_pool_idle_in_use_time_seconds:rate5m"
    )
    order = list(rules)
    assert order.index("fleet:db_client_connection_max:sum") < order.index(
        "fleet:db_client_connection_max:budget_ratio"
    )


def test_exemplars_need_a_range_query() -> None:
    with pytest.raises(ValueError, match="exemplars need a range query"):
        Q("x_bucket", instant=True, exemplar=True)
    with pytest.raises(ValueError, match="exemplars need a range query"):
        Q("x_bucket", instant=True, table=True, exemplar=True)
    assert Q("x_bucket", exemplar=True).build("A").build().exemplar is True


def test_threshold_lines_match_the_alert_defaults(models: dict[str, dict[str, Any]]) -> None:
    def line(board: str, title: str) -> float:
        panel = next(p for p in panels(models[board]) if p["title"] == title)
        steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        return float(steps[-1]["value"])

    assert line("pool-overview.json", "Saturation by process") == 0.9
    assert line("pool-overview.json", "Wait time p50 / p95 / p99") == 0.1
    assert line("sessions-and-code-sites.json", "SQL vs idle share of hold time") == 0.8
    assert line("postgresql.json", "Longest idle in transaction") == 30


def test_demo_dashboard_follows_the_code_site_convention(
    models: dict[str, dict[str, Any]],
) -> None:
    demo = models["demo-anti-pattern-vs-fix.json"]
    rows = [p["title"] for p in panels(demo) if p["type"] == "row"]
    assert rows == [
        "external_call: session held across an external API call (anti vs three_stage)",
        "pool_isolation: one pool for API requests and background jobs (shared vs split)",
        "duplicate_rows: scalar_one_or_none() over duplicate rows (unsafe vs safe)",
        "idempotent_payment: retried payments without an idempotency key (naive vs idempotent)",
        "lost_update: read-modify-write from two threads (naive vs pessimistic vs optimistic)",
        "shared_session: one Session shared with a heartbeat thread (shared vs factory)",
        "session_store: in-memory session store written by many threads (unlocked vs locked)",
    ]
    exprs = [e.expr for e in dashboard_expressions({"demo": demo})]
    assert exprs[0] == (
        'sum(rate(sqlalchemy_pool_site_use_time_seconds_total{namespace=~"$namespace", '
        'job=~"$job", service=~"$service", '
        'code_site=~"demo_app/scenarios/external_call.py:[0-9]+:anti_.*"}[$__rate_interval])) '
        "or vector(0)"
    )
    for variant in (
        "three_stage",
        "unsafe",
        "safe",
        "naive",
        "idempotent",
        "pessimistic",
        "optimistic",
        "shared",
        "factory",
    ):
        assert any(f":[0-9]+:{variant}_.*" in e for e in exprs), variant
    assert any('db_client_connection_pool_name="shared"' in e for e in exprs)
    assert any('db_client_connection_pool_name=~"api|background"' in e for e in exprs)
    assert any('lock_name="session-store"' in e for e in exprs)
    lost = next(
        p
        for p in panels(demo)
        if p["title"] == "Checkouts per second" and "lost_update" in p["targets"][0]["expr"]
    )
    assert [t["legendFormat"] for t in lost["targets"]] == [
        "anti-pattern: naive_*",
        "fix: pessimistic_*",
        "fix: optimistic_*",
    ]


def test_demo_dashboard_matches_the_demo_scenarios() -> None:
    """The dashboard's scenario table and the demo's must agree (names, variants, order)."""
    demo_scenarios = pytest.importorskip("demo_app.scenarios")
    from dashboards.boards.demo import SCENARIOS

    assert [(sc.key, sc.variants) for sc in SCENARIOS] == [
        (info.name, info.variants) for info in demo_scenarios.SCENARIOS.values()
    ]


# ----------------------------------------------------------------------------- metric names


def test_metric_name_extraction() -> None:
    assert metric_names(
        "histogram_quantile(0.95, sum by (le, db_client_connection_pool_name) "
        '(rate(db_client_connection_wait_time_seconds_bucket{job=~"$job"}[$__rate_interval])))'
    ) == {"db_client_connection_wait_time_seconds_bucket"}
    assert metric_names(
        'a{x="b c"} / ignoring(db_client_connection_state) group_left(kind) (b > 0) '
        "and on (job) c offset 5m or absent(pg_up) unless sum(d) without (instance) > bool 1e3"
    ) == {"a", "b", "c", "pg_up", "d"}
    assert metric_names(
        'label_replace(rate(x_total[1m]), "function", "$1", "code_site", ".*:([^:]+)")'
    ) == {"x_total"}
    assert metric_names("pool:db_client_connection_saturation:ratio > 0.9") == {
        "pool:db_client_connection_saturation:ratio"
    }
    assert metric_names("sum(x) or vector(0)") == {"x"}
    with pytest.raises(ValueError, match="__name__"):
        metric_names('{__name__="x"}')


def test_grafana_variable_substitution() -> None:
    assert substitute('rate(x{p=~"$pool", j=~"${job}"}[$__rate_interval])') == (
        'rate(x{p=~".*", j=~".*"}[1m])'
    )
    assert substitute('label_replace(x, "f", "$1", "s", "(.*)")[$__range]') == (
        'label_replace(x, "f", "$1", "s", "(.*)")[1h]'
    )
    assert label_values_metric('label_values(pg_up{job=~"$job"}, namespace)') == "pg_up"


def test_allowed_set_is_catalogue_plus_sidecar_plus_recordings() -> None:
    names = allowed_metric_names()
    assert "db_client_connection_wait_time_seconds_bucket" in names
    assert "db_client_connection_wait_time_seconds" not in names  # only the expanded series
    assert "sqlalchemy_pool_checkouts_total" in names
    assert "db_client_connection_idle_min" not in names  # semconv has it; we do not export it
    sidecar = {SNAPSHOT_ERRORS, SIDECAR_SCAN_AGE} | set(BLOCKING_SERIES) | set(ADVICE_SERIES)
    assert set(PG_SERIES) | sidecar <= names
    assert len(names) == sum(3 if m.kind == "histogram" else 1 for m in METRICS) + 23
    assert "pool:db_client_connection_saturation:ratio" not in names
    assert "pool:db_client_connection_saturation:ratio" in ALLOWED


def test_advice_series_are_the_ones_the_sidecar_exports() -> None:
    """`series.ADVICE_SERIES` spells the sidecar's `pool_monitor_advice_*` gauges: the
    families its collector yields (each one, even before the window has advice)."""
    from monitor.sidecar.advice import AdviceCollector, AdviceWindow

    exported = [f.name for f in AdviceCollector(AdviceWindow()).collect()]
    assert exported == list(ADVICE_SERIES)


def test_every_dashboard_query_reads_only_allowed_metrics(
    models: dict[str, dict[str, Any]],
) -> None:
    exprs = dashboard_expressions(models)
    assert len(exprs) >= 60
    bad = {
        e.source: sorted(metric_names(e.expr) - ALLOWED)
        for e in exprs
        if metric_names(e.expr) - ALLOWED
    }
    assert bad == {}
    assert all(metric_names(e.expr) for e in exprs), "an expression selects no series"
    used = set().union(*(metric_names(e.expr) for e in exprs))
    # Every catalogue metric shows up somewhere, directly or through a recording rule.
    from_rules = set().union(*(metric_names(e.expr) for e in rule_expressions(render_rules())))
    for metric in METRICS:
        stem = metric.prometheus_name
        assert any(n.startswith(stem) for n in used | from_rules), f"{stem} is on no dashboard"


def test_every_variable_and_rule_reads_only_allowed_metrics(
    models: dict[str, dict[str, Any]],
) -> None:
    for e in variable_queries(models) + rule_expressions(render_rules()):
        assert metric_names(e.expr) <= ALLOWED, e.source


# ----------------------------------------------------------------------------- rules


def _alerts(files: dict[str, str]) -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(files["alerts.yml"])
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"]}


def test_every_alert_has_for_severity_and_annotations() -> None:
    alerts = _alerts(render_rules())
    assert (
        list(alerts)
        == [a.alert for a in ALERTS]
        == [
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
            "PostgresCollectorDown",
            "PoolMonitorErrors",
            "PoolMonitorSidecarScanStale",
        ]
    )
    for name, rule in alerts.items():
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), name
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}, name
        assert rule["annotations"]["runbook_url"].endswith(f"/dashboards/README.md#{name.lower()}")
    assert alerts["PoolSaturated"]["expr"] == "pool:db_client_connection_saturation:ratio > 0.9"
    assert alerts["PostgresCollectorDown"]["expr"] == "pg_up == 0 or absent(pg_up)"
    assert alerts["PoolMonitorErrors"]["expr"] == "increase(pool_monitor_errors_total[10m]) > 0"


def test_overrides_change_thresholds_durations_and_severity() -> None:
    files = render_rules(
        thresholds={"pool_saturation_ratio": 0.75, "pg_idle_in_transaction_seconds": 120},
        for_={"PoolSaturated": "30s"},
        severity={"PoolSaturated": "critical"},
        disabled={"PostgresCollectorDown"},
        runbook_base_url="https://runbooks.example/pool.md",
    )
    alerts = _alerts(files)
    assert alerts["PoolSaturated"]["expr"] == "pool:db_client_connection_saturation:ratio > 0.75"
    assert alerts["PoolSaturated"]["for"] == "30s"
    assert alerts["PoolSaturated"]["labels"] == {"severity": "critical"}
    assert (
        "above 75% of the pool's maximum" in alerts["PoolSaturated"]["annotations"]["description"]
    )
    assert alerts["PoolSaturated"]["annotations"]["runbook_url"] == (
        "https://runbooks.example/pool.md#poolsaturated"
    )
    assert alerts["PostgresIdleInTransactionTooLong"]["expr"] == (
        "pg_app_idle_in_transaction_max_seconds > 120"
    )
    assert "PostgresCollectorDown" not in alerts
    assert files["recording.yml"] == render_rules()["recording.yml"]


def test_template_values_pass_through_for_helm() -> None:
    alerts = _alerts(
        render_rules(
            thresholds={"pool_saturation_ratio": "{{ .Values.alerts.poolSaturated.threshold }}"},
            for_={"PoolSaturated": "{{ .Values.alerts.poolSaturated.for }}"},
        )
    )
    assert alerts["PoolSaturated"]["expr"] == (
        "pool:db_client_connection_saturation:ratio > {{ .Values.alerts.poolSaturated.threshold }}"
    )
    assert alerts["PoolSaturated"]["for"] == "{{ .Values.alerts.poolSaturated.for }}"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"thresholds": {"pool_saturation": 0.9}}, "unknown threshold name(s) pool_saturation"),
        ({"thresholds": {"pool_saturation_ratio": 1.5}}, "is a ratio in [0, 1]"),
        ({"thresholds": {"pending_requests": -1}}, "must be >= 0"),
        ({"thresholds": {"pending_requests": "3"}}, "must be a number"),
        ({"for_": {"PoolSaturated": "5 minutes"}}, "must be a Prometheus duration"),
        ({"for_": {"PoolSaturated": ""}}, "must be a Prometheus duration"),
        ({"for_": {"NoSuchAlert": "5m"}}, "unknown alert (for) name(s) NoSuchAlert"),
        ({"severity": {"PoolSaturated": "page"}}, "must be one of info, warning, critical"),
        ({"disabled": {"PoolSaturatd"}}, "unknown alert (disabled) name(s) PoolSaturatd"),
    ],
)
def test_bad_overrides_are_rejected_with_a_useful_message(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(OverrideError) as excinfo:
        render_rules(**kwargs)
    assert message in str(excinfo.value)


def test_every_threshold_is_used_by_an_alert() -> None:
    used = {t for a in ALERTS for t in a.thresholds}
    assert used == {t.name for t in THRESHOLDS}


# ----------------------------------------------------------------------------- docs


def _github_anchors(markdown: str) -> set[str]:
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", markdown, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_readme_has_a_runbook_for_every_alert_and_documents_every_dashboard(
    models: dict[str, dict[str, Any]],
) -> None:
    readme = (PKG / "README.md").read_text(encoding="utf-8")
    anchors = _github_anchors(readme)
    for rule in _alerts(render_rules()).values():
        anchor = rule["annotations"]["runbook_url"].split("#")[1]
        assert anchor in anchors, f"README has no '### {rule['alert']}' runbook section"
        section = readme.split(f"### {rule['alert']}\n")[1].split("\n### ")[0]
        assert "**Check**" in section and "**Fix**" in section, rule["alert"]
    for model in models.values():
        assert model["title"].split(" / ")[1] in readme
    for rel in (
        "provisioning/datasources/pool-monitor.yml",
        "provisioning/dashboards/pool-monitor.yml",
    ):
        assert rel in readme


def test_provisioning_files_load_the_generated_dashboards(
    models: dict[str, dict[str, Any]],
) -> None:
    ds = yaml.safe_load((PKG / "provisioning/datasources/pool-monitor.yml").read_text())
    assert ds["apiVersion"] == 1
    [source] = ds["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy"
    assert source["url"] == "${POOL_MONITOR_PROMETHEUS_URL}"
    assert source["isDefault"] is False
    # The exemplar dots' trace_id links to a Tempo data source and/or a trace URL, both
    # from Grafana's environment (expanded once, so a URL may hold ${__value.raw} as is).
    assert source["jsonData"]["exemplarTraceIdDestinations"] == [
        {
            "name": "trace_id",
            "datasourceUid": "${POOL_MONITOR_TRACE_DATASOURCE_UID}",
            "url": "${POOL_MONITOR_TRACE_LINK_URL}",
            "urlDisplayLabel": "Open trace",
        }
    ]
    providers = yaml.safe_load((PKG / "provisioning/dashboards/pool-monitor.yml").read_text())
    [provider] = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/pool-monitor"
    # Dashboards carry no numeric id (Grafana assigns one) and reach the data source only
    # through the variable, so the provisioned source is picked up whatever its uid.
    for model in models.values():
        assert "id" not in model
        assert json.dumps(model).count("pool-monitor-prometheus") == 0
