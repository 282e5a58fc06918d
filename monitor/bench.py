"""`pool-monitor bench`: what instrumentation costs per checkout/checkin cycle.

Bare and instrumented batches alternate *within one process* on one warm engine
(`uninstrument()` restores it exactly), so process-to-process differences in memory layout
and CPU state, which are larger than the effect measured, cancel out; several such
processes run, and the result is the median per-cycle time per mode plus the difference
and ratio. OpenTelemetry's instrumentation patches globally and cannot be removed, so its
process times bare batches first, then OpenTelemetry's. Cycles run 25 frames deep, as in a
real request handler, so the code-site walk pays for a realistic stack.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

MODES = ("paired", "otel")
#: Instrumented modes timed against bare in the `paired` process. `instrumented` runs with
#: OpenTelemetry installed and no span current (tracing absent); `traced` under a sampled
#: span (the hold records its context); `traced_wait` also emits a `pool.wait` span per
#: checkout; `no_trace_ctx` has trace capture off.
PAIRED_MODES = (
    "instrumented",
    "no_code_sites",
    "with_sidecar",
    "no_trace_ctx",
    "traced",
    "traced_wait",
)
CASES = ("empty", "handler", "select1")


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

def handler_cycle(engine):
    # A request handler's size: the checkout sits 100 lines into the function, where
    # reading the line number from the frame costs most.
HANDLER_BODY
    with engine.connect():
        pass

def select1_cycle(engine):
    with engine.connect() as conn:
        conn.exec_driver_sql("select 1")
""".replace("HANDLER_BODY", "\n".join(f"    v{i} = {i}" for i in range(100)))


def _app_functions() -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    exec(compile(_APP_SOURCE, os.path.join("app", "bench_handlers.py"), "exec"), namespace)
    return namespace


def _deep(depth: int, fn: Callable[[], None]) -> None:
    _app_functions()["deep"](depth, fn)


def _timer(engine: Any, case: str, cycles: int, depth: int) -> Callable[[], float]:
    """A function timing one batch of `cycles` cycles; returns µs per cycle."""
    app = _app_functions()
    cycle = app[f"{case}_cycle"]

    def batch() -> None:
        for _ in range(cycles):
            cycle(engine)

    def timed() -> float:
        started = time.perf_counter_ns()
        app["deep"](depth, batch)
        return (time.perf_counter_ns() - started) / cycles / 1000.0

    return timed


def worker(mode: str, url: str, cycles: int, batches: int, depth: int) -> dict[str, Any]:
    """Run in a fresh process. `paired`: bare and instrumented batches alternate on one
    engine. `otel`: bare batches, then OpenTelemetry's instrumentation."""
    import sqlalchemy as sa

    import monitor

    engine = sa.create_engine(url, pool_size=5, max_overflow=0)
    counts = {"empty": cycles, "handler": cycles, "select1": max(1, cycles // 5)}
    timers = {case: _timer(engine, case, counts[case], depth) for case in CASES}
    modes = PAIRED_MODES if mode == "paired" else ("otel",)
    out: dict[str, dict[str, list[float]]] = {m: {c: [] for c in CASES} for m in ("bare", *modes)}
    for case in CASES:  # warm up: connections open, caches and specializations filled
        timers[case]()
    if mode == "paired":
        from monitor.exporters import snapshot

        snapshots = tempfile.mkdtemp(prefix="pool-monitor-bench-")
        settings: dict[str, dict[str, Any]] = {
            "instrumented": {},
            "no_code_sites": {"code_sites": False},
            "with_sidecar": {"snapshot_dir": snapshots},
            "no_trace_ctx": {"trace_context": False},
            "traced": {},
            "traced_wait": {"trace_pool_wait": True},
        }
        request = _request_span()
        for _ in range(batches):
            for case in CASES:
                out["bare"][case].append(timers[case]())
                for name, options in settings.items():
                    monitor.instrument(engine, pool_name="bench", **options)
                    if name.startswith("traced"):  # every cycle inside one sampled span
                        with request():
                            out[name][case].append(timers[case]())
                    else:
                        out[name][case].append(timers[case]())
                    monitor.uninstrument(engine)
                    if "snapshot_dir" in options:  # its thread and board: this mode's only
                        snapshot.stop_all()
    else:
        for _ in range(batches):
            for case in CASES:
                out["bare"][case].append(timers[case]())
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.trace import TracerProvider

        SQLAlchemyInstrumentor().instrument(
            engine=engine, meter_provider=MeterProvider(), tracer_provider=TracerProvider()
        )
        for case in CASES:
            timers[case]()
        for _ in range(batches):
            for case in CASES:
                out["otel"][case].append(timers[case]())
    engine.dispose()
    if mode == "paired":
        shutil.rmtree(snapshots, ignore_errors=True)
    return out


def _request_span() -> Callable[[], Any]:
    """A sampled, recording SDK span to run cycles under, as a traced request handler
    does: its context is what the hold records; `pool.wait` spans are its children. The
    provider has no processor, so finished spans cost their creation, not an export."""
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("pool-monitor-bench")
    return lambda: tracer.start_as_current_span("GET /orders")


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
            return (
                f"opentelemetry-instrumentation-sqlalchemy "
                f"{version('opentelemetry-instrumentation-sqlalchemy')} refuses SQLAlchemy "
                f"{sqlalchemy.__version__}; run the bench in a venv with SQLAlchemy 2.0"
            )
    except Exception:  # pragma: no cover
        return None
    return None


def _run_worker(mode: str, url: str, args: argparse.Namespace) -> dict[str, list[float]]:
    command = [
        sys.executable,
        "-m",
        "monitor.bench",
        "--worker",
        mode,
        "--url",
        url,
        "--cycles",
        str(args.cycles),
        "--batches",
        str(args.batches),
        "--depth",
        str(args.depth),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench worker {mode!r} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _database_url(args: argparse.Namespace, stack: ExitStack) -> str:
    """--url, else DATABASE_URL, else an embedded PostgreSQL (`pgserver`, in the `demo`
    extra) for the length of the run. psycopg 3 whatever scheme was given."""
    url = args.url or os.environ.get("DATABASE_URL")
    if not url:
        try:
            import pgserver
        except ModuleNotFoundError:
            print(
                "pool-monitor bench: give --url or DATABASE_URL, or pip install pgserver "
                "for an embedded PostgreSQL",
                file=sys.stderr,
            )
            raise SystemExit(2) from None
        data = stack.enter_context(tempfile.TemporaryDirectory(prefix="pool-monitor-pg-"))
        server = pgserver.get_server(data, cleanup_mode="stop")
        stack.callback(server.cleanup)
        url = server.get_uri()
    import sqlalchemy as sa

    parsed = sa.engine.make_url(url)
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def run(args: argparse.Namespace) -> dict[str, Any]:
    processes = ["paired"]
    otel_note = None
    if args.otel:
        otel_note = _otel_unavailable()
        if otel_note is None:
            processes.append("otel")
    samples: dict[str, dict[str, list[float]]] = {}
    otel_bare: dict[str, list[float]] = {c: [] for c in CASES}
    with ExitStack() as stack:
        url = _database_url(args, stack)
        for _ in range(args.rounds):
            for process in processes:
                for mode, cases in _run_worker(process, url, args).items():
                    if process == "otel" and mode == "bare":
                        for case, values in cases.items():
                            otel_bare[case].extend(values)
                        continue
                    for case, values in cases.items():
                        samples.setdefault(mode, {c: [] for c in CASES})[case].extend(values)
    medians = {
        m: {c: statistics.median(v) for c, v in cases.items()} for m, cases in samples.items()
    }
    spreads = {m: {c: _iqr(v) for c, v in cases.items()} for m, cases in samples.items()}
    result: dict[str, Any] = {
        "medians_us": medians,
        "iqr_us": spreads,
        "otel_note": otel_note,
        "cycles": args.cycles,
        "batches": args.batches,
        "rounds": args.rounds,
        "depth": args.depth,
        "python": sys.version.split()[0],
        "sqlalchemy": _sa_version(),
    }
    if "otel" in medians:  # OTel against the bare batches of its own processes
        result["otel_bare_us"] = {c: statistics.median(v) for c, v in otel_bare.items()}
    return result


def _iqr(values: list[float]) -> float:
    """Interquartile range: how much batches disagree (network round trips vary a lot)."""
    if len(values) < 4:
        return 0.0
    quartiles = statistics.quantiles(values, n=4)
    return quartiles[2] - quartiles[0]


def _sa_version() -> str:
    import sqlalchemy

    return sqlalchemy.__version__


def report(result: dict[str, Any]) -> str:
    medians = result["medians_us"]
    lines = [
        f"pool-monitor bench: Python {result['python']}, SQLAlchemy {result['sqlalchemy']}, "
        f"{result['depth']} frames deep, {result['rounds']} processes x "
        f"{result['batches']} alternating batches (empty: {result['cycles']} cycles/batch)",
        f"{'mode':<14}{'case':<10}{'median µs/cycle':>17}{'+µs vs bare':>13}{'ratio':>8}"
        f"{'IQR µs':>9}",
    ]
    for mode, cases in medians.items():
        bare = result.get("otel_bare_us", medians["bare"]) if mode == "otel" else medians["bare"]
        for case, value in cases.items():
            spread = result.get("iqr_us", {}).get(mode, {}).get(case, 0.0)
            lines.append(
                f"{mode:<14}{case:<10}{value:>17.2f}{value - bare[case]:>+13.2f}"
                f"{value / bare[case]:>8.2f}{spread:>9.2f}"
            )
    lines.append(
        "instrumented = default settings; no_code_sites = code_sites=False; "
        "with_sidecar = snapshot_dir set (the snapshot thread runs, holds go on the board). "
        "instrumented runs with OpenTelemetry installed and no span current (tracing "
        "absent); no_trace_ctx = trace_context=False; traced = every cycle under a sampled "
        "SDK span (the hold keeps its context); traced_wait = traced + trace_pool_wait=True "
        "(a pool.wait span per checkout). handler: the empty cycle 100 lines into a function. "
        "select1 includes PostgreSQL round trips: read its IQR before its delta."
    )
    if "otel_bare_us" in result:
        lines.append("(otel is compared with the bare batches of its own processes)")
    if result.get("otel_note"):
        lines.append(f"otel: {result['otel_note']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cycles", type=int, default=5000, help="cycles per batch (empty case)")
    parser.add_argument(
        "--batches", type=int, default=9, help="alternating batches per process and mode"
    )
    parser.add_argument("--rounds", type=int, default=3, help="worker processes per mode")
    parser.add_argument("--depth", type=int, default=25, help="stack depth of the caller")
    parser.add_argument(
        "--otel",
        action="store_true",
        help="also OpenTelemetry's SQLAlchemy instrumentation, if importable",
    )
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
