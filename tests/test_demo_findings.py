"""The monitor's findings in the demo report, and the charts' legends and notes.

No database, no network: the monitor's log records go through the real logging handler
into a file and back; snapshots and timelines are built by hand, shaped like the monitor's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from demo_app import charts, events, findings, report, runner
from demo_app.drivers import Measured
from demo_app.sampler import Span, TimelinePoint
from demo_app.snapshots import (
    CHECKOUTS,
    CONCURRENT,
    CROSS_THREAD,
    IDLE_IN_USE,
    SITE_CHECKOUTS,
    SITE_IDLE_TIME,
    SITE_USE_TIME,
    TIMEOUTS,
    USE_TIME,
)

ANTI_SITE = "demo_app/scenarios/external_call.py:38:anti_process_image"
FIX_SITE = "demo_app/scenarios/external_call.py:55:three_stage_process_image"
STACK = [
    "demo_app/routes.py:122:external_call_image",
    "demo_app/scenarios/external_call.py:40:anti_process_image",
    "demo_app/clients.py:62:process_image",
]
BOUNDS = [0.001, 0.01, 0.1, 1.0, 2.5]


def _hist(counts: list[int], total: float) -> dict[str, Any]:
    return {"bounds": list(BOUNDS), "counts": counts, "sum": total, "count": sum(counts)}


def _delta(sites: dict[str, tuple[int, float, float]], **counters: Any) -> dict[str, Any]:
    """A pool's window: site → (checkouts, use s, idle-in-use s), plus other counters."""
    use = sum(u for _, u, _ in sites.values())
    return {
        "counters": {
            CHECKOUTS: sum(n for n, _, _ in sites.values()),
            TIMEOUTS: counters.pop("timeouts", 0),
            IDLE_IN_USE: sum(i for _, _, i in sites.values()),
            SITE_CHECKOUTS: {s: n for s, (n, _, _) in sites.items()},
            SITE_USE_TIME: {s: u for s, (_, u, _) in sites.items()},
            SITE_IDLE_TIME: {s: i for s, (_, _, i) in sites.items()},
            **counters,
        },
        "histograms": {USE_TIME: _hist([0, 0, 0, 0, 0, len(sites)], use)},
    }


@pytest.fixture
def monitor_log(tmp_path: Path) -> Path:
    """The monitor's records for an `anti` window, written as the demo service writes them."""
    path = tmp_path / "monitor-events.jsonl"
    with events.capture(str(path)):
        long_held = logging.getLogger(events.LONG_HELD)
        for age in (1.02, 1.09):
            long_held.warning(
                "pool 'api': connection held for %.3f s",
                age,
                extra={
                    "pool": "api",
                    "age_s": age,
                    "site": ANTI_SITE,
                    "stack": STACK,
                    "thread_name": "MainThread",
                    "task_name": "Task-8",
                    "backend_pid": 7,
                },
            )
        long_held.info(
            "pool 'api': long-held connection from %s returned",
            ANTI_SITE,
            extra={"pool": "api", "site": ANTI_SITE, "held_s": 2.049},
        )
        logging.getLogger(events.MISUSE).warning(
            "pool 'worker': connection used by two threads",
            extra={
                "pool": "worker",
                "misuse": "cross_thread",
                "checkout_thread": "'w'",
                "use_thread": "'w'",
                "other_thread": "'heartbeat'",
                "checkout_site": "s.py:1:shared_run",
                "use_site": "s.py:2:shared_run",
            },
        )
    return path


def test_the_services_monitor_records_keep_their_structured_fields(monitor_log: Path) -> None:
    records = events.read(monitor_log)
    assert [r["logger"] for r in records] == [events.LONG_HELD] * 3 + [events.MISUSE]
    first = records[0]
    assert first["site"] == ANTI_SITE and first["stack"] == STACK and first["age_s"] == 1.02
    assert first["level"] == "WARNING" and isinstance(first["pid"], int)
    assert records[2]["level"] == "INFO" and records[2]["held_s"] == 2.049
    assert records[3]["use_site"] == "s.py:2:shared_run"
    # capture() restored the loggers: nothing more goes to the file
    logging.getLogger(events.LONG_HELD).warning("after", extra={"site": "x"})
    assert len(events.read(monitor_log)) == 4
    assert logging.getLogger(events.LONG_HELD).level == logging.NOTSET
    monitor_log.write_text(monitor_log.read_text() + "not json\n{}\n")
    assert len(events.read(monitor_log)) == 4  # unreadable lines are skipped


def _external_call_results(monitor_log: Path) -> dict[str, Any]:
    records = events.read(monitor_log)
    t0 = records[0]["time"] - 1
    windows = {
        "external_call/anti": Measured(
            {
                "api": _delta(
                    {ANTI_SITE: (36, 72.5, 72.4)},
                    timeouts=461,
                    **{findings.LONG_HELD_EVENTS: {ANTI_SITE: 36}},
                )
            },
            t0,
            records[-1]["time"],
            True,
        ),
        "external_call/three_stage": Measured(
            {"api": _delta({FIX_SITE: (589, 1.96, 1.2)})}, t0 + 100, t0 + 110, True
        ),
    }
    results: dict[str, Any] = {"external_call": {"anti": {}, "three_stage": {}}}
    findings.collect(results, windows, records)
    return results


def test_findings_name_sites_share_without_sql_and_the_long_held_stack(
    monitor_log: Path,
) -> None:
    results = _external_call_results(monitor_log)
    anti = results["external_call"]["anti"]["findings"]
    assert anti["sites"] == [
        {
            "pool": "api",
            "site": ANTI_SITE,
            "checkouts": 36,
            "hold_s": 72.5,
            "mean_hold_s": pytest.approx(72.5 / 36),
            "no_sql_share": pytest.approx(72.4 / 72.5),
            "long_held_alerts": 36,
            "cross_thread_uses": 0,
            "concurrent_uses": 0,
        }
    ]
    assert anti["long_held"] == [
        {
            "pool": "api",
            "site": ANTI_SITE,
            "alerts": 2,
            "age_at_alert_max_s": 1.09,
            "workers": 1,
            "held_max_s": 2.049,
            "stack": STACK,
            "stack_share": 1.0,
            "other_stacks": 0,
        }
    ]
    assert anti["pools"]["api"]["timeouts"] == 461
    fixed = results["external_call"]["three_stage"]["findings"]
    assert fixed["long_held"] == [] and fixed["long_held_alerts"] == 0
    assert fixed["sites"][0]["site"] == FIX_SITE


def test_report_markdown_and_json_show_the_monitor_first(monitor_log: Path, tmp_path: Path) -> None:
    results = _external_call_results(monitor_log)
    doc = {
        "plan": "quick",
        "workers": 2,
        "duration_s": 60.0,
        "scenarios": results,
        "settings": {"external_latency_s": 2.0, "long_held_threshold_s": 1.0, "pools": []},
        "notes": {"external_call": "a note"},
    }
    markdown = report.render_markdown(doc, [])
    section = markdown.split("## external_call (seed 002)")[1]
    assert section.index("pool-monitor: code sites") < section.index("the app: requests")
    assert (
        f"| anti | `{ANTI_SITE}` | 36 | 72.50 s | 2.01 s | 100% | 36 |" in section
    )  # share without SQL 99.9%, rounded
    assert (
        f"| anti | 2 | 2.05 s | `{ANTI_SITE}`<br>→<br>`demo_app/routes.py:122:"
        "external_call_image`<br>`demo_app/scenarios/external_call.py:40:anti_process_image`"
        "<br>`demo_app/clients.py:62:process_image` |" in section
    )
    assert "| three_stage | 0 | – | none |" in section
    assert "> **Note.** a note" in section
    report.write_json(doc, tmp_path / "report.json")
    saved = json.loads((tmp_path / "report.json").read_text())
    alert = saved["scenarios"]["external_call"]["anti"]["findings"]["long_held"][0]
    assert (
        alert["site"] == ANTI_SITE and alert["stack"][-1] == "demo_app/clients.py:62:process_image"
    )


def test_terminal_shows_description_monitor_tables_then_the_apps(monitor_log: Path) -> None:
    results = _external_call_results(monitor_log)
    results["external_call"]["anti"].update(requests_ok=36, requests_failed=461)
    doc = {"scenarios": results, "settings": {"long_held_threshold_s": 1.0}, "notes": {}}
    console = Console(width=120, record=True, color_system=None)
    runner.print_scenario(console, "external_call", results["external_call"], doc)
    text = console.export_text()
    assert "external_call (seed 002): session held across a slow external call vs the " in text
    order = [
        text.index(s)
        for s in (
            "code sites by hold time",
            "long-held alerts (held over 1 s)",
            "the app: requests",
        )
    ]
    assert order == sorted(order)
    for line in [ANTI_SITE, *STACK]:
        assert line in text  # whole, not folded, in 120 columns


def test_misuse_joins_counters_with_the_warning_and_locks_come_from_histograms(
    monitor_log: Path,
) -> None:
    records = events.read(monitor_log)
    worker = _delta(
        {"s.py:1:shared_run": (3, 0.2, 0.1)},
        **{CROSS_THREAD: {"s.py:2:shared_run": 5}, CONCURRENT: {"s.py:3:shared_run": 2}},
    )
    found = findings.variant_findings({"worker": worker}, records, {})
    assert found["misuse"] == [
        {
            "pool": "worker",
            "kind": "cross_thread",
            "use_site": "s.py:2:shared_run",
            "uses": 5,
            "checkout_site": "s.py:1:shared_run",
            "threads": ["'w'", "'heartbeat'"],
            "warning": "pool 'worker': connection used by two threads",
        },
        {"pool": "worker", "kind": "concurrent", "use_site": "s.py:3:shared_run", "uses": 2},
    ]
    waits = {"bounds": BOUNDS, "counts": [100, 60, 40, 0, 0, 0], "sum": 0.8, "count": 200}
    locked = findings.variant_findings(
        {},
        [],
        {"lock_name": "session-store", "lock_wait_histogram": waits, "lock_hold_histogram": waits},
    )
    assert locked["locks"][0]["acquisitions"] == 200
    assert locked["locks"][0]["waited_over_1ms_share"] == pytest.approx(0.5)
    markdown = "\n".join(
        findings.markdown_section(s)
        for s in findings.sections(
            {
                "unlocked": {"findings": findings.variant_findings({}, [], {})},
                "locked": {"findings": locked},
            }
        )
    )
    assert "| unlocked | no monitor.lock: nothing to time |" in markdown
    assert "| locked | `session-store` | 200 | 50% | 4.0 ms |" in markdown


def test_records_go_to_the_window_they_fell_in() -> None:
    windows = {"a/x": Measured({}, 10.0, 20.0, True), "a/y": Measured({}, 20.5, 30.0, True)}
    records = [{"time": t} for t in (5.0, 10.0, 20.4, 20.6, 30.9, 32.0)]
    split = findings.split_records(records, windows)
    assert [r["time"] for r in split["a/x"]] == [10.0, 20.4]
    assert [r["time"] for r in split["a/y"]] == [20.6, 30.9]


# --- charts -------------------------------------------------------------------------------


def _legend_texts(ax: Any) -> list[str]:
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def test_hold_time_legend_gives_means_in_milliseconds() -> None:
    hist_anti = _hist([0, 0, 0, 0, 36, 0], 74.124)
    hist_fix = _hist([100, 489, 0, 0, 0, 0], 1.6082)
    scenarios = {
        "external_call": {
            "anti": {"monitor": {"use_time_histogram": hist_anti}},
            "three_stage": {"monitor": {"use_time_histogram": hist_fix}},
        }
    }
    fig = charts.hold_time_figure(scenarios)
    ax = fig.axes[0]
    assert _legend_texts(ax) == [
        "anti (n=36, mean 2,059 ms)",
        "three_stage (n=589, mean 2.73 ms)",
    ]
    assert ax.get_xlabel() == "hold time, ms (bucket upper bound)"
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["≤1", "≤10", "≤100", "≤1,000", "≤2,500"]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(2.0593, "2,059 ms"), (0.0547, "54.7 ms"), (0.003289, "3.29 ms"), (0.00042, "0.42 ms")],
)
def test_milliseconds_have_sensible_precision(seconds: float, text: str) -> None:
    assert charts.ms(seconds) == text


def _timeline() -> tuple[list[TimelinePoint], list[Span]]:
    """idempotent_payment: the fix has more callers waiting than the anti-pattern."""
    spans = [
        Span("idempotent_payment/naive", 0.0, 5.95),
        Span("idempotent_payment/idempotent", 6.0, 12.0),
    ]
    points = []
    for i in range(120):
        t = i * 0.1
        waiting = 5 if t < 6 else 30
        points.append(
            TimelinePoint(t, {"api": {"used": 6, "idle": 0, "max": 6, "pending": waiting}})
        )
    return points, spans


def test_pool_usage_legend_names_the_capacity_lines_and_shows_the_note() -> None:
    points, spans = _timeline()
    fig = charts.pool_usage_figure(points, spans, {"idempotent_payment": "on purpose"})
    ax = fig.axes[0]
    assert _legend_texts(ax) == ["api: in use", "api: waiting", "api: capacity (6)"]
    dotted = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert [line.get_label() for line in dotted] == ["api: capacity (6)"]
    assert ax.get_title(loc="right") == "note: on purpose"
    assert ax.get_title(loc="left") == "idempotent_payment"


def test_a_fix_with_more_waiting_callers_gets_an_explanation() -> None:
    points, spans = _timeline()
    waiting = charts.waiting_by_variant(points, spans)
    assert waiting["idempotent_payment"]["naive"] == {"peak": 5.0, "mean": pytest.approx(5.0)}
    assert waiting["idempotent_payment"]["idempotent"]["peak"] == 30.0
    scenarios = {
        "idempotent_payment": {
            "naive": {"requests": 60, "keys": 20, "charges": 60, "monitor": {"checkouts": 140}},
            "idempotent": {
                "requests": 389,
                "keys": 20,
                "charges": 20,
                "conflicts_409": 329,
                "monitor": {"checkouts": 798},
            },
        }
    }
    notes = findings.waiting_notes(scenarios, waiting)
    text = notes["idempotent_payment"]["text"]
    assert "`idempotent` peak 30" in text and "`naive` peak 5" in text
    assert "ON CONFLICT DO NOTHING` waits inside PostgreSQL for the owner's transaction" in text
    assert "keeps more callers waiting for a connection than `naive`" in text
    assert "389 requests and 798 checkouts vs 60 and 140 for `naive`" in text
    assert "on purpose" in notes["idempotent_payment"]["short"]
    # the other way round, no note
    flipped = {
        "idempotent_payment": {
            "naive": waiting["idempotent_payment"]["idempotent"],
            "idempotent": waiting["idempotent_payment"]["naive"],
        }
    }
    assert findings.waiting_notes(scenarios, flipped) == {}
