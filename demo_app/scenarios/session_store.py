"""Seed 001: an in-memory conversation-session store written by many threads at once.

* `unlocked` – the seed's `daily/session_manager.py`: a plain dict, check-then-set and
  read-modify-write with no lock. Two writers of one session both read the old context,
  both store "old + their message", and one message is gone (the seed's "context_A 데이터
  손실"). A new session can likewise be created twice, the second overwriting the first.
* `locked`   – the seed's option 2/3 (`BaseSessionManager`): one lock per session id, so
  writes to different sessions still run in parallel.
  Locks come from `monitor.lock`, so their wait and hold times are exported
  (`app_lock_wait_time_seconds{lock_name="session-store"}`).

No database here: the seed's store is memory only. `work_s` stands for the state-machine
step between reading a context and storing the new one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Protocol

import monitor

LOCK_NAME = "session-store"


@dataclass(frozen=True)
class ConversationContext:
    """The seed's `DailyFSMContext`, reduced to what matters: the messages it holds."""

    session_id: str
    messages: tuple[str, ...] = ()

    def with_message(self, message: str) -> ConversationContext:
        return ConversationContext(self.session_id, (*self.messages, message))


class SessionStore(Protocol):
    def append_message(self, session_id: str, message: str) -> None: ...

    def get_session(self, session_id: str) -> ConversationContext | None: ...

    def session_ids(self) -> list[str]: ...


class UnlockedSessionStore:
    """❌ A dict shared by every request thread, no lock."""

    def __init__(self, work_s: float = 0.001) -> None:
        self._sessions: dict[str, ConversationContext] = {}
        self._work_s = work_s

    def append_message(self, session_id: str, message: str) -> None:
        unlocked_append_message(self._sessions, session_id, message, self._work_s)

    def get_session(self, session_id: str) -> ConversationContext | None:
        return self._sessions.get(session_id)

    def session_ids(self) -> list[str]:
        return list(self._sessions)


def unlocked_append_message(
    sessions: dict[str, ConversationContext], session_id: str, message: str, work_s: float
) -> None:
    context = sessions.get(session_id)
    if context is None:  # check ...
        context = ConversationContext(session_id)
    time.sleep(work_s)  # the FSM step; any other writer of this session may run now
    sessions[session_id] = context.with_message(message)  # ... then set: may overwrite


class LockedSessionStore:
    """✅ One lock per session id, from `monitor.lock(name, key=session_id)`.

    The monitor's lock registry hands out the same lock for the same key while it is in
    use, which also fixes the seed's `defaultdict(RLock)`: creating a key's lock there is
    itself a check-then-set. Metrics are per lock *name*, so cardinality stays bounded.
    """

    def __init__(self, work_s: float = 0.001) -> None:
        self._sessions: dict[str, ConversationContext] = {}
        self._work_s = work_s

    def append_message(self, session_id: str, message: str) -> None:
        with monitor.lock(LOCK_NAME, key=session_id):
            locked_append_message(self._sessions, session_id, message, self._work_s)

    def get_session(self, session_id: str) -> ConversationContext | None:
        with monitor.lock(LOCK_NAME, key=session_id):
            return self._sessions.get(session_id)

    def session_ids(self) -> list[str]:
        return list(self._sessions)


def locked_append_message(
    sessions: dict[str, ConversationContext], session_id: str, message: str, work_s: float
) -> None:
    """The same read-modify-write, but only ever run under the session's lock."""
    context = sessions.get(session_id) or ConversationContext(session_id)
    time.sleep(work_s)
    sessions[session_id] = context.with_message(message)


STORES: dict[str, Callable[[float], SessionStore]] = {
    "unlocked": UnlockedSessionStore,
    "locked": LockedSessionStore,
}


@dataclass(frozen=True)
class SessionStoreResult:
    variant: str
    threads: int
    sessions: int
    writes: int
    stored: int
    duration_s: float
    errors: int

    @property
    def lost_writes(self) -> int:
        return self.writes - self.stored


def run_store_load(
    variant: str,
    *,
    threads: int = 8,
    sessions: int = 4,
    writes: int = 400,
    work_s: float = 0.001,
    timeout_s: float = 60.0,
) -> SessionStoreResult:
    """`writes` messages over `sessions` conversations from a pool of `threads` threads."""
    store = STORES[variant](work_s)
    session_ids = [f"conversation-{i}" for i in range(sessions)]
    errors = 0
    errors_lock = threading.Lock()

    def write(i: int) -> None:
        nonlocal errors
        try:
            store.append_message(session_ids[i % sessions], f"message-{i}")
        except Exception:
            with errors_lock:
                errors += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"store-{variant}") as pool:
        futures = [pool.submit(write, i) for i in range(writes)]
        _, pending = wait(futures, timeout=timeout_s)
        for f in pending:
            f.cancel()
    duration = time.perf_counter() - started
    stored = 0
    for sid in session_ids:
        context = store.get_session(sid)
        stored += len(context.messages) if context else 0
    return SessionStoreResult(
        variant=variant,
        threads=threads,
        sessions=sessions,
        writes=writes,
        stored=stored,
        duration_s=duration,
        errors=errors + len(pending),
    )
