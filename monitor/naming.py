"""Readable names for the threads and asyncio tasks that hold connections (logs, snapshots).

Resolved only when something is reported: the hot path keeps the thread ident and a weak
reference to the task."""

from __future__ import annotations

import threading
from typing import Any


def thread_name(ident: int) -> str:
    thread = getattr(threading, "_active", {}).get(ident)
    return thread.name if thread is not None else f"thread-{ident}"


def task_name(task: Any) -> str | None:
    if task is None:
        return None
    try:
        return str(task.get_name())
    except Exception:
        return repr(task)
