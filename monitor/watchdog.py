"""Long-held detection: one daemon thread per process that watches every live hold.

Past the threshold it raises exactly one alert per hold, showing the holder's *current*
stack (what the code is doing while it keeps the connection), which is what tells an
"external API call inside a session" from a slow query. It wakes every tenth of the
smallest threshold, so an alert comes within 10% of it; the hot path never waits for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from types import FrameType
from typing import Any

from monitor.hooks import swallow
from monitor.ledger import LONG_HELD, Hold
from monitor.naming import task_name, thread_name
from monitor.pool_monitor import LongHeldEvent, PoolMonitor, trace_fields
from monitor.registry import monitors
from monitor.sites import format_stack, walk_frames

log = logging.getLogger("monitor.long_held")

_MIN_WAKE = 0.01
_MAX_WAKE = 1.0

_lock = threading.Lock()
_wake = threading.Event()
_thread: threading.Thread | None = None
_pid: int | None = None


def ensure_running() -> None:
    """Start the watchdog in this process if it is not running (again, after a fork)."""
    global _thread, _pid
    with _lock:
        if _thread is not None and _thread.is_alive() and _pid == os.getpid():
            _wake.set()  # a new monitor may have a smaller threshold
            return
        _pid = os.getpid()
        _thread = threading.Thread(target=_run, name="pool-monitor-watchdog", daemon=True)
        _thread.start()


def wake_interval(pools: list[PoolMonitor]) -> float:
    thresholds = [
        pm.settings.long_held_threshold for pm in pools if pm.settings.long_held_threshold > 0
    ]
    if not thresholds:
        return _MAX_WAKE
    return min(_MAX_WAKE, max(_MIN_WAKE, min(thresholds) / 10.0))


def _run() -> None:
    while True:
        pools = monitors()
        _wake.wait(wake_interval(pools))
        _wake.clear()
        scan(monitors())


def scan(pools: list[PoolMonitor]) -> int:
    """Alert on every hold that crossed its pool's threshold; returns how many."""
    raised = 0
    now = time.perf_counter()
    for pm in pools:
        try:
            pm.ledger.drain()  # fold returned holds off the hot path, and bound memory
            due = pm.due_long_held(now)
        except Exception as exc:
            swallow(pm, "watchdog", exc)
            continue
        for hold in due:
            try:
                alert(pm, hold, now)
                raised += 1
            except Exception as exc:
                swallow(pm, "watchdog", exc)
    return raised


def current_stack(pm: PoolMonitor, hold: Hold) -> list[str]:
    """The holder's stack right now, user frames only, innermost last."""
    task = hold.task
    coro = task.get_coro() if task is not None else None
    if task is not None and not getattr(coro, "cr_running", False):
        frames = task_frames(task)
    else:  # a thread, or a task running right now on its loop's thread
        frames = walk_frames(sys._current_frames().get(hold.thread))
    return format_stack(pm.sites.user_frames(frames))


def task_frames(task: Any) -> list[FrameType]:
    """A task's frames, outermost first, down the whole await chain.

    `Task.get_stack()` returns only the outermost coroutine's frame while the task is
    suspended (a suspended frame has no `f_back`), which under a web server is the
    server's own code: the handler that holds the connection sits deeper, reachable only
    through `cr_await`. While the task runs (its greenlet executing SQL), the frames of
    the running coroutines are linked by `f_back` instead, and `get_stack()` has them.
    """
    frames: list[FrameType] = []
    awaitable = task.get_coro()
    for _ in range(256):  # an await chain is never this deep; a cycle must not hang us
        if awaitable is None:
            break
        frame = (
            getattr(awaitable, "cr_frame", None)
            or getattr(awaitable, "gi_frame", None)
            or getattr(awaitable, "ag_frame", None)
        )
        if frame is not None:
            frames.append(frame)
        awaitable = (
            getattr(awaitable, "cr_await", None)
            or getattr(awaitable, "gi_yieldfrom", None)
            or getattr(awaitable, "ag_await", None)
        )
    if len(frames) <= 1:  # a bare coroutine: the standard answer is complete
        with contextlib.suppress(Exception):
            frames = list(task.get_stack())
    return frames


def alert(pm: PoolMonitor, hold: Hold, now: float) -> LongHeldEvent:
    """One WARNING, one count for the site, and the user's callbacks, for one hold."""
    event = LongHeldEvent(
        pool=pm.name,
        age_s=now - hold.start,
        site=pm.sites.name(hold.site),
        thread=thread_name(hold.thread),
        task=task_name(hold.task),
        backend_pid=pm.backend_pid(hold),
        stack=tuple(current_stack(pm, hold)),
        **trace_fields(hold),
    )
    with pm.ledger.lock:
        pm.ledger.sites.totals(hold.site)[LONG_HELD] += 1
    stack_text = "".join(f"\n    {line}" for line in event.stack) or "\n    (no user frames)"
    log.warning(
        "pool %r: connection held for %.3f s (threshold %g s), checked out at %s by thread "
        "%r, task %r, backend pid %s%s; the holder is now at:%s",
        event.pool,
        event.age_s,
        pm.settings.long_held_threshold,
        event.site,
        event.thread,
        event.task,
        event.backend_pid,
        f", trace {event.trace_id} span {event.span_id}" if event.trace_id else "",
        stack_text,
        extra=_extra(event),
    )
    for callback in pm.settings.on_long_held:
        try:
            callback(event)
        except Exception as exc:
            swallow(pm, "on_long_held callback", exc)
    return event


def _extra(event: LongHeldEvent) -> dict[str, Any]:
    # `thread_name`/`task_name`: LogRecord already has `thread` (an id) and, on 3.12+,
    # `taskName`; extra keys may not overwrite them.
    return {
        "pool": event.pool,
        "age_s": event.age_s,
        "site": event.site,
        "thread_name": event.thread,
        "task_name": event.task,
        "backend_pid": event.backend_pid,
        "stack": list(event.stack),
        "trace_id": event.trace_id,
        "span_id": event.span_id,
    }


def _after_fork_in_child() -> None:
    global _lock, _wake, _thread, _pid
    _lock = threading.Lock()
    _wake = threading.Event()
    _thread = None
    _pid = None
    restart = monitors()
    if restart:
        ensure_running()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
