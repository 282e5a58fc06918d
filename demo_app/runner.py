"""`pool-monitor demo`: run every seed's anti-pattern and fix under load, and report.

Starts PostgreSQL (embedded unless `DATABASE_URL` is set), recreates the demo tables,
starts the fake external service, the demo service (two uvicorn workers) and the sidecar
when it is installed; drives each scenario with the async load generator while sampling
the pools; prints, per scenario, what pool-monitor saw (code sites by hold time, long-held
alerts with the holder's stack, the slowest hold's trace id, misuse, lock contention) next
to the app's own numbers; writes report.json, report.md and PNG charts, and lists them
last; then keeps serving (unless `--no-serve`) so Prometheus and Grafana can look, until
Ctrl-C.

Exit status: 0 when every claim held, 1 when one did not, 2 when the demo could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from demo_app import charts, drivers, events, findings, sizing, traces
from demo_app.checks import Check, evaluate
from demo_app.embedded_pg import postgres_url
from demo_app.plan import FULL, QUICK, Plan
from demo_app.report import write_json, write_markdown
from demo_app.sampler import MonitorSampler
from demo_app.scenarios import SCENARIOS
from demo_app.schema import create_schema
from demo_app.settings import DEFAULT_LATENCY_S, DemoSettings
from demo_app.stack import DemoStack
from demo_app.tables import rich_table

#: Hard bound on one scenario's driver (all variants), whatever happens.
SCENARIO_TIMEOUT_S = 300.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pool-monitor demo",
        description="Run the seeds' anti-patterns and fixes side by side, under load, and "
        "write a report (report.json, report.md, PNG charts).",
    )
    parser.add_argument("--quick", action="store_true", help="short run (≤ 3 minutes)")
    parser.add_argument("--no-serve", action="store_true", help="exit after the report")
    parser.add_argument("--report-dir", default="demo-report", type=Path, metavar="DIR")
    parser.add_argument(
        "--scenario",
        action="append",
        choices=list(SCENARIOS),
        metavar="NAME",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--external-latency",
        type=float,
        default=DEFAULT_LATENCY_S,
        metavar="SECONDS",
        help="latency of the fake external API (default 2); pool timeouts scale with it",
    )
    parser.add_argument("--workers", type=int, default=2, help="uvicorn workers (default 2)")
    parser.add_argument(
        "--base-port",
        type=int,
        default=8700,
        help="service port; +1 external API, +2 sidecar (busy ports fall back to free ones; "
        "0 = any)",
    )
    args = parser.parse_args(argv)
    if not 0.05 <= args.external_latency <= 60:
        parser.error("--external-latency must be within [0.05, 60]")
    if not 1 <= args.workers <= 8:
        parser.error("--workers must be within [1, 8]")
    return args


class _RichTask:
    """`drivers.ProgressTask` on a rich progress bar."""

    def __init__(self, progress: Progress, label: str, total: float | None) -> None:
        self._progress = progress
        self._total = total
        self._id = progress.add_task(label, total=total, info="")

    def update(self, completed: float, info: str = "") -> None:
        self._progress.update(self._id, completed=completed, info=info)

    def finish(self, summary: str = "") -> None:
        total = self._total or 1
        self._progress.update(self._id, total=total, completed=total, info=summary)


async def drive_all(
    stack: DemoStack, plan: Plan, names: list[str], console: Console
) -> tuple[dict[str, Any], MonitorSampler]:
    """Play the scenarios in order, sampling the pools all along; each variant's figures
    get the monitor's `findings` (its window's pool snapshots and log records)."""
    assert stack.settings is not None
    sampler = MonitorSampler(stack.service_url, stack.workers)
    if not await sampler.fresh(timeout_s=30):
        console.print(f"[yellow]only {len(sampler.latest)} of {stack.workers} workers answered")
    sampler.baseline = (sampler.newest_time(), sampler.merged())
    stop = asyncio.Event()
    background = asyncio.create_task(sampler.run(stop))
    results: dict[str, Any] = {}
    progress = Progress(
        TextColumn("{task.description:<32}"),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
    )
    try:
        with progress:
            ctx = drivers.DriveContext(
                base_url=stack.service_url,
                external_url=stack.external_url,
                settings=stack.settings,
                plan=plan,
                sampler=sampler,
                progress=lambda label, total: _RichTask(progress, label, total),
            )
            registry = drivers.registry()
            for name in names:
                try:
                    results[name] = await asyncio.wait_for(
                        registry[name](ctx), timeout=SCENARIO_TIMEOUT_S
                    )
                except Exception as exc:
                    console.print(f"[red]{name} failed:[/red] {exc!r}")
                    console.print(traceback.format_exc(), style="dim")
                    results[name] = {"error": repr(exc)}
    finally:
        stop.set()
        await background
        await sampler.close()
    findings.collect(
        results,
        ctx.windows,
        events.read(stack.events_path),
        sampler.exemplars,
        traces.SpanIndex.of(traces.read(stack.traces_dir)),
    )
    return results, sampler


def _sizing(
    database_url: str, plan: Plan, sampler: MonitorSampler, workers: int, console: Console
) -> dict[str, Any]:
    """The report's sizing section: Erlang C against measurement on a pool driven at known
    loads, and the advice for the demo's own pools from the whole run."""
    with console.status("sizing: driving a pool of 4 at 1, 2 and 3 Erlangs"):
        runs = sizing.validate(database_url, plan.sizing_duration_s)
    table = sizing.table(runs)
    console.print("[bold]Sizing: Erlang C against measurement[/bold]")
    console.print(sizing.markdown(table), markup=False, highlight=False)
    start, before = sampler.baseline or (sampler.newest_time(), {})
    end = sampler.newest_time()
    return {
        "validation": {
            "size": sizing.VALIDATION_SIZE,
            "mean_hold_s": sizing.VALIDATION_HOLD_S,
            "duration_s": plan.sizing_duration_s,
            "rows": table,
        },
        "pools": sizing.pool_advice(before, sampler.merged(), end - start, workers),
        "window_s": end - start,
    }


def _settings_summary(settings: DemoSettings) -> dict[str, Any]:
    pools = [
        settings.api_pool,
        settings.background_pool,
        settings.shared_pool,
        settings.worker_pool,
    ]
    return {
        "external_latency_s": settings.external_latency_s,
        "long_held_threshold_s": settings.long_held_threshold_s,
        "pools": [
            {
                "name": p.name,
                "size": p.size,
                "max_overflow": p.max_overflow,
                "timeout_s": p.timeout_s,
            }
            for p in pools
        ],
    }


def _write_outputs(
    report_dir: Path, report: dict[str, Any], sampler: MonitorSampler
) -> tuple[list[Check], list[Path]]:
    scenarios = report["scenarios"]
    waiting = charts.waiting_by_variant(sampler.timeline, sampler.spans)
    notes = findings.waiting_notes(scenarios, waiting)
    report["waiting"] = waiting
    report["notes"] = {name: note["text"] for name, note in notes.items()}
    made = [charts.hold_time_chart(scenarios, report_dir / "hold_times.png")]
    if "pool_isolation" in scenarios and "error" not in scenarios["pool_isolation"]:
        made.append(
            charts.pool_wait_chart(scenarios["pool_isolation"], report_dir / "pool_wait.png")
        )
    made.append(
        charts.pool_usage_chart(
            sampler.timeline,
            sampler.spans,
            report_dir / "pool_usage.png",
            {name: note["short"] for name, note in notes.items()},
        )
    )
    report["charts"] = [p.name for p in made]
    report["timeline"] = [
        {"t": round(p.time - sampler.timeline[0].time, 3), "pools": p.pools}
        for p in sampler.timeline
    ]
    report["spans"] = [{"label": s.label, "start": s.start, "end": s.end} for s in sampler.spans]
    checks = evaluate(scenarios)
    report["checks"] = [c.as_dict() for c in checks]
    report["passed"] = all(c.passed for c in checks)
    write_json(report, report_dir / "report.json")
    write_markdown(report, checks, report_dir / "report.md")
    return checks, made


def print_scenario(
    console: Console, name: str, figures: dict[str, Any], report: dict[str, Any]
) -> None:
    """One scenario: its description, what pool-monitor saw, then the app's own numbers."""
    info = SCENARIOS[name]
    console.print()
    console.rule(style="dim")
    console.print(f"[bold]{name}[/bold] (seed {info.seed}): {info.summary}")
    if "error" in figures:
        console.print(f"[red]failed to run:[/red] {figures['error']}")
        return
    threshold = report["settings"].get("long_held_threshold_s")
    for section in findings.sections(figures, threshold):
        console.print(findings.rich_section(section))
    console.print(rich_table(name, figures, title="the app: requests, database, clients"))
    note = report.get("notes", {}).get(name)
    if note:
        console.print(f"[italic]note:[/italic] {note}", style="yellow")


def _print_summary(console: Console, report: dict[str, Any], checks: list[Check]) -> None:
    for name, figures in report["scenarios"].items():
        print_scenario(console, name, figures, report)
    console.print()
    for c in checks:
        mark = "[green]✓[/green]" if c.passed else "[red]✗[/red]"
        console.print(f" {mark} {c.scenario}: {c.claim} — {c.detail}")


def _print_files(console: Console, report_dir: Path, charts_made: list[Path]) -> None:
    """The report files, then the charts: always the last line before serving or exiting."""
    console.print(
        f"report: {report_dir / 'report.md'}, {report_dir / 'report.json'}", soft_wrap=True
    )
    console.print(f"charts: {', '.join(str(p) for p in charts_made)}", soft_wrap=True)


def _print_urls(console: Console, stack: DemoStack, report_dir: Path) -> None:
    scrape = stack.sidecar_url or stack.service_url
    console.print(
        "\n[bold]Serving[/bold] (Ctrl-C to stop)\n"
        f"  demo service      {stack.service_url}/   (routes: demo_app/README.md)\n"
        f"  its metrics       {stack.service_url}/metrics   (one worker per scrape)\n"
        f"  sidecar           {stack.sidecar_url or '–'}   {stack.sidecar_note}\n"
        f"  fake external API {stack.external_url}/stats\n"
        f"  a trace's spans   {stack.service_url}/demo/traces/<trace id>\n"
        f"  report            {report_dir / 'report.md'}\n\n"
        "Prometheus: add to prometheus.yml\n"
        "  scrape_configs:\n"
        "    - job_name: pool-monitor-demo\n"
        "      scrape_interval: 5s\n"
        f"      static_configs: [{{targets: ['{scrape.removeprefix('http://')}']}}]\n"
        "Grafana: provision dashboards/provisioning/ (see dashboards/README.md), "
        "with that Prometheus as the data source."
    )


def _serve_until_interrupted(stack: DemoStack, console: Console) -> None:
    try:
        while stack.alive():
            time.sleep(0.5)
        console.print("[red]a demo process exited; stopping[/red]")
    except KeyboardInterrupt:
        console.print("\nstopping…")


def _interrupt_on_sigterm() -> Any:
    """Make SIGTERM (CI timeouts, `docker stop`, `kill`) unwind like Ctrl-C, so every child
    process and the embedded PostgreSQL are stopped instead of orphaned."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    previous = _interrupt_on_sigterm()
    try:
        return _run(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    console = Console()
    plan = QUICK if args.quick else FULL
    names = list(dict.fromkeys(args.scenario or SCENARIOS))  # in the order given, no repeats
    args.report_dir.mkdir(parents=True, exist_ok=True)
    where = "DATABASE_URL" if os.environ.get("DATABASE_URL") else "embedded (pgserver)"
    console.print(f"[bold]pool-monitor demo[/bold] ({plan.name}): {', '.join(names)}")
    console.print(f"PostgreSQL: {where}")
    try:
        with postgres_url() as database_url:
            create_schema(database_url, reset=True)
            checks = _demo(args, plan, names, database_url, console)
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    except Exception as exc:
        console.print(f"[red]demo failed:[/red] {exc!r}")
        console.print(traceback.format_exc(), style="dim")
        return 2
    return 0 if all(c.passed for c in checks) else 1


def _demo(
    args: argparse.Namespace, plan: Plan, names: list[str], database_url: str, console: Console
) -> list[Check]:
    """Start the stack, play the scenarios, report, and serve unless told not to."""
    started = time.monotonic()
    report_dir: Path = args.report_dir
    with DemoStack(
        database_url,
        latency_s=args.external_latency,
        log_dir=report_dir / "logs",
        workers=args.workers,
        base_port=args.base_port or None,
    ) as stack:
        assert stack.settings is not None
        console.print(
            f"service {stack.service_url} ({stack.workers} workers), external API "
            f"{stack.external_url} ({args.external_latency} s); {stack.sidecar_note}"
        )
        results, sampler = asyncio.run(drive_all(stack, plan, names, console))
        report: dict[str, Any] = {
            "generated_at": datetime.now(timezone.utc).isoformat(),
            "plan": plan.name,
            "workers": stack.workers,
            "settings": _settings_summary(stack.settings),
            "sidecar": {"url": stack.sidecar_url, "note": stack.sidecar_note},
            "traces": {
                "service_name": traces.SERVICE_NAME,
                "span_files": sorted(
                    str(p.relative_to(report_dir.resolve()))
                    if p.is_relative_to(report_dir.resolve())
                    else str(p)
                    for p in stack.traces_dir.glob(traces.SPAN_FILE_GLOB)
                ),
            },
            "scenarios": results,
            "sizing": _sizing(database_url, plan, sampler, stack.workers, console),
        }
        report["duration_s"] = time.monotonic() - started
        checks, charts_made = _write_outputs(report_dir, report, sampler)
        _print_summary(console, report, checks)
        if not args.no_serve:
            _print_urls(console, stack, report_dir)
        _print_files(console, report_dir, charts_made)
        if not args.no_serve:
            _serve_until_interrupted(stack, console)
    return checks
