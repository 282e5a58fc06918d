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
#: Raw observations for the OpenTelemetry bridge; None until it is enabled.
otel_queue: deque[tuple[str, str, float]] | None = None
_locks: weakref.WeakValueDictionary[tuple[str, Hashable], Any] = weakref.WeakValueDictionary()


def _stats_for(name: str) -> LockStats:
    with _stats_lock:
        stats = _stats.get(name)
        if stats is None:
            stats = _stats[name] = LockStats()
        return stats


def _record(name: str, stats: LockStats, histogram: str, seconds: float) -> None:
    with _stats_lock:
        getattr(stats, histogram).observe(seconds)
    if otel_queue is not None:
        otel_queue.append((histogram, name, seconds))


def enable_otel_queue(limit: int) -> None:
    global otel_queue
    if otel_queue is None:
        otel_queue = deque(maxlen=limit)


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
        self._depth -= 1
        if self._depth == 0:
            held = _perf() - self._acquired_at
            self._lock.release()
            _record(self.name, self._stats, "hold", held)
        else:
            self._lock.release()

    def locked(self) -> bool:
        return self._depth > 0

    def __enter__(self) -> InstrumentedLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
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

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:  # fmt: skip
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
    global _stats_lock, _registry_lock, _stats
    _stats_lock = threading.Lock()
    _registry_lock = threading.Lock()
    _stats = {}
    _locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
