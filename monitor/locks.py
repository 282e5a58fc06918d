"""Instrumented application locks: how long callers wait for a lock, and hold it.

Seed 001's session stores race without a lock and serialize behind a global one; the wait
histogram shows which, per lock name. `lock(name, key=...)` gives per-key locks (one lock per
key, metrics per name, so cardinality stays bounded by names).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Hashable
from types import TracebackType
from typing import Any

from monitor.config import ConfigError
from monitor.histogram import Histogram

_perf = time.perf_counter


class LockStats:
    __slots__ = ("hold", "wait")

    def __init__(self) -> None:
        self.wait = Histogram()
        self.hold = Histogram()


_stats_lock = threading.Lock()  # guards the histograms
_registry_lock = threading.Lock()  # guards `_locks`; never held while taking _stats_lock
_stats: dict[str, LockStats] = {}
#: Raw observations, one queue per OpenTelemetry bridge (see exporters.otel).
_otel_queues: list[deque[tuple[str, str, float]]] = []
_OTEL_LIMIT = 200_000
otel_dropped = 0
_locks: weakref.WeakValueDictionary[tuple[str, Hashable], Any] = weakref.WeakValueDictionary()


def _stats_for(name: str) -> LockStats:
    with _stats_lock:
        stats = _stats.get(name)
        if stats is None:
            stats = _stats[name] = LockStats()
        return stats


def _record(name: str, stats: LockStats, histogram: str, seconds: float) -> None:
    global otel_dropped
    with _stats_lock:
        getattr(stats, histogram).observe(seconds)
        for queue in _otel_queues:
            if len(queue) < _OTEL_LIMIT:
                queue.append((histogram, name, seconds))
            else:
                otel_dropped += 1


def add_otel_queue() -> deque[tuple[str, str, float]]:
    """A queue of raw observations for one more OpenTelemetry bridge."""
    global _otel_queues
    queue: deque[tuple[str, str, float]] = deque()
    with _stats_lock:
        _otel_queues = [*_otel_queues, queue]
    return queue


class InstrumentedLock:
    """A `threading.Lock` (or `RLock`) that records wait and hold times under its name."""

    def __init__(self, name: str, reentrant: bool = False) -> None:
        self.name = name
        self.reentrant = reentrant
        self._lock = threading.RLock() if reentrant else threading.Lock()
        self._stats = _stats_for(name)
        self._depth = 0
        self._acquired_at = 0.0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        started = _perf()
        acquired = self._lock.acquire(blocking, timeout)
        if acquired:
            now = _perf()
            if self._depth == 0:  # only the owner touches _depth once it holds the lock
                self._acquired_at = now
                _record(self.name, self._stats, "wait", now - started)
            self._depth += 1
        return acquired

    def release(self) -> None:
        depth = self._depth - 1
        held = _perf() - self._acquired_at
        self._depth = depth
        try:
            self._lock.release()
        except BaseException:  # not ours to release: leave the bookkeeping as it was
            self._depth = depth + 1
            raise
        if depth == 0:
            _record(self.name, self._stats, "hold", held)

    def _after_fork(self) -> None:
        """In a forked child: the lock is free again (its holder did not fork with us)."""
        reinit = getattr(self._lock, "_at_fork_reinit", None)
        if reinit is not None:
            reinit()
        else:  # pragma: no cover
            self._lock = threading.RLock() if self.reentrant else threading.Lock()
        self._depth = 0

    def locked(self) -> bool:
        return self._depth > 0

    def __enter__(self) -> InstrumentedLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<InstrumentedLock {self.name!r} locked={self.locked()}>"


class InstrumentedAsyncLock:
    """An `asyncio.Lock` that records wait and hold times under its name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = asyncio.Lock()
        self._stats = _stats_for(name)
        self._acquired_at = 0.0

    async def acquire(self) -> bool:
        started = _perf()
        await self._lock.acquire()
        self._acquired_at = _perf()
        _record(self.name, self._stats, "wait", self._acquired_at - started)
        return True

    def release(self) -> None:
        held = _perf() - self._acquired_at
        self._lock.release()
        _record(self.name, self._stats, "hold", held)

    def locked(self) -> bool:
        return self._lock.locked()

    async def __aenter__(self) -> InstrumentedAsyncLock:
        await self.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"lock name must be a non-empty string, got {name!r}")
    return name


def lock(name: str, key: Hashable = None, *, reentrant: bool = False) -> InstrumentedLock:
    """The process-wide instrumented lock called `name` (and `key`, for per-key locks).

    The same (name, key) gives the same lock while anyone holds a reference to it, so
    `with monitor.lock("session-store"):` excludes as expected.
    """
    _check_name(name)
    with _registry_lock:
        existing = _locks.get((name, key))
        if existing is None:
            existing = InstrumentedLock(name, reentrant)
            _locks[(name, key)] = existing
    if not isinstance(existing, InstrumentedLock) or existing.reentrant != reentrant:
        raise ConfigError(f"lock {name!r} already exists as {existing!r}; one name, one kind")
    return existing


def async_lock(name: str, key: Hashable = None) -> InstrumentedAsyncLock:
    """The process-wide instrumented asyncio lock called `name` (and `key`)."""
    _check_name(name)
    with _registry_lock:
        existing = _locks.get(("async", name, key))  # type: ignore[arg-type]
        if existing is None:
            existing = InstrumentedAsyncLock(name)
            _locks[("async", name, key)] = existing  # type: ignore[index]
    return existing


def lock_snapshot() -> dict[str, dict[str, Any]]:
    """`{metric name: {lock name: histogram dict}}` for the exporters."""
    with _stats_lock:
        items = list(_stats.items())
        return {
            "app.lock.wait_time": {name: s.wait.to_dict() for name, s in items},
            "app.lock.hold_time": {name: s.hold.to_dict() for name, s in items},
        }


def _after_fork_in_child() -> None:
    """The child keeps its locks (a module-level `LOCK = monitor.lock(...)` must stay the
    same lock as `monitor.lock(...)`), freed and with zeroed statistics."""
    global _stats_lock, _registry_lock, otel_dropped
    _stats_lock = threading.Lock()
    _registry_lock = threading.Lock()
    for stats in _stats.values():
        stats.wait = Histogram()
        stats.hold = Histogram()
    for instance in list(_locks.values()):
        if isinstance(instance, InstrumentedLock):
            instance._after_fork()
    for queue in _otel_queues:
        queue.clear()
    otel_dropped = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
