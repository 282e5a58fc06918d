"""Drivers: run each scenario's variants against the running demo service, and measure.

A driver generates the scenario's load over HTTP (loopback only) and turns what happened
into the report's figures. Figures come from three places, never from assumptions: the
monitor's own metrics (a variant's pool snapshots after minus before, over every worker),
the database (ground truth the service reports through its routes), and what the clients
saw (status codes, latencies).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from demo_app import snapshots
from demo_app.plan import Plan
from demo_app.sampler import MonitorSampler
from demo_app.settings import DemoSettings

T = TypeVar("T")


class ProgressTask(Protocol):
    """One line of the runner's progress display: `completed` of the total, plus a note."""

    def update(self, completed: float, info: str = "") -> None: ...

    def finish(self, summary: str = "") -> None: ...


class NullTask:
    def update(self, completed: float, info: str = "") -> None:
        pass

    def finish(self, summary: str = "") -> None:
        pass


ProgressFactory = Callable[[str, float | None], ProgressTask]


@dataclass
class Measured:
    """A variant's window: the monitor's deltas per pool, and when it ran."""

    pools: dict[str, snapshots.Snapshot]
    started: float
    ended: float
    workers_fresh: bool


@dataclass
class DriveContext:
    """What every driver needs: where the service is, how hard to push, how to report."""

    base_url: str
    external_url: str
    settings: DemoSettings
    plan: Plan
    sampler: MonitorSampler
    progress: ProgressFactory = field(default=lambda label, total: NullTask())
    #: Every measured window so far, by label (`scenario/variant`): the runner turns them
    #: into the monitor's findings for the report.
    windows: dict[str, Measured] = field(default_factory=dict)

    @property
    def latency_s(self) -> float:
        return self.settings.external_latency_s


async def measure(
    ctx: DriveContext, label: str, pools: list[str], body: Callable[[], Awaitable[T]]
) -> tuple[T, Measured]:
    """Run `body` between two all-worker snapshots; return its value and the pool deltas."""
    fresh_before = await ctx.sampler.fresh()
    before = ctx.sampler.merged()
    span = ctx.sampler.mark(label)
    value = await body()
    span.end = time.time()
    fresh_after = await ctx.sampler.fresh(after=span.end)
    after = ctx.sampler.merged()
    deltas = {p: snapshots.delta(after[p], before.get(p)) for p in pools if p in after}
    measured = Measured(deltas, span.start, span.end, fresh_before and fresh_after)
    ctx.windows[label] = measured
    return value, measured


def load_progress(task: ProgressTask, started: float) -> Callable[[int, int], None]:
    """A load generator callback that shows elapsed time and request counts."""

    def update(done: int, failed: int) -> None:
        task.update(time.monotonic() - started, f"{done} requests, {failed} failed")

    return update


def pool_figures(delta: snapshots.Snapshot) -> dict[str, Any]:
    """The monitor's view of one pool over a variant: hold and wait times, timeouts, sites."""
    use = snapshots.histogram(delta, snapshots.USE_TIME)
    wait = snapshots.histogram(delta, snapshots.WAIT_TIME)
    held = use["sum"] if use else 0.0
    return {
        "checkouts": snapshots.total(delta, snapshots.CHECKOUTS),
        "timeouts": snapshots.total(delta, snapshots.TIMEOUTS),
        "use_time_mean_s": snapshots.mean(use),
        "use_time_p50_s": snapshots.quantile(use, 0.5),
        "use_time_p99_s": snapshots.quantile(use, 0.99),
        "wait_time_p99_s": snapshots.quantile(wait, 0.99),
        # Held but not running SQL: an external call (or any slow non-DB work) in a session.
        "idle_in_use_share": snapshots.total(delta, snapshots.IDLE_IN_USE) / held if held else None,
        "cross_thread_uses": snapshots.total(delta, snapshots.CROSS_THREAD),
        "use_time_histogram": use,
        "wait_time_histogram": wait,
    }


def site_figures(delta: snapshots.Snapshot, variant: str) -> dict[str, dict[str, float]]:
    """Hold time by code site for the variant's own functions (`<variant>_…`)."""
    return snapshots.sites(delta, f"{variant}_")


def registry() -> dict[str, Callable[[DriveContext], Awaitable[dict[str, dict[str, Any]]]]]:
    """Scenario name → driver, in the order the runner plays them."""
    from demo_app.drivers import (
        duplicate_rows,
        external_call,
        idempotent_payment,
        pool_isolation,
        threaded,
    )

    return {
        "external_call": external_call.drive,
        "pool_isolation": pool_isolation.drive,
        "duplicate_rows": duplicate_rows.drive,
        "idempotent_payment": idempotent_payment.drive,
        "lost_update": threaded.drive_lost_update,
        "shared_session": threaded.drive_shared_session,
        "session_store": threaded.drive_session_store,
    }
