"""Snapshot files: each instrumented process writes its whole state for the sidecar.

Why files and not prometheus_client's multiprocess mode (see RESEARCH.md): that mode cannot
carry live holds, its "live" gauges only drop pids someone marks dead, its files pile up
with worker churn, and pids collide across containers sharing a volume. Here every process
writes one versioned JSON document, named by hostname + pid + process start time (so a
pid reused by another container, or by a later process, gets another name), every
`snapshot_interval` seconds and once more at exit (marked `"exited": true`).

Rules this module keeps:

- Off the hot path: a daemon thread does the writing; the hooks never see it.
- Atomic: write a hidden temp file in the same directory, then `os.replace`, so a reader
  sees the previous document or the next one, never half of one.
- Never raises into the application: a read-only directory or a full disk is logged once
  (WARNING, with the path and the OS error), counted (`write_errors()`, and `writer.errors`
  in the next document that does get written), and logged again only after writes have
  recovered and failed anew.
- Files do not pile up, yet the sidecar never writes into the directory: each writer, at
  start and every minute, removes pool-monitor files that nobody has rewritten for
  `max(60 s, 30 intervals)` (dead processes, whichever container they came from). The
  sidecar scans every second, so it has long folded a dead process's last document into
  its retained totals by then (see `monitor.sidecar.aggregate`).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import itertools
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import weakref
from typing import Any

SNAPSHOT_VERSION = 1
PREFIX = "pool-monitor-"
SUFFIX = ".json"
#: Live holds kept per pool in a file (the oldest ones): bounds a file's size when a
#: NullPool serves thousands of threads. The count left out is `holds_dropped`.
MAX_HOLDS_PER_POOL = 1000
#: How often a writer looks for dead processes' files to remove.
PRUNE_EVERY_S = 60.0

log = logging.getLogger("monitor.snapshot")

_FILE_RE = re.compile(r"^\.?pool-monitor-.+\.json(\.tmp)?$")

_lock = threading.Lock()
_writers: dict[str, SnapshotWriter] = {}
_configured: dict[str, float] = {}  # directory -> interval, survives fork
_identity: dict[str, Any] | None = None
_serials: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_serial_counter = itertools.count(1)
_write_errors = 0


def write_errors() -> int:
    """Snapshot writes that failed in this process (any directory), since it started."""
    return _write_errors


def _count_error() -> None:
    global _write_errors
    _write_errors += 1


def _proc_start() -> tuple[float, str]:
    """(start time as unix time, a token unique to this process among its pid's users).

    On Linux the kernel's start time in clock ticks since boot: exact, and stable for the
    process's whole life. Elsewhere the time this module first asked, per pid."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read().decode()
        ticks = int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22: starttime
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK"), str(ticks)
    except (OSError, ValueError, IndexError, StopIteration):
        now = time.time()
        return now, str(int(now * 1000))


def identity() -> dict[str, Any]:
    """This process: hostname, pid, start time and argv[0] (recomputed after a fork)."""
    global _identity
    pid = os.getpid()
    if _identity is None or _identity["pid"] != pid:
        start, token = _proc_start()
        _identity = {
            "hostname": socket.gethostname(),
            "pid": pid,
            "start_time": start,
            "argv0": os.path.basename(sys.argv[0]) if sys.argv else "",
            "start_token": token,
        }
    return _identity


def file_name(ident: dict[str, Any]) -> str:
    """`pool-monitor-<hostname>-<pid>-<start token>.json`, safe as a file name."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", str(ident["hostname"]))[:64] or "host"
    return f"{PREFIX}{host}-{ident['pid']}-{ident['start_token']}{SUFFIX}"


def _monitor_id(pm: Any) -> int:
    """A number unique to this monitor object within the process: the sidecar tells a
    pool that was uninstrumented and instrumented again (counters back at zero) from the
    same series continuing. `id()` would do, except CPython reuses freed addresses."""
    with _lock:
        serial = _serials.get(pm)
        if serial is None:
            serial = _serials[pm] = next(_serial_counter)
        return serial


def _pool_snapshot(pm: Any) -> dict[str, Any]:
    snap = pm.snapshot()
    snap["monitor_id"] = _monitor_id(pm)
    holds = snap.get("holds") or []
    if len(holds) > MAX_HOLDS_PER_POOL:
        holds.sort(key=lambda h: h.get("age_s", 0.0), reverse=True)
        snap["holds_dropped"] = len(holds) - MAX_HOLDS_PER_POOL
        snap["holds"] = holds[:MAX_HOLDS_PER_POOL]
    return snap


def process_snapshot(
    interval: float, exited: bool = False, writer: dict[str, int] | None = None
) -> dict[str, Any]:
    """This process's document: every live monitor's `snapshot()` and the app locks."""
    from monitor.instrument import monitors
    from monitor.locks import lock_snapshot

    ident = identity()
    return {
        "version": SNAPSHOT_VERSION,
        "process": {k: ident[k] for k in ("hostname", "pid", "start_time", "argv0")},
        "written_at": time.time(),
        "interval": interval,
        "exited": exited,
        "writer": writer or {"writes": 0, "errors": _write_errors},
        "pools": [_pool_snapshot(pm) for pm in monitors()],
        "locks": lock_snapshot(),
    }


class SnapshotWriter:
    """Writes this process's snapshot into one directory, every `interval` seconds."""

    def __init__(self, directory: str, interval: float) -> None:
        self.directory = directory
        self.interval = interval
        self.writes = 0
        self.errors = 0
        self.pruned = 0
        self.final_written = False
        self._failing = False
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._pid = os.getpid()
        self._next_prune = 0.0
        self._thread = threading.Thread(target=self._run, name="pool-monitor-snapshot", daemon=True)

    @property
    def path(self) -> str:
        return os.path.join(self.directory, file_name(identity()))

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive() and self._pid == os.getpid()

    def _run(self) -> None:
        while True:
            self.write()
            self.prune()
            if self._stop.wait(self.interval):
                return

    def stop(self, timeout: float = 0.0) -> None:
        """Stop the thread; with `timeout`, wait that long for a write in progress."""
        self._stop.set()
        if timeout and self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def write(self, exited: bool = False, timeout: float = -1) -> bool:
        """Write the snapshot now; True if it reached the directory. Never raises."""
        if not self._write_lock.acquire(timeout=timeout):
            return False
        try:
            if self.final_written:
                return False  # the exit document stays the last word
            stats = {"writes": self.writes, "errors": self.errors}
            try:
                data = json.dumps(
                    process_snapshot(self.interval, exited, stats),
                    separators=(",", ":"),
                    default=str,
                )
                self._replace(data)
            except Exception as exc:
                self._failed(exc)
                return False
            self.writes += 1
            self.final_written = exited
            if self._failing:
                self._failing = False
                log.info(
                    "pool-monitor snapshot writes to %s work again (after %d failures)",
                    self.directory,
                    self.errors,
                )
            return True
        finally:
            self._write_lock.release()

    def _replace(self, data: str) -> None:
        final = self.path
        tmp = os.path.join(self.directory, "." + os.path.basename(final) + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(data)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        _count_error()
        if self._failing:
            return
        self._failing = True
        hint = ""
        if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            hint = " (read-only or not writable: mount it read-write for this container)"
        elif isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = " (disk full: raise the volume's sizeLimit)"
        log.warning(
            "pool-monitor cannot write its snapshot into %s: %s%s; the application "
            "is unaffected, the sidecar will not see this process; failures are "
            "counted and logged again only after a recovery",
            self.directory,
            exc,
            hint,
        )

    def prune(self, now: float | None = None) -> int:
        """Remove other processes' files nobody rewrote for max(60 s, 30 intervals)."""
        now = time.time() if now is None else now
        if now < self._next_prune:
            return 0
        self._next_prune = now + PRUNE_EVERY_S
        stale = now - max(60.0, 30 * self.interval)
        own = os.path.basename(self.path)
        removed = 0
        try:
            names = os.listdir(self.directory)
        except OSError:
            return 0
        for name in names:
            if name == own or not _FILE_RE.match(name):
                continue
            path = os.path.join(self.directory, name)
            try:
                if os.stat(path).st_mtime < stale:
                    os.unlink(path)
                    removed += 1
            except OSError:
                continue
        self.pruned += removed
        return removed


def ensure_writer(directory: str, interval: float) -> None:
    """Make sure this process writes its snapshot into `directory` every `interval` s.

    Idempotent: one writer per directory per process (a second call with a shorter
    interval shortens it). Restarted in a forked child, which writes its own file. Never
    raises: a directory that cannot be created is logged and counted like a failed write.
    """
    try:
        directory = os.path.abspath(os.fspath(directory))
        with _lock:
            _configured[directory] = min(interval, _configured.get(directory, interval))
            writer = _writers.get(directory)
            if writer is not None and writer.alive():
                writer.interval = _configured[directory]
                return
            with contextlib.suppress(OSError):  # the first write reports it, once
                os.makedirs(directory, exist_ok=True)
            writer = SnapshotWriter(directory, _configured[directory])
            _writers[directory] = writer
            writer.start()
    except Exception as exc:  # pragma: no cover - defensive: never break instrument()
        _count_error()
        log.warning("pool-monitor snapshot writer did not start for %r: %s", directory, exc)


def writers() -> list[SnapshotWriter]:
    """This process's writers (for tests and diagnostics)."""
    with _lock:
        return [w for w in _writers.values() if w._pid == os.getpid()]


def write_final(timeout: float = 2.0) -> None:
    """Write every directory's last document, marked exited, and stop the writers.

    Runs at interpreter exit (atexit) and at multiprocessing's child exit; it waits at
    most `timeout` s per directory for a write in progress (a hung volume must not hang
    the application's shutdown)."""
    for writer in writers():
        writer.stop()
        writer.write(exited=True, timeout=timeout)


def stop_all() -> None:
    """Stop every writer without a final document and forget them (tests)."""
    with _lock:
        for writer in _writers.values():
            writer.stop()
        _writers.clear()
        _configured.clear()


def _after_fork_in_child() -> None:
    """A forked child is a new process: its own file, its own writer threads."""
    global _lock, _identity
    _lock = threading.Lock()
    _identity = None
    _writers.clear()
    for directory, interval in list(_configured.items()):
        ensure_writer(directory, interval)


class _Anchor:
    """Keeps multiprocessing's after-fork registration alive (it holds a weak reference)."""


_ANCHOR = _Anchor()


def _mp_child_started(_anchor: _Anchor) -> None:
    """In a multiprocessing child (fork start method) atexit never runs: the child leaves
    with os._exit() after multiprocessing's own finalizers, so register there too."""
    from multiprocessing import util

    util.Finalize(None, write_final, exitpriority=0)


atexit.register(write_final)
with contextlib.suppress(ImportError, AttributeError):
    from multiprocessing import util as _mp_util

    _mp_util.register_after_fork(_ANCHOR, _mp_child_started)

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
