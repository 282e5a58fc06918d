"""`pool-monitor bench`: what instrumentation costs per checkout/checkin cycle.

Each mode runs in its own process (OpenTelemetry's instrumentation patches globally), the
modes alternate round by round so drift in machine load hits them alike, and the result is
the median per-cycle time per mode plus the difference and ratio against the bare engine.
Cycles run 25 frames deep, as in a real request handler, so the code-site walk pays for a
realistic stack.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

MODES = ("bare", "instrumented", "otel")
CASES = ("empty", "select1")


#: The benchmark's caller, compiled under an application-like file name: a real app's
#: frames are user code, so the site walk stops at them, and so it must here (frames in
#: `monitor/` count as library and would make the walk climb the whole stack).
_APP_SOURCE = """
def deep(depth, fn):
    if depth <= 0:
        return fn()
    return deep(depth - 1, fn)

def empty_cycle(engine):
    with engine.connect():
        pass

def select1_cycle(engine):
    with engine.connect() as conn:
        conn.exec_driver_sql("select 1")
"""


def _app_functions() -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    exec(compile(_APP_SOURCE, os.path.join("app", "bench_handlers.py"), "exec"), namespace)
    return namespace


def _deep(depth: int, fn: Callable[[], None]) -> None:
    _app_functions()["deep"](depth, fn)


def _measure(engine: Any, case: str, cycles: int, batches: int, depth: int) -> list[float]:
    """Per-cycle microseconds for each batch."""
    app = _app_functions()
    cycle = app["empty_cycle"] if case == "empty" else app["select1_cycle"]

    def one() -> None:
        cycle(engine)

    def batch() -> None:
        for _ in range(cycles):
            one()

    for _ in range(max(1, cycles // 10)):  # warm up: connections open, caches filled
        one()
    results = []
    for _ in range(batches):
        started = time.perf_counter_ns()
        app["deep"](depth, batch)
        results.append((time.perf_counter_ns() - started) / cycles / 1000.0)
    return results


def worker(mode: str, url: str, cycles: int, batches: int, depth: int) -> dict[str, Any]:
    """Run in a fresh process: build one engine in `mode` and time both cases."""
    import sqlalchemy as sa

    engine = sa.create_engine(url, pool_size=5, max_overflow=0)
    if mode == "instrumented":
        import monitor

        monitor.instrument(engine, pool_name="bench")
    elif mode == "otel":
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.trace import TracerProvider

        SQLAlchemyInstrumentor().instrument(engine=engine, meter_provider=MeterProvider(),
                                            tracer_provider=TracerProvider())  # fmt: skip
    out = {case: _measure(engine, case, cycles if case == "empty" else max(1, cycles // 5),
                          batches, depth) for case in CASES}  # fmt: skip
    engine.dispose()
    return out


def _otel_unavailable() -> str | None:
    try:
        import opentelemetry.instrumentation.sqlalchemy
        import opentelemetry.sdk  # noqa: F401
    except ImportError as error:
        return f"not installed ({error.name}); pip install opentelemetry-instrumentation-sqlalchemy"
    try:
        from importlib.metadata import version

        import sqlalchemy

        if tuple(int(p) for p in sqlalchemy.__version__.split(".")[:2]) >= (2, 1):
            return (f"opentelemetry-instrumentation-sqlalchemy "
                    f"{version('opentelemetry-instrumentation-sqlalchemy')} refuses SQLAlchemy "
                    f"{sqlalchemy.__version__}; run the bench in a venv with SQLAlchemy 2.0")
    except Exception:  # pragma: no cover
        return None
    return None


def _run_worker(mode: str, url: str, args: argparse.Namespace) -> dict[str, list[float]]:
    command = [sys.executable, "-m", "monitor.bench", "--worker", mode, "--url", url,
               "--cycles", str(args.cycles), "--batches", str(args.batches),
               "--depth", str(args.depth)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench worker {mode!r} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    from demo_app.embedded_pg import postgres_url

    modes = ["bare", "instrumented"]
    otel_note = None
    if args.otel:
        otel_note = _otel_unavailable()
        if otel_note is None:
            modes.append("otel")
    samples: dict[str, dict[str, list[float]]] = {m: {c: [] for c in CASES} for m in modes}
    with ExitStack() as stack:
        url = args.url or stack.enter_context(postgres_url())
        for round_index in range(args.rounds):
            order = modes if round_index % 2 == 0 else list(reversed(modes))
            for mode in order:
                for case, values in _run_worker(mode, url, args).items():
                    samples[mode][case].extend(values)
    medians = {m: {c: statistics.median(v) for c, v in cases.items()}
               for m, cases in samples.items()}  # fmt: skip
    return {"medians_us": medians, "otel_note": otel_note, "cycles": args.cycles,
            "batches": args.batches, "rounds": args.rounds, "depth": args.depth,
            "python": sys.version.split()[0], "sqlalchemy": _sa_version()}  # fmt: skip


def _sa_version() -> str:
    import sqlalchemy

    return sqlalchemy.__version__


def report(result: dict[str, Any]) -> str:
    medians = result["medians_us"]
    bare = medians["bare"]
    lines = [f"pool-monitor bench: Python {result['python']}, SQLAlchemy {result['sqlalchemy']}, "
             f"{result['depth']} frames deep, {result['rounds']} alternating rounds x "
             f"{result['batches']} batches (empty: {result['cycles']} cycles/batch)",
             f"{'mode':<14}{'case':<10}{'median µs/cycle':>17}{'+µs vs bare':>13}{'ratio':>8}"]
    for mode, cases in medians.items():
        for case, value in cases.items():
            lines.append(f"{mode:<14}{case:<10}{value:>17.2f}{value - bare[case]:>+13.2f}"
                         f"{value / bare[case]:>8.2f}")  # fmt: skip
    if result.get("otel_note"):
        lines.append(f"otel: {result['otel_note']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cycles", type=int, default=5000, help="cycles per batch (empty case)")
    parser.add_argument("--batches", type=int, default=7, help="batches per worker process")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds of processes")
    parser.add_argument("--depth", type=int, default=25, help="stack depth of the caller")
    parser.add_argument("--otel", action="store_true",
                        help="also OpenTelemetry's SQLAlchemy instrumentation, if importable")
    parser.add_argument("--url", help="database URL (default: DATABASE_URL or embedded)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pool-monitor bench", description=__doc__)
    add_arguments(parser)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("cycles", "batches", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.worker:
        print(json.dumps(worker(args.worker, args.url, args.cycles, args.batches, args.depth)))
        return 0
    os.environ.setdefault("POOL_MONITOR_LONG_HELD_THRESHOLD", "5")
    result = run(args)
    print(json.dumps(result) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
