"""pool-monitor: observability for SQLAlchemy connection pools.

import monitor
pm = monitor.instrument(engine, pool_name="api", long_held_threshold=5.0)
app.add_route("/metrics", monitor.metrics_app())
"""

from __future__ import annotations

from typing import Any

from monitor.config import ConfigError, Settings
from monitor.exporters.prometheus import metrics_app
from monitor.instrument import instrument as _instrument
from monitor.instrument import uninstrument
from monitor.locks import async_lock, lock
from monitor.pool_monitor import LongHeldEvent, PoolMonitor
from monitor.registry import monitors

__version__ = "0.1.0"


def instrument(engine: Any, pool_name: str | None = None, **settings: Any) -> PoolMonitor:
    """Monitor `engine`'s pool; see `monitor.instrument.instrument`. Also registers the
    Prometheus collector in prometheus_client's default registry."""
    from monitor.exporters.prometheus import register

    pm = _instrument(engine, pool_name, **settings)
    register()
    return pm


instrument.__doc__ = _instrument.__doc__


def instrument_otel(meter_provider: Any = None) -> Any:
    """Publish every instrumented pool as OpenTelemetry metrics (semconv names and units)."""
    from monitor.exporters.otel import instrument_otel as _instrument_otel

    return _instrument_otel(meter_provider)


__all__ = [
    "ConfigError",
    "LongHeldEvent",
    "PoolMonitor",
    "Settings",
    "async_lock",
    "instrument",
    "instrument_otel",
    "lock",
    "metrics_app",
    "monitors",
    "uninstrument",
]
