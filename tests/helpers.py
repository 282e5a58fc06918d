"""Small helpers shared by the tests: engines that clean up after themselves, and readers
for snapshot values."""

from __future__ import annotations

import time
from collections.abc import Callable
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
