"""Pool gauges, read from the live pool at collection time.

Counting +1/-1 from events drifts (late attach, detach, GC, dispose); the pool itself
always knows. Only what a pool class cannot tell is derived from our live holds:

| pool class                       | used           | idle             | max | idle.max | overflow |
|----------------------------------|----------------|------------------|-----|----------|----------|
| QueuePool, AsyncAdaptedQueuePool | pool           | pool (open only) | yes | yes      | yes      |
| NullPool                         | live holds     | 0                | –   | –        | –        |
| StaticPool, AssertionPool        | live holds ≤ 1 | the one, if idle | 1   | 1        | –        |
| SingletonThreadPool              | live holds     | per-thread conns | –   | –        | –        |

"–" means omitted, not zero: an unbounded pool has no maximum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.pool import AssertionPool, NullPool, QueuePool, SingletonThreadPool, StaticPool


@dataclass(frozen=True)
class PoolGauges:
    used: int
    idle: int | None
    max: int | None
    idle_max: int | None
    overflow: int | None


def _is_open(record: Any) -> bool:
    return getattr(record, "dbapi_connection", None) is not None


def _queued_records(pool: Any) -> list[Any] | None:
    """The records waiting in a QueuePool (sync: a deque at `.queue`; asyncio: an
    asyncio.Queue whose deque is `._queue`), or None for a layout we do not know."""
    queue = getattr(pool, "_pool", None)
    for path in (("queue",), ("_queue", "_queue")):
        target: Any = queue
        for name in path:
            target = getattr(target, name, None)
        if target is not None and hasattr(target, "__iter__"):
            return list(target)
    return None


def read_gauges(pool: Any, live_holds_on_pool: int, holds_elsewhere: int) -> PoolGauges:
    """Gauges for `pool`. `live_holds_on_pool` are our holds on this pool object;
    `holds_elsewhere` are holds still out on pools retired by `engine.dispose()`, which
    are open connections in use all the same."""
    if isinstance(pool, QueuePool):
        size = pool.size()
        queued = _queued_records(pool)
        if queued is not None:
            idle = sum(1 for record in queued if _is_open(record))
        else:  # pragma: no cover - a private layout we do not know
            idle = pool.checkedin()
        max_overflow = getattr(pool, "_max_overflow", -1)
        return PoolGauges(
            used=max(0, pool.checkedout()) + holds_elsewhere,
            idle=max(0, idle),
            max=size + max_overflow if max_overflow >= 0 and size > 0 else None,
            idle_max=size if size > 0 else None,  # pool_size=0 means no limit
            overflow=max(0, pool.overflow()),
        )
    used = live_holds_on_pool + holds_elsewhere
    if isinstance(pool, NullPool):
        return PoolGauges(used, 0, None, None, None)
    if isinstance(pool, StaticPool):
        record = pool.__dict__.get("connection")  # memoized on first use
        open_ = 1 if record is not None and _is_open(record) else 0
        return PoolGauges(min(used, 1), max(0, open_ - min(live_holds_on_pool, 1)), 1, 1, None)
    if isinstance(pool, AssertionPool):
        open_ = 1 if getattr(pool, "_conn", None) is not None else 0
        return PoolGauges(min(used, 1), max(0, open_ - min(live_holds_on_pool, 1)), 1, 1, None)
    if isinstance(pool, SingletonThreadPool):
        conns = getattr(pool, "_all_conns", ())
        open_ = sum(1 for record in list(conns) if _is_open(record))
        return PoolGauges(used, max(0, open_ - live_holds_on_pool), None, None, None)
    return PoolGauges(used, None, None, None, None)
