"""The demo's engines (one per pool), instrumented with `monitor`.

Pools, as the seed (002) draws them:

* `api`        – async, for request handlers: small, fails fast.
* `background` – async, for background jobs in the split-pool variant: patient.
* `shared`     – async, the anti-pattern: API requests *and* background jobs on one pool,
  sized like `api`.
* `worker`     – sync, for the thread-based seeds (003's two incrementing threads, 000's
  heartbeat thread), which use plain `Session`s from threads.

Each engine sets `application_name=demo-<pool>`, so PostgreSQL's `pg_stat_activity` (and
the sidecar's PostgreSQL collector) splits connections the same way the pool metrics do.

The monitor records the OpenTelemetry span current at each checkout (its default), and,
with `trace_pool_wait`, adds a `pool.wait` span to every checkout made under a sampled
trace: when the service is traced (`demo_app.traces`), the requests an exhausted pool makes
wait, or time out, show that wait in their trace.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

import monitor
from demo_app.settings import DemoSettings, PoolSpec


def _engine_kwargs(spec: PoolSpec) -> dict[str, Any]:
    return {
        "pool_size": spec.size,
        "max_overflow": spec.max_overflow,
        "pool_timeout": spec.timeout_s,
        "pool_pre_ping": True,
        "connect_args": {"application_name": f"demo-{spec.name}"},
    }


class Database:
    """All engines and session factories of one demo process, plus their pool monitors."""

    def __init__(self, settings: DemoSettings, *, instrument: bool = True) -> None:
        self.settings = settings
        url = settings.database_url
        self.api: AsyncEngine = create_async_engine(url, **_engine_kwargs(settings.api_pool))
        self.background: AsyncEngine = create_async_engine(
            url, **_engine_kwargs(settings.background_pool)
        )
        self.shared: AsyncEngine = create_async_engine(url, **_engine_kwargs(settings.shared_pool))
        self.worker: Engine = create_engine(url, **_engine_kwargs(settings.worker_pool))

        # expire_on_commit=False as in the seed: objects stay readable after the session ends.
        def _async(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
            return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)

        self.api_sessions = _async(self.api)
        self.background_sessions = _async(self.background)
        self.shared_sessions = _async(self.shared)
        # The seed's `SessionLocal` for threads (seed 000 / 003 use the defaults).
        self.worker_sessions: sessionmaker[Session] = sessionmaker(self.worker, autoflush=False)

        self.monitors: dict[str, monitor.PoolMonitor] = {}
        if instrument:
            for name, engine in self.engines().items():
                self.monitors[name] = monitor.instrument(
                    engine,
                    pool_name=name,
                    long_held_threshold=settings.long_held_threshold_s,
                    trace_pool_wait=True,
                )

    def engines(self) -> dict[str, AsyncEngine | Engine]:
        return {
            "api": self.api,
            "background": self.background,
            "shared": self.shared,
            "worker": self.worker,
        }

    def async_sessions(self, pool: str) -> async_sessionmaker[AsyncSession]:
        """The session factory of an async pool by name (`api`, `background`, `shared`)."""
        return {
            "api": self.api_sessions,
            "background": self.background_sessions,
            "shared": self.shared_sessions,
        }[pool]

    def snapshots(self) -> dict[str, dict[str, Any]]:
        """Each pool's `PoolMonitor.snapshot()`, keyed by pool name."""
        return {name: pm.snapshot() for name, pm in self.monitors.items()}

    def snapshot(self, pool: str) -> dict[str, Any]:
        return self.monitors[pool].snapshot()

    async def dispose(self) -> None:
        """Uninstrument, then close every pooled connection."""
        for name, engine in self.engines().items():
            if name in self.monitors:
                monitor.uninstrument(engine)
        self.monitors.clear()
        for engine in (self.api, self.background, self.shared):
            await engine.dispose()
        self.worker.dispose()
