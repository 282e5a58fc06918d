"""report.json and report.md of a demo run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from demo_app import findings, sizing, traces
from demo_app.checks import Check
from demo_app.scenarios import SCENARIOS
from demo_app.tables import markdown_table


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become null (json.dumps would write invalid JSON otherwise)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(report: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(_clean(report), indent=2, sort_keys=False) + "\n")
    return path


def render_markdown(report: dict[str, Any], checks: list[Check]) -> str:
    passed = sum(c.passed for c in checks)
    lines = [
        "# pool-monitor demo report",
        "",
        f"Plan `{report['plan']}`, {report['workers']} service workers, external latency "
        f"{report['settings']['external_latency_s']} s, run took {report['duration_s']:.0f} s. "
        f"Checks passed: **{passed}/{len(checks)}**.",
        "",
        "Pools (per worker): "
        + ", ".join(
            f"`{p['name']}` {p['size']}+{p['max_overflow']} (timeout {p['timeout_s']:g} s)"
            for p in report["settings"]["pools"]
        ),
        "",
        "## Checks",
        "",
    ]
    lines += [
        f"- {'✅' if c.passed else '❌'} **{c.scenario}**: {c.claim} — {c.detail}" for c in checks
    ]
    lines += [
        "",
        "Each scenario below shows first what pool-monitor saw — from every worker's pool "
        "snapshots over the variant's window, merged as the sidecar merges them, and from "
        "the monitor's own log records (`monitor.long_held`, `monitor.misuse`, written by "
        "the service to `logs/monitor-events.jsonl`) — then the app's own numbers (clients "
        "and database). The service is traced with OpenTelemetry (service "
        f"`{traces.SERVICE_NAME}`): each worker writes its finished spans to "
        "`logs/spans-<pid>.jsonl`, and the slowest hold of each variant names its trace.",
    ]
    threshold = report["settings"].get("long_held_threshold_s")
    for name, figures in report["scenarios"].items():
        info = SCENARIOS[name]
        lines += ["", f"## {name} (seed {info.seed})", "", info.summary, ""]
        if "error" in figures:
            lines.append(f"**Failed to run:** `{figures['error']}`")
            continue
        for section in findings.sections(figures, threshold):
            lines += [findings.markdown_section(section), ""]
        lines += ["**the app: requests, database, clients**", "", markdown_table(name, figures)]
        note = report.get("notes", {}).get(name)
        if note:
            lines += ["", f"> **Note.** {note}"]
    lines += _sizing_section(report.get("sizing"))
    lines += ["", "## Charts", ""]
    lines += [f"![{chart}]({chart})" for chart in report.get("charts", [])]
    return "\n".join(lines) + "\n"


def _sizing_section(found: dict[str, Any] | None) -> list[str]:
    """How big the pools should be (monitor.sizing), from this run's own measurements."""
    if not found:
        return []
    check = found["validation"]
    return [
        "",
        "## Sizing",
        "",
        f"**Erlang C against measurement.** A pool of {check['size']} connections driven "
        f"with Poisson arrivals and exponential holds of {check['mean_hold_s'] * 1000:g} ms "
        f"for {check['duration_s']:g} s per load. The prediction uses the measured rate and "
        "hold; the measurement is the monitor's wait-time histogram (a wait is ≥ 1 ms).",
        "",
        sizing.markdown(check["rows"]),
        f"**The demo's pools over the whole run** ({found['window_s']:.0f} s, anti-patterns "
        "and fixes together, so pools the anti-patterns exhausted say so): what "
        "`/api/advice` and `pool-monitor advise` would answer.",
        "",
        sizing.advice_markdown(found["pools"]),
    ]


def write_markdown(report: dict[str, Any], checks: list[Check], path: Path) -> Path:
    path.write_text(render_markdown(report, checks))
    return path
