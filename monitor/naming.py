"""Readable names for the threads and asyncio tasks that hold connections (logs, snapshots).

Resolved only when something is reported: the hot path keeps the thread ident and a weak
reference to the task."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any


def thread_name(ident: int, last_known: str | None = None) -> str:
    thread = getattr(threading, "_active", {}).get(ident)
    if thread is not None:
        return thread.name
    return last_known if last_known is not None else f"thread-{ident}"


def thread_labels(idents: Iterable[int], last_known: Mapping[int, str] | None = None) -> list[str]:
    """Names for threads shown side by side, quoted, with their idents where one name
    stands for several threads (every threadpool worker is 'AnyIO worker thread').
    `last_known` names threads that may have ended since."""
    idents = list(idents)
    known = last_known or {}
    names = [thread_name(ident, known.get(ident)) for ident in idents]
    threads_named: dict[str, set[int]] = {}
    for ident, name in zip(idents, names, strict=True):
        threads_named.setdefault(name, set()).add(ident)
    return [
        f"{name!r} (ident {ident})" if len(threads_named[name]) > 1 else repr(name)
        for name, ident in zip(names, idents, strict=True)
    ]


def task_name(task: Any) -> str | None:
    if task is None:
        return None
    try:
        return str(task.get_name())
    except Exception:
        return repr(task)
