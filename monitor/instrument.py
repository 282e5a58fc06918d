"""Attach a `PoolMonitor` to an engine, and detach it: the library's entry points.

The monitor itself is `monitor.pool_monitor`; the set of monitors is `monitor.registry`.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from sqlalchemy.engine import Engine

from monitor import registry, watchdog
from monitor.config import ConfigError, load_settings
from monitor.exporters import snapshot
from monitor.pool_monitor import (
    LongHeldEvent,
    PoolMonitor,
    _sync_engine,
    default_pool_name,
)
from monitor.registry import monitors, on_every_monitor


def instrument(engine: Any, pool_name: str | None = None, **settings: Any) -> PoolMonitor:
    """Start monitoring `engine`'s pool (an `Engine` or `AsyncEngine`).

    Settings are keyword arguments with `POOL_MONITOR_<NAME>` environment variables as
    defaults; an invalid value raises `ConfigError` naming it. Instrumenting the same
    engine twice returns the same monitor.
    """
    sync = _sync_engine(engine)
    resolved = load_settings(settings)
    if resolved.trace_pool_wait and importlib.util.find_spec("opentelemetry") is None:
        raise ConfigError(
            "trace_pool_wait needs OpenTelemetry's API: pip install 'pool-monitor[otel]' "
            "(or opentelemetry-api), or leave trace_pool_wait off"
        )
    if pool_name is not None and (not isinstance(pool_name, str) or not pool_name.strip()):
        raise ConfigError(f"pool_name must be a non-empty string, got {pool_name!r}")
    with registry.lock:
        existing = registry.by_engine.get(sync)
        if existing is not None and existing.active:
            return existing
        pm = PoolMonitor(sync, _unique_name(pool_name, sync), resolved)
        pm._attach()
        registry.by_engine[sync] = pm
        callbacks = list(registry.callbacks)
    for callback in callbacks:
        callback(pm)
    watchdog.ensure_running()
    if resolved.snapshot_dir:
        snapshot.ensure_writer(resolved.snapshot_dir, resolved.snapshot_interval)
    return pm


def uninstrument(engine: Any) -> None:
    """Remove every listener and patch, leaving pool and dialect as they were. Its numbers
    stop being exported. Detaching under the registry lock keeps a concurrent
    `instrument()` of the same engine from patching before we have unpatched."""
    sync = _sync_engine(engine)
    with registry.lock:
        pm = registry.by_engine.pop(sync, None)
        if pm is not None:
            pm._detach()


def _unique_name(pool_name: str | None, engine: Engine) -> str:
    """Two pools under one name would export duplicate series (Prometheus drops them): an
    explicit clash is an error; a derived default name gets a `#2`, `#3`… suffix."""
    taken = {pm.name for pm in registry.by_engine.values() if pm.active}
    if pool_name is not None:
        if pool_name in taken:
            raise ConfigError(
                f"pool_name {pool_name!r} is already used by another "
                f"instrumented engine; pool names must be unique per process"
            )
        return pool_name
    name = default_pool_name(engine)
    suffix = 2
    candidate = name
    while candidate in taken:
        candidate = f"{name}#{suffix}"
        suffix += 1
    return candidate


__all__ = [
    "LongHeldEvent",
    "PoolMonitor",
    "instrument",
    "monitors",
    "on_every_monitor",
    "uninstrument",
]
