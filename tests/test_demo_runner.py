"""End to end: `pool-monitor demo --quick --no-serve`, for short scenarios and in full.

Real processes: the fake external API and the demo service (two uvicorn workers) on
127.0.0.1, on the session's PostgreSQL (passed as DATABASE_URL).
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import pytest

import demo_app
from demo_app import clients, runner
from demo_app.scenarios import SCENARIOS, external_call
from demo_app.stack import sidecar_available

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _site(function: Any, marker: str) -> str:
    """`file:line:function` of the line of `function` that contains `marker`, as the
    monitor names code sites and stack frames (paths relative to the project)."""
    lines, first = inspect.getsourcelines(function)
    (offset,) = [i for i, line in enumerate(lines) if marker in line]
    path = Path(inspect.getfile(function)).relative_to(Path(demo_app.__file__).parent.parent)
    return f"{path.as_posix()}:{first + offset}:{function.__name__}"


def test_quick_run_writes_report_json_markdown_and_charts(
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    argv = ["--quick", "--no-serve", "--report-dir", str(tmp_path), "--base-port", "0"]
    argv += ["--scenario", "lost_update", "--scenario", "shared_session"]

    status = runner.main(argv)

    report = json.loads((tmp_path / "report.json").read_text())
    assert status == 0, [c for c in report["checks"] if not c["passed"]]
    assert report["passed"] is True and report["workers"] == 2
    assert list(report["scenarios"]) == ["lost_update", "shared_session"]

    lost = report["scenarios"]["lost_update"]
    assert list(lost) == ["naive", "pessimistic", "optimistic"]
    for figures in lost.values():
        assert {"expected", "actual", "retries", "lock_wait_max_s"} <= set(figures)
        assert figures["expected"] == 50
        assert figures["monitor"]["checkouts"] > 0  # the monitor saw the worker pool
    assert lost["naive"]["actual"] < 50
    assert lost["pessimistic"]["actual"] == lost["optimistic"]["actual"] == 50

    sessions = report["scenarios"]["shared_session"]
    assert {"cross_thread_uses", "errors"} <= set(sessions["shared"])
    assert sessions["shared"]["cross_thread_uses"] > 0
    assert sessions["factory"]["cross_thread_uses"] == sessions["factory"]["errors"] == 0

    assert {c["scenario"] for c in report["checks"]} == {"lost_update", "shared_session"}
    assert report["timeline"] and {"worker", "api"} <= set(report["timeline"][-1]["pools"])
    assert [s["label"] for s in report["spans"]][:1] == ["lost_update/naive"]

    assert report["charts"] == ["hold_times.png", "pool_usage.png"]
    for chart in report["charts"]:
        data = (tmp_path / chart).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.startswith("# pool-monitor demo report")
    assert "## lost_update (seed 003)" in markdown and "![hold_times.png]" in markdown
    assert (tmp_path / "logs" / "service.log").exists()

    # What the monitor saw, first in each scenario: the shared session's misuse, by site.
    misuse = sessions["shared"]["findings"]["misuse"]
    assert misuse and sessions["factory"]["findings"]["misuse"] == []
    assert all(m["use_site"].startswith("demo_app/scenarios/shared_session.py:") for m in misuse)
    assert {m["kind"] for m in misuse} <= {"cross_thread", "concurrent"}
    assert sum(m["uses"] or 0 for m in misuse) == (
        sessions["shared"]["cross_thread_uses"] + sessions["shared"]["concurrent_uses"]
    )
    assert any(m.get("checkout_site") for m in misuse)  # from the monitor.misuse warning
    sites = lost["naive"]["findings"]["sites"]
    assert sites[0]["site"].endswith(":naive_increase_like") and sites[0]["checkouts"] == 50
    assert 0 <= sites[0]["no_sql_share"] <= 1
    section = markdown.split("## shared_session (seed 000)")[1]
    assert section.index("**pool-monitor: misuse") < section.index("**the app: requests")
    assert "| shared | cross-thread |" in section or "| shared | concurrent |" in section
    assert (tmp_path / "logs" / "monitor-events.jsonl").exists()

    # Each variant's slowest hold names the request's trace (the increment threads run in
    # its context), found in the workers' span files: the server span that served it.
    assert report["traces"]["span_files"] and all(
        (tmp_path / name).exists() for name in report["traces"]["span_files"]
    )
    for figures in lost.values():
        hold = figures["findings"]["slowest_hold"]
        assert hold["pool"] == "worker", hold
        assert re.fullmatch(r"[0-9a-f]{32}", hold["trace_id"]), hold
        assert hold["trace"]["in_span_file"] is True, hold
        assert hold["trace"]["server_span"]["name"] == "POST /lost_update/{variant}/run"
        assert hold["trace"]["pool_wait"]["pool"] == "worker"
    naive_trace = lost["naive"]["findings"]["slowest_hold"]["trace_id"]
    assert "**pool-monitor: slowest hold and its trace**" in markdown
    assert f"`{naive_trace}`" in markdown.split("## lost_update (seed 003)")[1]

    # Sizing: Erlang C against the run's own measurement, and advice for its pools.
    check = report["sizing"]["validation"]
    assert check["size"] == 4 and [round(r["offered_load"]) for r in check["rows"]] == [1, 2, 3]
    for row in check["rows"]:
        assert row["checkouts"] > 0
        assert abs(row["p_wait_predicted"] - row["p_wait_measured"]) < 0.15, row
    advised = {p["pool"]: p for p in report["sizing"]["pools"]}
    assert advised["worker"]["processes"] == 2 and advised["worker"]["checkouts"] > 0
    assert advised["worker"]["size"] is not None
    sizing_md = markdown.split("## Sizing")[1]
    assert "| 4 | " in sizing_md and "| `worker` |" in sizing_md

    # The terminal: each scenario under its description, the monitor's tables before the
    # app's, and the PNG files on the last line.
    out = capsys.readouterr().out
    assert "lost_update (seed 003): read-modify-write from 2 threads" in out
    shown = out.split("shared_session (seed 000): one Session shared")[1]
    assert shown.index("pool-monitor: misuse") < shown.index("the app: requests, database")
    assert naive_trace in out.split("lost_update (seed 003)")[1]
    last = out.strip().splitlines()[-1]
    assert last == "charts: " + ", ".join(str(tmp_path / chart) for chart in report["charts"])
    if sidecar_available():  # issue 5's sidecar merges the two workers' snapshots
        assert report["sidecar"]["url"], report["sidecar"]["note"]


def test_pool_monitor_demo_quick_demonstrates_every_claim(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 4's "done when": `pool-monitor demo --quick --no-serve` holds every claim.

    The slowest test of the suite (about 70 s: two 10 s load windows per load scenario).
    """
    from monitor.cli import main as pool_monitor

    monkeypatch.setenv("DATABASE_URL", database_url)
    argv = ["demo", "--quick", "--no-serve", "--report-dir", str(tmp_path), "--base-port", "0"]

    status = pool_monitor(argv)

    report = json.loads((tmp_path / "report.json").read_text())
    failed = [c for c in report["checks"] if not c["passed"]]
    assert status == 0 and not failed, failed
    assert set(report["scenarios"]) == set(SCENARIOS)
    assert {c["scenario"] for c in report["checks"]} == set(SCENARIOS)
    shape = {
        "external_call": {
            "requests_ok",
            "requests_failed",
            "pool_timeouts",
            "use_time_mean_s",
            "use_time_p99_s",
            "throughput_rps",
        },
        "pool_isolation": {
            "api_requests_ok",
            "api_requests_failed",
            "api_latency_p99_s",
            "api_wait_time_p99_s",
        },
        "lost_update": {"expected", "actual", "retries", "lock_wait_max_s"},
        "shared_session": {"cross_thread_uses", "errors"},
        "duplicate_rows": {"requests", "errors"},
        "session_store": {"writes", "lost_writes", "lock_wait_p99_s"},
        "idempotent_payment": {"requests", "keys", "charges"},
    }
    for scenario, keys in shape.items():
        variants = report["scenarios"][scenario]
        assert tuple(variants) == SCENARIOS[scenario].variants
        for figures in variants.values():
            assert keys <= set(figures), (scenario, keys - set(figures))
    assert report["charts"] == ["hold_times.png", "pool_wait.png", "pool_usage.png"]
    assert all((tmp_path / chart).read_bytes().startswith(PNG_MAGIC) for chart in report["charts"])

    # The anti-pattern's long-held alert names its checkout site and, in the holder's
    # stack, the external call it is waiting in; the fix raises none.
    checkout = _site(external_call.anti_process_image, "await session.flush()")
    in_scenario = _site(external_call.anti_process_image, "processor.process_image(url)")
    in_client = _site(clients.ImageProcessorClient.process_image, "self._http.post(")
    assert checkout.startswith("demo_app/scenarios/external_call.py:")
    calls = report["scenarios"]["external_call"]
    (alert,) = calls["anti"]["findings"]["long_held"]
    assert alert["pool"] == "api" and alert["site"] == checkout
    assert alert["stack"][-2:] == [in_scenario, in_client]
    assert alert["alerts"] == calls["anti"]["findings"]["sites"][0]["long_held_alerts"] > 0
    assert calls["anti"]["findings"]["sites"][0]["no_sql_share"] > 0.9
    assert calls["three_stage"]["findings"]["long_held"] == []
    markdown = (tmp_path / "report.md").read_text()
    section = markdown.split("## external_call (seed 002)")[1].split("\n## ")[0]
    assert f"`{checkout}`<br>→<br>" in section and f"`{in_scenario}`<br>`{in_client}` |" in section
    assert "| three_stage | 0 | – | none |" in section
    # The slowest hold's trace: the anti-pattern's from its long-held warning, the fix's
    # from the use-time exemplars, each found in the span files with its server span.
    slowest = calls["anti"]["findings"]["slowest_hold"]
    assert "long_held" in slowest["sources"] and slowest["site"] == checkout
    assert slowest["held_s"] >= 2.0 * 0.9 and re.fullmatch(r"[0-9a-f]{32}", slowest["trace_id"])
    assert slowest["trace"]["server_span"]["name"] == "POST /external_call/{variant}/images"
    assert slowest["trace"]["pool_wait"]["pool"] == "api"
    assert f"`{slowest['trace_id']}`" in section
    fixed = calls["three_stage"]["findings"]["slowest_hold"]
    assert fixed["sources"] == ["exemplar"] and fixed["trace"]["in_span_file"] is True
    # The exhausted pools' refused checkouts are failed pool.wait spans in their traces.
    assert calls["anti"]["findings"]["pool_wait_spans"]["errors"] > 0
    isolation = report["scenarios"]["pool_isolation"]
    assert isolation["shared"]["findings"]["pool_wait_spans"]["errors"] > 0
    # seed 001: the locked store's lock contention, from app.lock.wait_time
    (lock,) = report["scenarios"]["session_store"]["locked"]["findings"]["locks"]
    assert lock["lock"] == "session-store" and lock["acquisitions"] >= 400
    assert "**pool-monitor: lock contention**" in markdown


def test_cli_rejects_unknown_scenarios_and_bad_latency() -> None:
    with pytest.raises(SystemExit):
        runner.parse_args(["--scenario", "nope"])
    with pytest.raises(SystemExit):
        runner.parse_args(["--external-latency", "0"])
    args = runner.parse_args(["--quick", "--scenario", "lost_update"])
    assert args.quick and args.scenario == ["lost_update"] and not args.no_serve
    assert args.report_dir == Path("demo-report")
