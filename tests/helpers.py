"""Small helpers shared by the tests: engines that clean up after themselves, and readers
for snapshot values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

import monitor


class Engines:
    """Creates engines for a test and disposes/uninstruments all of them afterwards."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._engines: list[Any] = []

    def sync(self, **kwargs: Any) -> sa.Engine:
        engine = sa.create_engine(self.url, **kwargs)
        self._engines.append(engine)
        return engine

    def asyncio(self, **kwargs: Any) -> Any:
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(self.url, **kwargs)
        self._engines.append(engine)
        return engine

    def close(self) -> None:
        for engine in self._engines:
            monitor.uninstrument(engine)
            sync = getattr(engine, "sync_engine", engine)
            sync.dispose()


def gauge(pm: monitor.PoolMonitor, name: str, attr: str | None = None) -> Any:
    value = pm.snapshot()["gauges"].get(name)
    return value if attr is None or value is None else value.get(attr)


def counter(pm: monitor.PoolMonitor, name: str, attr: str | None = None) -> Any:
    value = pm.snapshot()["counters"][name]
    return value if attr is None else value.get(attr, 0)


def hist(pm: monitor.PoolMonitor, name: str) -> dict[str, Any]:
    return pm.snapshot()["histograms"][f"db.client.connection.{name}"]


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll `predicate` (bounded in time); fail with `what` if it never holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")


def assert_no_negative(pm: monitor.PoolMonitor) -> None:
    snap = pm.snapshot()
    for name, value in snap["gauges"].items():
        values = value.values() if isinstance(value, dict) else [value]
        assert all(v >= 0 for v in values), (name, value)


ROOT = Path(__file__).resolve().parents[1]


def spawn_worker(module: str, spec: dict[str, Any]) -> subprocess.Popen[str]:
    """Run `worker(argv)` of test module `module` (e.g. "tests.test_sidecar_e2e") in a
    fresh Python process with `spec` as JSON, stdin and stdout as text pipes: a real
    worker process of its own, as a web server's would be."""
    code = f"import sys; from {module} import worker; sys.exit(worker(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(spec)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def spawn_sidecar(
    snapshot_dir: Path | str, port: int, log: Any, *options: str
) -> subprocess.Popen[bytes]:
    """The real `pool-monitor sidecar` on 127.0.0.1:`port`, its output into `log` (an
    open binary file)."""
    command = [sys.executable, "-m", "monitor.cli", "sidecar", "--snapshot-dir", str(snapshot_dir)]
    command += ["--listen", f"127.0.0.1:{port}", *options]
    return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
