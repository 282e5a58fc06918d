"""The compatibility job: instrumenting an engine must never change what the application sees.

    python -m compat.run [--backends sqlite aiosqlite psycopg psycopg_async] [--keep-going]

Runs part of SQLAlchemy's own test suite (from the sdist of the installed version, cached
in `.compat-cache/`) on each backend twice, bare and with every engine instrumented
(`compat.plugin`, with a snapshot directory: the snapshot thread and the hold board run as
beside the sidecar), and compares the outcome of every test. Exits non-zero if any test's
outcome differs, if `instrument()` failed, if pool-monitor counted or logged an error of
its own, or if a run did not finish. PostgreSQL is embedded unless DATABASE_URL is set;
each run gets a database of its own, so runs go in parallel (`--jobs`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from compat.plugin import MODE_VAR, OUTCOMES_VAR, PG_MISSING_VAR, REPORT_VAR

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".compat-cache"
ALLOWLIST = Path(__file__).resolve().parent / "allowlist.txt"

#: The part of SQLAlchemy's suite that exercises engines, pools, connections and
#: transactions: what instrumentation could plausibly disturb.
SELECTION = (
    "test/engine/test_pool.py",
    "test/engine/test_reconnect.py",
    "test/engine/test_execute.py",
    "test/engine/test_transaction.py",
    "test/engine/test_deprecations.py",
    "test/engine/test_logging.py",
    "test/engine/test_parseconnect.py",
    "test/orm/test_transaction.py",
    "test/ext/asyncio/",
)
SQLITE = {"sqlite": "sqlite:///:memory:", "aiosqlite": "sqlite+aiosqlite:///:memory:"}
POSTGRES = {"psycopg": "postgresql+psycopg", "psycopg_async": "postgresql+psycopg_async"}
BACKENDS = (*SQLITE, *POSTGRES)
MODES = ("bare", "instrumented")
TEST_TIMEOUT = 180  # seconds per test (pytest-timeout): a deadlock fails one test, not CI
RUN_TIMEOUT = 1800  # seconds per pytest run, in case the process hangs outside a test
RANK = {"passed": 0, "xpassed": 1, "skipped": 2, "xfailed": 2, "failed": 3, "error": 4}


# -- SQLAlchemy's suite ---------------------------------------------------------------------
def sqlalchemy_version() -> str:
    return metadata.version("sqlalchemy")


def sdist(version: str) -> Path:
    """The extracted sdist of SQLAlchemy `version` (it ships `test/`), downloaded once."""
    root = CACHE / f"sqlalchemy-{version}"
    if (root / "test" / "conftest.py").is_file():
        return root
    downloads = CACHE / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    subprocess.run(
        [*pip, "--no-binary", ":all:", f"sqlalchemy=={version}", "-d", downloads], check=True
    )
    archive = next(
        p for p in downloads.glob("*.tar.gz") if p.name.lower() == f"sqlalchemy-{version}.tar.gz"
    )
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp, tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(tmp, filter="data")
        else:  # a Python without extraction filters; the archive is pip's download
            tar.extractall(tmp)
        (top,) = Path(tmp).iterdir()
        top.rename(root)
    return root


# -- PostgreSQL -----------------------------------------------------------------------------
@contextmanager
def postgres() -> Iterator[str]:
    """URL of a PostgreSQL to create the runs' databases in: DATABASE_URL, or embedded.

    The embedded server is started twice: `max_prepared_transactions` (needed by the
    suite's two-phase tests, skipped when it is 0) only takes effect at server start."""
    from sqlalchemy import create_engine

    from demo_app.embedded_pg import postgres_url

    if os.environ.get("DATABASE_URL"):
        with postgres_url() as url:
            yield url
        return
    with tempfile.TemporaryDirectory(prefix="pool-monitor-compat-pg-") as tmp:
        data = os.path.join(tmp, "data")
        with postgres_url(data) as url:
            engine = create_engine(url, isolation_level="AUTOCOMMIT")
            with engine.connect() as conn:
                conn.exec_driver_sql("ALTER SYSTEM SET max_prepared_transactions = 10")
            engine.dispose()
        with postgres_url(data) as url:
            yield url


def missing_extensions(server_url: str) -> list[str]:
    """Of the extensions SQLAlchemy's provisioning creates, those this server lacks (the
    embedded one has no contrib); `compat.plugin` takes them off its list."""
    from sqlalchemy import create_engine

    engine = create_engine(server_url)
    with engine.connect() as conn:
        available = set(conn.exec_driver_sql("SELECT name FROM pg_available_extensions").scalars())
    engine.dispose()
    return sorted({"citext", "hstore"} - available)


def create_database(server_url: str, name: str) -> str:
    """A fresh database as SQLAlchemy's README.unittests.rst asks: UTF8, English full-text
    search, schemas `test_schema` and `test_schema_2` (the suite's provisioning creates the
    extensions it needs)."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.exec_driver_sql(f"CREATE DATABASE \"{name}\" ENCODING 'utf8' TEMPLATE template0")
        conn.exec_driver_sql(
            f"ALTER DATABASE \"{name}\" SET default_text_search_config = 'pg_catalog.english'"
        )
    admin.dispose()
    url = make_url(server_url).set(database=name)
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql("CREATE SCHEMA test_schema")
        conn.exec_driver_sql("CREATE SCHEMA test_schema_2")
    engine.dispose()
    return url.render_as_string(hide_password=False)


def drop_database(server_url: str, name: str) -> None:
    from sqlalchemy import create_engine

    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


# -- one pytest run -------------------------------------------------------------------------
@dataclass
class Run:
    backend: str
    mode: str  # "bare", "instrumented", or "bare-2" (the flakiness check)
    url: str
    directory: Path
    seconds: float = 0.0
    returncode: int | None = None
    timed_out: bool = False
    outcomes: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (status, msg)
    report: dict[str, Any] | None = None
    file_seconds: Counter[str] = field(default_factory=Counter)  # test file -> seconds

    @property
    def name(self) -> str:
        return f"{self.backend} {self.mode}"

    def counts(self) -> dict[str, int]:
        counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
        for status, _ in self.outcomes.values():
            bucket = {"xpassed": "passed", "xfailed": "skipped"}.get(status, status)
            counts[bucket] += 1
        return counts


def pytest_command(suite: Path, url: str) -> list[str]:
    """SQLAlchemy's suite as its developers run it (its own pytest config and plugin),
    with `-s` so that its conftest does not put the sdist's `lib/` first on sys.path: the
    installed SQLAlchemy (with its compiled extensions) is what applications run."""
    command = [
        sys.executable,
        "-s",
        "-m",
        "pytest",
        "--rootdir",
        str(suite),
        "-p",
        "compat.plugin",
        "-p",
        "no:cacheprovider",
        # our dev extras, not SQLAlchemy's: keep them out of its suite
        "-p",
        "no:asyncio",
        "-p",
        "no:anyio",
        "-q",
        "--tb=short",
        "--maxfail=1000000",
        "--dburi",
        url,
    ]
    if importlib.util.find_spec("pytest_timeout"):
        command.append(f"--timeout={TEST_TIMEOUT}")
    return command + [str(suite / path) for path in SELECTION]


def execute(run: Run, suite: Path, extra_env: dict[str, str]) -> Run:
    """Run pytest for `run` in a directory of its own (the suite writes files in the
    working directory, e.g. SQLite databases) and read what it recorded."""
    shutil.rmtree(run.directory, ignore_errors=True)
    run.directory.mkdir(parents=True)
    outcomes, report = run.directory / "outcomes.jsonl", run.directory / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOL_MONITOR_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra_env)
    env[OUTCOMES_VAR] = str(outcomes)
    if run.mode == "instrumented":
        env[MODE_VAR] = "instrument"
        env[REPORT_VAR] = str(report)
        # As deployed beside the sidecar: the snapshot thread writes, and every checkout
        # and return goes through the hold board (`monitor.exporters.board`).
        env["POOL_MONITOR_SNAPSHOT_DIR"] = str(run.directory / "snapshots")
    started = time.monotonic()
    with open(run.directory / "pytest.log", "w") as log:
        process = subprocess.Popen(
            pytest_command(suite, run.url),
            cwd=run.directory,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            run.returncode = process.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            run.timed_out = True
            os.killpg(process.pid, signal.SIGKILL)
            run.returncode = process.wait()
    run.seconds = time.monotonic() - started
    run.outcomes, run.file_seconds = read_outcomes(outcomes)
    if report.is_file():
        run.report = json.loads(report.read_text())
    return run


def read_outcomes(path: Path) -> tuple[dict[str, tuple[str, str]], Counter[str]]:
    """Test id -> (status, failure message) from the plugin's JSON lines, where the worst
    phase wins (a failing teardown after a passing call is an error); and seconds per file."""
    result: dict[str, tuple[str, str]] = {}
    seconds: Counter[str] = Counter()
    if not path.is_file():
        return result, seconds
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the last line of a killed run
            continue
        seconds[record["id"].split("::")[0]] += record.get("seconds", 0.0)
        when, outcome, xfail = record["when"], record["outcome"], record.get("xfail", False)
        if outcome == "failed":
            status = "failed" if when == "call" else "error"
        elif outcome == "skipped":
            status = "xfailed" if xfail else "skipped"
        elif when == "call":
            status = "xpassed" if xfail else "passed"
        else:
            status = "passed"  # a passing setup or teardown says nothing new
        previous, message = result.get(record["id"], (None, ""))
        if previous is None or RANK[status] > RANK[previous]:
            result[record["id"]] = (status, message or record.get("message", ""))
    return result, seconds


# -- comparison and report ------------------------------------------------------------------
def load_allowlist() -> dict[str, str]:
    """Test ids whose difference must not fail the job (each line: an id, then `# why`)."""
    allowed: dict[str, str] = {}
    if ALLOWLIST.is_file():
        for line in ALLOWLIST.read_text().splitlines():
            test_id, _, why = line.partition("#")
            if test_id.strip():
                allowed[test_id.strip()] = why.strip()
    return allowed


def differences(a: Run, b: Run) -> list[str]:
    ids = a.outcomes.keys() | b.outcomes.keys()
    return sorted(i for i in ids if outcome(a, i) != outcome(b, i))


def outcome(run: Run, test_id: str) -> str:
    return run.outcomes.get(test_id, ("missing", ""))[0]


def run_problems(run: Run) -> list[str]:
    """Why a run cannot be trusted, or what the instrumented run found wrong by itself."""
    problems = []
    if run.timed_out:
        problems.append(f"killed after {RUN_TIMEOUT} s (hung); partial outcomes")
    elif run.returncode not in (0, 1):
        problems.append(f"pytest exited {run.returncode} (see {run.directory}/pytest.log)")
    if not run.outcomes:
        problems.append("no test outcome recorded")
    if run.mode != "instrumented":
        return problems
    report = run.report
    if report is None:
        return [*problems, "no compat report written (the session did not finish)"]
    stray = report["sqlalchemy"]["stray_modules"]
    if stray:
        problems.append(f"two SQLAlchemy copies imported: {stray}")
    if not report["engines_instrumented"]:
        problems.append("no engine was instrumented: the plugin is not working")
    if report["instrument_failures"]:
        samples = report["instrument_failure_samples"][:3]
        problems.append(
            f"instrument() failed {report['instrument_failures']} times: "
            + "; ".join(f"{s['test']}: {s['error']}" for s in samples)
        )
    if report["pool_monitor_errors_total"]:
        where = [
            f"{m['pool']} ({m['created_in']}): {m['errors']}"
            for m in report["monitors_with_errors"][:5]
        ]
        problems.append(
            f"pool_monitor_errors_total = {report['pool_monitor_errors_total']}: "
            + "; ".join(where)
        )
    for record in report["monitor_error_logs"][:5]:
        problems.append(
            f"{record['logger']} logged ERROR in {record['test']}: {record['message'][:300]}"
        )
    if report["error_counter_unreadable"]:
        problems.append(f"errors counter unreadable: {report['error_counter_unreadable'][:3]}")
    if not report.get("board_slots_used"):
        problems.append("no hold went on the board: the snapshot directory was not in use")
    if report.get("snapshot_write_errors"):
        problems.append(f"snapshot writes failed {report['snapshot_write_errors']} times")
    return problems


def first_lines(text: str, lines: int = 4) -> str:
    return "\n".join("        " + line for line in text.splitlines()[:lines])


def message(run: Run, test_id: str) -> str:
    return run.outcomes.get(test_id, ("", ""))[1]


def check_backend(
    backend: str, runs: dict[tuple[str, str], Run], allowed: dict[str, str]
) -> tuple[str, list[str], bool]:
    """The backend's table row, its findings, and whether they fail the job: every
    difference not allowlisted, every run problem, every test that changed between two
    bare runs (allowlisted ones are still printed, never silently ignored)."""
    bare, instr = runs[(backend, "bare")], runs[(backend, "instrumented")]
    second = runs.get((backend, "bare-2"))
    diff = differences(bare, instr)
    b, i = bare.counts(), instr.counts()
    engines = instr.report["engines_instrumented"] if instr.report else "?"
    row = (
        f"{backend:<14} {b['passed']:>10} {b['failed']:>4} {b['skipped']:>4} "
        f"{b['error']:>3}  {i['passed']:>18} {i['failed']:>4} {i['skipped']:>4} "
        f"{i['error']:>3}  {len(diff):>6}  {engines:>7}  {bare.seconds:>6.0f}  "
        f"{instr.seconds:>7.0f}"
    )
    findings: list[str] = []
    failing = False
    pairs = [(instr, test_id) for test_id in diff]
    pairs += [(second, test_id) for test_id in differences(bare, second)] if second else []
    for other, test_id in pairs:
        why = allowed.get(test_id)
        failing = failing or why is None
        label = "FLAKY ON ITS OWN: " if other is second else ""
        note = f"  (allowlisted: {why})" if why is not None else ""
        findings.append(
            f"  [{backend}] {label}{test_id}: bare={outcome(bare, test_id)} "
            f"{other.mode}={outcome(other, test_id)}{note}\n"
            + first_lines(message(other, test_id) or message(bare, test_id))
        )
    for run in filter(None, (bare, instr, second)):
        for problem in run_problems(run):
            failing = True
            findings.append(f"  [{backend}] PROBLEM in the {run.mode} run: {problem}")
    return row, findings, failing


def summarize(runs: dict[tuple[str, str], Run], backends: list[str]) -> list[str]:
    """Print the table and every difference; return the backends that fail the job."""
    allowed = load_allowlist()
    head = (
        f"{'backend':<14} {'bare: pass fail skip err':>24}  "
        f"{'instrumented: pass fail skip err':>32}  {'differ':>6}  {'engines':>7}  "
        f"{'bare s':>6}  {'instr s':>7}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    failed, details = [], []
    for backend in backends:
        if (backend, "bare") not in runs or (backend, "instrumented") not in runs:
            failed.append(backend)
            print(f"{backend:<14} not run (stopped early: see --keep-going)")
            continue
        row, lines, failing = check_backend(backend, runs, allowed)
        print(row)
        details += lines
        if failing:
            failed.append(backend)
    if details:
        print("\nDifferences and problems:\n" + "\n".join(details))
    return failed


def run_all(
    planned: list[Run], suite: Path, env: dict[str, str], jobs: int, keep_going: bool
) -> dict[tuple[str, str], Run]:
    """Run `planned`, `jobs` at a time. Unless `keep_going`, no run starts once a finished
    one had a problem or differed from its partner (checked by the worker itself, before
    it takes its next run; runs already going are left to finish)."""
    runs: dict[tuple[str, str], Run] = {}
    lock, stop = threading.Lock(), threading.Event()

    def work(run: Run) -> None:
        if stop.is_set():
            return
        execute(run, suite, env)
        with lock:
            runs[(run.backend, run.mode)] = run
            counts = ", ".join(f"{n} {k}" for k, n in run.counts().items())
            print(f"  {run.seconds:6.1f} s  {run.name:<26} {counts}", flush=True)
            partner = runs.get((run.backend, "instrumented" if run.mode == "bare" else "bare"))
            if not keep_going and (run_problems(run) or (partner and differences(run, partner))):
                stop.set()

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(work, run) for run in planned]:
            future.result()
    return runs


# -- main -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m compat.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="start every run even after one showed a difference or problem",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=4,
        help="pytest runs at once (default 4: the suite mostly sleeps)",
    )
    parser.add_argument(
        "--bare-twice",
        action="store_true",
        help="also run each backend bare a second time, to find tests that are flaky on their own",
    )
    args = parser.parse_args(argv)

    started = time.monotonic()
    version = sqlalchemy_version()
    suite = sdist(version)
    print(f"SQLAlchemy {version}; suite {suite}", flush=True)
    modes = MODES + (("bare-2",) if args.bare_twice else ())
    runs_dir = CACHE / "runs" / version
    # PostgreSQL first: its runs are the longest, so the tail of the schedule is short.
    pairs = sorted(((b, m) for b in args.backends for m in modes), key=lambda p: p[0] in SQLITE)
    with ExitStack() as stack:
        env: dict[str, str] = {}
        planned: list[Run] = []
        if any(backend in POSTGRES for backend, _ in pairs):
            server = stack.enter_context(postgres())
            env[PG_MISSING_VAR] = ",".join(missing_extensions(server))
        for backend, mode in pairs:
            url = SQLITE.get(backend, "")
            if backend in POSTGRES:  # a database per run: runs go in parallel
                name = f"compat_{backend}_{mode}".replace("-", "_")
                url = with_driver(create_database(server, name), POSTGRES[backend])
                stack.callback(drop_database, server, name)
            planned.append(Run(backend, mode, url, runs_dir / f"{backend}-{mode}"))
        runs = run_all(planned, suite, env, args.jobs, args.keep_going)
    failed = summarize(runs, args.backends)
    total = sum(run.seconds for run in runs.values())
    by_file = sum((run.file_seconds for run in runs.values()), Counter())
    print(
        f"\nWall time {time.monotonic() - started:.0f} s for {len(runs)} pytest runs, "
        f"{args.jobs} at once ({total:.0f} s in all). Logs: {runs_dir}/*/pytest.log"
    )
    print(
        "Slowest test files, all runs: "
        + ", ".join(f"{name} {secs:.0f} s" for name, secs in by_file.most_common(4))
    )
    print(
        "compat: FAILED, see above" if failed else "compat: instrumentation changed no test outcome"
    )
    # The plain closing line CI reads: one per backend compared.
    print(f"compat: {len(args.backends) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def with_driver(url: str, driver: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername=driver).render_as_string(hide_password=False)


if __name__ == "__main__":
    sys.exit(main())
