"""The exit document of a process stopped by a signal, where atexit never runs.

A process killed by a signal's *default action* runs no Python code at all: no atexit, no
`finally`, no threading shutdown hook. That is how most real workers end:

- a plain `python` process on SIGTERM (Kubernetes' stop signal) has SIGTERM at SIG_DFL;
- uvicorn catches SIGINT/SIGTERM while it serves, shuts down gracefully, puts back the
  handlers it found (usually SIG_DFL) and *re-raises* the signal with
  `signal.raise_signal()`, so the process dies of it. Under `uvicorn --workers N`, with
  gunicorn's `UvicornWorker` (which resets every signal to SIG_DFL first) and whenever
  the engine is instrumented in the application's lifespan, the handler uvicorn puts back
  predates `instrument()`, so nothing of ours can be in place by then.

Two cooperating pieces, both only in processes that write snapshots, and both ending in
exactly what would have happened without them (same signal, same exit status):

1. `install()` puts `_on_signal` on SIGTERM and SIGINT *only where the disposition is
   SIG_DFL* (from the main thread; Python forbids it elsewhere). It writes the exit
   document, restores SIG_DFL and raises the signal again. Any handler the application or
   its server has — uvicorn's, gunicorn's, Python's own KeyboardInterrupt for SIGINT — is
   left alone and keeps running: those either end in a normal exit (atexit writes the
   document) or in a default-action re-raise, which the second piece sees.
2. `uvicorn.server`'s module global `signal` becomes `_UvicornSignal`, a stand-in that
   forwards everything to the real module except that `raise_signal()` first writes the
   exit document when that signal is about to kill the process (SIG_DFL, not blocked).
   A single attribute store, checked again by the writer thread each interval in case
   uvicorn is imported after `instrument()`. If a future uvicorn stops re-raising this way,
   the stand-in is simply never called.

What neither can see (SIGKILL, the OOM killer, a crash in C) the sidecar finds from the
process's pid when it shares the pid namespace, or from the document going stale
(`monitor.sidecar.aggregate`).

The document itself is written by each directory's writer thread while the signalled
thread waits (bounded by `FINAL_TIMEOUT_S`): the main thread may have been interrupted
while holding a lock the snapshot needs (the monitor registry, a ledger), and must then
die a little later without the document rather than deadlock.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

log = logging.getLogger("monitor.snapshot")

#: The signals a server or an orchestrator stops a process with.
TERMINATING: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)
#: How long a signalled process waits for its exit document before dying anyway.
FINAL_TIMEOUT_S = 2.0

_installed: set[int] = set()
#: What a terminating signal runs first: the snapshot writers' exit documents, given by
#: `install()` (so this module needs no import of the writers, which import it).
_on_exit: list[Callable[[float], None]] = []


def _write_final() -> None:
    for write in list(_on_exit):
        write(FINAL_TIMEOUT_S)


def _will_kill(signum: int) -> bool:
    """True if raising `signum` in this thread now runs its default action (which, for the
    signals in `TERMINATING`, terminates the process)."""
    if signal.getsignal(signum) not in (signal.SIG_DFL, None):
        return False
    return signum not in signal.pthread_sigmask(signal.SIG_BLOCK, ())


def _on_signal(signum: int, frame: types.FrameType | None) -> None:
    """Stands in for SIG_DFL: write the exit document, then die of the same signal."""
    with contextlib.suppress(Exception):
        _write_final()
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)
    # Only reached if the signal is blocked in this thread: it stays pending and will
    # kill the process when unblocked, as it would have without us.
    signal.signal(signum, _on_signal)  # pragma: no cover


def install(on_exit: Callable[[float], None]) -> None:
    """Chain `on_exit(timeout)` (the exit documents) into SIGTERM/SIGINT where their
    disposition is SIG_DFL, and into uvicorn's re-raise. Idempotent; never raises."""
    try:
        if on_exit not in _on_exit:
            _on_exit.append(on_exit)
        patch_uvicorn()
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal() is for the main thread only
        for sig in TERMINATING:
            if signal.getsignal(sig) == signal.SIG_DFL:
                signal.signal(sig, _on_signal)
                _installed.add(sig)
    except Exception as exc:  # pragma: no cover - defensive: never break instrument()
        log.debug("pool-monitor could not install its exit signal handlers: %s", exc)


def uninstall() -> None:
    """Put SIG_DFL back where `_on_signal` still is (tests; from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in list(_installed):
        if signal.getsignal(sig) is _on_signal:
            signal.signal(sig, signal.SIG_DFL)
        _installed.discard(sig)


class _UvicornSignal(types.ModuleType):
    """What `uvicorn.server` sees as `signal`: the real module, except `raise_signal`."""

    def __init__(self) -> None:
        super().__init__(signal.__name__, signal.__doc__)

    def __getattr__(self, name: str) -> Any:
        return getattr(signal, name)

    def raise_signal(self, signum: int) -> None:
        try:
            if signum in TERMINATING and _will_kill(signum):
                _write_final()
        except Exception:  # never in the way of the signal (e.g. no pthread_sigmask)
            pass
        signal.raise_signal(signum)


def patch_uvicorn() -> bool:
    """Route `uvicorn.server`'s re-raise through `_UvicornSignal` once uvicorn is
    imported; True when in place. Leaves a `signal` someone else replaced alone."""
    module = sys.modules.get("uvicorn.server")
    if module is None:
        return False
    current = getattr(module, "signal", None)
    if isinstance(current, _UvicornSignal):
        return True
    if current is not signal:
        return False
    module.signal = _UvicornSignal()  # type: ignore[attr-defined]
    return True
