"""pytest plugin for the compatibility job (`-p compat.plugin` in SQLAlchemy's own suite).

Three independent parts, each off unless its environment variable is set:

* `POOL_MONITOR_COMPAT=instrument`: every engine that `create_engine()` or
  `create_async_engine()` returns is passed to `monitor.instrument()`, wherever the suite
  or its testing framework got the function from. At session end a JSON report goes to
  `POOL_MONITOR_COMPAT_REPORT`: engines instrumented, `instrument()` failures,
  `pool_monitor_errors_total` summed over every monitor, and what the `monitor` logger
  said at WARNING or above. Without that variable the run is bare: nothing is patched or
  imported, so the two runs differ by instrumentation only.
* `POOL_MONITOR_COMPAT_OUTCOMES=path`: one JSON line per test phase, appended as it
  happens, so a run that hangs or crashes still leaves every outcome it reached. Passive,
  and used in bare and instrumented runs alike.
* `POOL_MONITOR_COMPAT_PG_MISSING_EXTENSIONS=citext,hstore`: PostgreSQL extensions the
  server does not ship (the embedded one has no contrib). SQLAlchemy's provisioning creates
  them on PostgreSQL >= 13 and the whole session fails if it cannot; this takes them off
  its list, in bare and instrumented runs alike.

Nothing here may break a test by itself: a failing `instrument()` is recorded (it is a
finding) and the engine is handed back uninstrumented.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import pytest

MODE_VAR = "POOL_MONITOR_COMPAT"
REPORT_VAR = "POOL_MONITOR_COMPAT_REPORT"
OUTCOMES_VAR = "POOL_MONITOR_COMPAT_OUTCOMES"
PG_MISSING_VAR = "POOL_MONITOR_COMPAT_PG_MISSING_EXTENSIONS"

#: Where the suite imports the two factories from (`engine_from_config()`,
#: `create_pool_from_url()` and `async_engine_from_config()` look them up in the last
#: module of each pair). Names bound in `sqlalchemy.testing.*` are found by a scan.
TARGETS = (
    ("sqlalchemy", "create_engine"),
    ("sqlalchemy.engine", "create_engine"),
    ("sqlalchemy.engine.create", "create_engine"),
    ("sqlalchemy.ext.asyncio", "create_async_engine"),
    ("sqlalchemy.ext.asyncio.engine", "create_async_engine"),
)
MAX_RECORDS = 200  # per list in the report; the counts stay exact


class _State:
    """What the instrumented run found (module-level: one pytest session per process)."""

    def __init__(self) -> None:
        self.current_test = "<no test>"
        self.wrappers: dict[int, Callable[..., Any]] = {}  # id(original) -> wrapper
        self.originals: dict[int, Callable[..., Any]] = {}  # keeps the ids valid
        # Strong refs: a monitor keeps no engine alive, and its ledger outlives the engine,
        # so errors counted by hooks of engines the suite has dropped are still summed.
        self.monitors: list[tuple[Any, str]] = []  # (PoolMonitor, test that made it)
        self.seen: set[int] = set()
        self.create_calls = 0
        self.failures: list[dict[str, str]] = []
        self.failure_count = 0
        self.logs: list[dict[str, str]] = []
        self.log_counts: dict[str, int] = {}


_state = _State()


# -- instrumentation ------------------------------------------------------------------------
def _instrument(engine: Any) -> None:
    """Instrument one new engine; record, never raise."""
    from sqlalchemy.engine import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

    import monitor

    _state.create_calls += 1
    if not isinstance(engine, Engine | AsyncEngine):
        return  # a mock or test double: nothing with a pool to instrument
    try:
        pm = monitor.instrument(engine)
    except Exception as exc:  # a finding, reported; the test goes on with a bare engine
        _state.failure_count += 1
        if len(_state.failures) < MAX_RECORDS:
            _state.failures.append({"test": _state.current_test, "error": repr(exc)})
        return
    if id(pm) not in _state.seen:  # instrumenting an engine twice returns the same monitor
        _state.seen.add(id(pm))
        _state.monitors.append((pm, _state.current_test))


def _wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    """One wrapper per original function, so every patched name gets the same object."""
    existing = _state.wrappers.get(id(original))
    if existing is not None:
        return existing

    @functools.wraps(original)
    def create(*args: Any, **kwargs: Any) -> Any:
        engine = original(*args, **kwargs)
        _instrument(engine)
        return engine

    _state.wrappers[id(original)] = create
    _state.originals[id(original)] = original
    return create


def _patch() -> None:
    """Replace the factories at every known name, and any `sqlalchemy.testing.*` module
    attribute already bound to one of them (e.g. `requirements.create_engine`)."""
    import importlib

    # Import them all before patching any: `sqlalchemy.ext.asyncio.engine` binds
    # `create_engine` at import, and must keep the original (else every async engine's sync
    # engine would be instrumented first, not the AsyncEngine as an application does).
    targets = [(importlib.import_module(name), attr) for name, attr in TARGETS]
    wrappers = {id(w) for w in _state.wrappers.values()}
    for module, attr in targets:
        current = getattr(module, attr)
        if id(current) not in wrappers:
            setattr(module, attr, _wrapper(current))
    for name, module in list(sys.modules.items()):
        if module is None or not (
            name == "sqlalchemy.testing" or name.startswith("sqlalchemy.testing.")
        ):
            continue
        for attr, value in list(vars(module).items()):
            if id(value) in _state.originals and value is _state.originals[id(value)]:
                setattr(module, attr, _state.wrappers[id(value)])


class _MonitorLogHandler(logging.Handler):
    """Keeps what the `monitor` logger (and its children) says at WARNING or above."""

    def emit(self, record: logging.LogRecord) -> None:
        key = f"{record.levelname} {record.name}"
        _state.log_counts[key] = _state.log_counts.get(key, 0) + 1
        if len(_state.logs) < MAX_RECORDS:
            try:
                message = record.getMessage()
            except Exception as exc:
                message = f"<unformattable: {exc!r}>"
            if record.exc_info and record.exc_info[1] is not None:
                message += f" [{record.exc_info[1]!r}]"
            _state.logs.append(
                {
                    "level": record.levelname,
                    "logger": record.name,
                    "test": _state.current_test,
                    "message": message,
                }
            )


def _errors_of(pm: Any) -> int:
    """`pool_monitor_errors_total` of one monitor."""
    return int(pm.ledger.counters.errors)


def _sqlalchemy_check() -> dict[str, Any]:
    """Exactly one SQLAlchemy may be in use. There is one `sqlalchemy` in sys.modules, and
    `monitor` uses it, but the sdist's conftest may put its own `lib/` first on sys.path:
    every loaded `sqlalchemy.*` module must come from the same directory."""
    import sqlalchemy
    import sqlalchemy.util

    root = os.path.dirname(os.path.abspath(sqlalchemy.__file__ or ""))
    stray = sorted(
        name
        for name, module in list(sys.modules.items())
        if (name == "sqlalchemy" or name.startswith("sqlalchemy."))
        and getattr(module, "__file__", None)
        and not os.path.abspath(module.__file__).startswith(root + os.sep)
    )
    compiled = getattr(sqlalchemy.util, "has_compiled_ext", lambda: None)()
    return {
        "version": sqlalchemy.__version__,
        "path": root,
        "compiled_extensions": compiled,
        "stray_modules": stray[:20],
    }


def _snapshot_state() -> dict[str, Any]:
    """The snapshot writer's failures and how far the hold board was used (its highest
    slot ever taken: nothing there means no checkout went through it)."""
    try:
        from monitor.exporters import board, snapshot

        own = board.current[0]
        used = 0 if own is None or not own.high_index else (own.high_index - board.FIRST) // 2 + 1
        return {"snapshot_write_errors": snapshot.write_errors(), "board_slots_used": used}
    except Exception as exc:  # the library is being rewritten: say so, do not crash
        return {"snapshot_state_unreadable": repr(exc)}


def _write_report(path: str) -> None:
    errors = 0
    per_monitor: list[dict[str, Any]] = []
    unreadable: list[str] = []
    for pm, test in _state.monitors:
        try:
            count = _errors_of(pm)
        except Exception as exc:  # the library is being rewritten: say so, do not crash
            unreadable.append(f"{getattr(pm, 'name', '?')}: {exc!r}")
            continue
        errors += count
        if count:
            per_monitor.append({"pool": pm.name, "errors": count, "created_in": test})
    report = {
        "sqlalchemy": _sqlalchemy_check(),
        "create_calls": _state.create_calls,
        "engines_instrumented": len(_state.monitors),
        "instrument_failures": _state.failure_count,
        "instrument_failure_samples": _state.failures,
        "pool_monitor_errors_total": errors,
        **_snapshot_state(),
        "monitors_with_errors": per_monitor[:MAX_RECORDS],
        "error_counter_unreadable": unreadable[:MAX_RECORDS],
        "monitor_log_counts": _state.log_counts,
        "monitor_error_logs": [r for r in _state.logs if r["level"] in ("ERROR", "CRITICAL")],
        "monitor_warning_logs": [r for r in _state.logs if r["level"] == "WARNING"][:20],
    }
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def _instrumenting() -> bool:
    return os.environ.get(MODE_VAR) == "instrument"


def _skip_missing_extensions() -> None:
    missing = set(filter(None, os.environ.get(PG_MISSING_VAR, "").split(",")))
    if not missing:
        return
    from sqlalchemy.dialects.postgresql import provision

    extensions = getattr(provision, "_extensions", [])
    extensions[:] = [item for item in extensions if item[0] not in missing]


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    _skip_missing_extensions()
    # After the sdist's conftest has chosen which `sqlalchemy` is imported, before the
    # session creates its first engine (pytest_sessionstart) and before tests are collected.
    if not _instrumenting():
        return
    handler = _MonitorLogHandler(logging.WARNING)
    logging.getLogger("monitor").addHandler(handler)
    _patch()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    # Catch any sqlalchemy.testing module imported since configure that bound an original.
    if _instrumenting():
        _patch()


# -- outcomes -------------------------------------------------------------------------------
def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    _state.current_test = nodeid


def _message(report: pytest.TestReport | pytest.CollectReport) -> str:
    """The failure's exception line(s) and where it was raised, not the whole traceback."""
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return f"{crash.message}\n  at {crash.path}:{crash.lineno}"
    lines = [line for line in str(report.longrepr or "").splitlines() if line.strip()]
    return "\n".join(lines[-6:])


def _append(record: dict[str, Any]) -> None:
    path = os.environ.get(OUTCOMES_VAR)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    record: dict[str, Any] = {
        "id": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "seconds": round(report.duration, 3),
    }
    if hasattr(report, "wasxfail"):
        record["xfail"] = True
    if report.failed:
        record["message"] = _message(report)
    _append(record)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _append(
            {
                "id": report.nodeid,
                "when": "collect",
                "outcome": "failed",
                "message": _message(report),
            }
        )


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    # trylast: after SQLAlchemy's own final cleanup disposed its engines (counted too).
    path = os.environ.get(REPORT_VAR)
    if _instrumenting() and path:
        _write_report(path)
