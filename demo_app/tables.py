"""The side-by-side table: one row per figure, one column per variant (anti-pattern first).

Shared by the terminal (rich) and report.md, so both show the same rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.table import Table

from demo_app.scenarios import SCENARIOS

Row = tuple[str, str, Callable[[Any], str]]


def _seconds(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"


def _num(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.2f}"


def _share(v: Any) -> str:
    return "–" if v is None else f"{v:.0%}"


def _rate(v: Any) -> str:
    return "–" if v is None else f"{v:.2f}/s"


ROWS: dict[str, list[Row]] = {
    "external_call": [
        ("requests ok", "requests_ok", _num),
        ("requests failed", "requests_failed", _num),
        ("pool timeouts", "pool_timeouts", _num),
        ("hold time mean", "use_time_mean_s", _seconds),
        ("hold time p99", "use_time_p99_s", _seconds),
        ("held but idle (no SQL)", "idle_in_use_share", _share),
        ("throughput", "throughput_rps", _rate),
        ("latency p99 (ok)", "latency_p99_s", _seconds),
    ],
    "pool_isolation": [
        ("API requests ok", "api_requests_ok", _num),
        ("API requests failed", "api_requests_failed", _num),
        ("API latency p99", "api_latency_p99_s", _seconds),
        ("API pool wait p99", "api_wait_time_p99_s", _seconds),
        ("API pool", "api_pool", str),
        ("jobs ok / failed", "jobs", str),
        ("job hold mean", "job_hold_mean_s", _seconds),
    ],
    "duplicate_rows": [
        ("lookups", "requests", _num),
        ("errors", "errors", _num),
        ("duplicated task ids", "duplicated_tasks", _num),
    ],
    "idempotent_payment": [
        ("requests", "requests", _num),
        ("keys", "keys", _num),
        ("charges", "charges", _num),
        ("keys charged > once", "keys_charged_more_than_once", _num),
    ],
    "lost_update": [
        ("expected", "expected", _num),
        ("actual", "actual", _num),
        ("retries", "retries", _num),
        ("longest row-lock wait", "lock_wait_max_s", _seconds),
    ],
    "shared_session": [
        ("cross-thread uses", "cross_thread_uses", _num),
        ("errors", "errors", _num),
        ("heartbeats ok", "heartbeats_ok", _num),
    ],
    "session_store": [
        ("writes", "writes", _num),
        ("lost writes", "lost_writes", _num),
        ("lock wait p99", "lock_wait_p99_s", _seconds),
    ],
}


def _value(figures: dict[str, Any], key: str) -> Any:
    if key == "jobs":
        return f"{figures.get('jobs_ok', 0)} / {figures.get('jobs_failed', 0)}"
    return figures.get(key)


def side_by_side(
    scenario: str, figures: dict[str, dict[str, Any]]
) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of one scenario's table."""
    variants = list(figures)
    rows = [
        [label, *(fmt(_value(figures[v], key)) for v in variants)]
        for label, key, fmt in ROWS.get(scenario, [])
    ]
    return ["", *variants], rows


def rich_table(
    scenario: str, figures: dict[str, dict[str, Any]], title: str | None = None
) -> Table:
    """The side-by-side table, titled with the scenario's one-line description by default."""
    headers, rows = side_by_side(scenario, figures)
    if title is None:
        info = SCENARIOS.get(scenario)
        title = f"{scenario}: {info.summary}" if info else scenario
    table = Table(title=title, title_justify="left")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def markdown_table(scenario: str, figures: dict[str, dict[str, Any]]) -> str:
    headers, rows = side_by_side(scenario, figures)
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(["---", *(["---:"] * (len(headers) - 1))]) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
