"""Snapshot files: each instrumented process writes its whole state for the sidecar.

Why files and not prometheus_client's multiprocess mode (see RESEARCH.md): that mode cannot
carry live holds, its "live" gauges only drop pids someone marks dead, its files pile up
with worker churn, and pids collide across containers sharing a volume. Here every process
writes one versioned JSON document, named by hostname + pid + process start time (so a
pid reused by another container, or by a later process, gets another name), every
`snapshot_interval` seconds and once more at exit (marked `"exited": true`), including an
exit by SIGTERM/SIGINT, where atexit does not run (`monitor.exporters.signals`). The
document also says whether the process serves (`"serving"`: false for a preforking master,
see `_serving`) and, on Linux, its pid namespace and start ticks, with which a sidecar in
the same namespace sees a killed process go at once.

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

from monitor.exporters import signals

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
# Set by a fork in this process (as the parent): the next document takes each monitor's
# checkout count as the baseline, and this process is "not serving" until one grows.
_forked = False
_fork_baseline: dict[Any, float] | None = None


def write_errors() -> int:
    """Snapshot writes that failed in this process (any directory), since it started."""
    return _write_errors


def _count_error() -> None:
    global _write_errors
    _write_errors += 1


def _proc_start() -> tuple[float, str]:
    """(start time as unix time, a token unique to this process among its pid's users).

    On Linux the kernel's start time in clock ticks since boot: exact, and stable for the
    process's whole life. Elsewhere the time this module first asked, per pid, as
    `t<milliseconds>` (never mistaken for ticks by a reader comparing with /proc)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read().decode()
        ticks = int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22: starttime
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK"), str(ticks)
    except (OSError, ValueError, IndexError, StopIteration):
        now = time.time()
        return now, f"t{int(now * 1000)}"


def pid_namespace() -> dict[str, str] | None:
    """Which pid namespace this process's pids belong to: the kernel's boot id (one per
    machine and boot) and the namespace's inode. Two processes that report the same pair
    see each other's pids; None where /proc does not say (not Linux)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return {"boot_id": boot, "pid_ns": os.readlink("/proc/self/ns/pid")}
    except OSError:
        return None


def identity() -> dict[str, Any]:
    """This process: hostname, pid, start time and argv[0] (recomputed after a fork).

    With the start token (clock ticks since boot, from /proc) and the pid namespace, a
    reader in the same namespace can tell that this very process is gone, not merely
    quiet (`monitor.sidecar.aggregate`), even after its pid was reused."""
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
        if token.isdigit():  # the kernel's ticks (a fallback token starts with "t")
            _identity.update(pid_namespace() or {})
    return _identity


#: The identity fields a document carries (`start_token` and the namespace only on Linux).
_PROCESS_FIELDS = ("hostname", "pid", "start_time", "argv0", "start_token", "boot_id", "pid_ns")


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


def _serving(pools: list[dict[str, Any]]) -> bool:
    """Whether this process serves with its pools, or is a preforking master.

    `gunicorn --preload` imports the application, so the engine is instrumented, in the
    master, which then forks the workers and never checks out a connection itself; its
    pool's `max` and idle connections are no capacity of the service. A process is taken
    for such a master from the moment it forks (`os.fork()` other than multiprocessing's)
    until it checks out a connection again. Everything else, including a worker that is
    up and idle, serves."""
    global _forked, _fork_baseline
    if _forked:
        _forked = False
        _fork_baseline = {
            p["monitor_id"]: p["counters"]["sqlalchemy.pool.checkouts"] for p in pools
        }
    if _fork_baseline is None:
        return True
    for p in pools:
        grew = p["counters"]["sqlalchemy.pool.checkouts"] > _fork_baseline.get(p["monitor_id"], 0)
        if grew or p["holds"]:
            _fork_baseline = None
            return True
    return False


def process_snapshot(
    interval: float, exited: bool = False, writer: dict[str, int] | None = None
) -> dict[str, Any]:
    """This process's document: every live monitor's `snapshot()` and the app locks."""
    from monitor.instrument import monitors
    from monitor.locks import lock_snapshot

    ident = identity()
    pools = [_pool_snapshot(pm) for pm in monitors()]
    return {
        "version": SNAPSHOT_VERSION,
        "process": {k: ident[k] for k in _PROCESS_FIELDS if k in ident},
        "written_at": time.time(),
        "interval": interval,
        "exited": exited,
        "serving": _serving(pools),
        "writer": writer or {"writes": 0, "errors": _write_errors},
        "pools": pools,
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
        self._wake = threading.Event()
        self._final_requested = False
        self._final_done = threading.Event()
        self._pid = os.getpid()
        self._next_prune = 0.0
        self._uvicorn_patched = False
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
            if self._final_requested:
                self.write(exited=True)
                self._final_done.set()
                return
            if self._stop.is_set():
                return
            self.write()
            self.prune()
            if not self._uvicorn_patched:  # uvicorn may be imported after instrument()
                self._uvicorn_patched = signals.patch_uvicorn()
            self._wake.wait(self.interval)
            self._wake.clear()

    def wake(self) -> None:
        """Write now rather than at the end of the interval."""
        self._wake.set()

    def stop(self, timeout: float = 0.0) -> None:
        """Stop the thread; with `timeout`, wait that long for a write in progress."""
        self._stop.set()
        self._wake.set()
        if timeout and self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def request_final(self) -> bool:
        """Ask the writer thread for the exit document; False if it cannot write it (not
        running in this process, or it is the caller), and the caller must."""
        if not self.alive() or self._thread is threading.current_thread():
            return False
        self._final_requested = True
        self._wake.set()
        return True

    def finish(self, requested: bool, timeout: float) -> bool:
        """Wait up to `timeout` s for the exit document `request_final()` asked for, or
        write it on this thread if it could not ask. True if it was written."""
        if requested:
            return self._final_done.wait(timeout) and self.final_written
        self._stop.set()
        return self.write(exited=True, timeout=timeout)

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
        signals.install()
    except Exception as exc:  # pragma: no cover - defensive: never break instrument()
        _count_error()
        log.warning("pool-monitor snapshot writer did not start for %r: %s", directory, exc)


def writers() -> list[SnapshotWriter]:
    """This process's writers (for tests and diagnostics).

    Without `_lock`: a signal handler calls this on a thread that may have been
    interrupted while holding it; copying the dict's values is atomic under the GIL."""
    pid = os.getpid()
    return [w for w in list(_writers.values()) if w._pid == pid]


def write_final(timeout: float = 2.0) -> None:
    """Write every directory's last document, marked exited, and stop the writers.

    Runs at interpreter exit (atexit), at multiprocessing's child exit and from the exit
    signal handlers (`monitor.exporters.signals`). Each writer thread writes its own
    document, all at once, while the caller waits at most `timeout` s in all: the caller
    may hold a lock the snapshot needs (interrupted by a signal), and a hung volume must
    not hang the application's shutdown either."""
    deadline = time.monotonic() + timeout
    pending = [(writer, writer.request_final()) for writer in writers()]
    for writer, requested in pending:
        writer.finish(requested, max(0.0, deadline - time.monotonic()))


def stop_all() -> None:
    """Stop every writer without a final document and forget them (tests)."""
    global _forked, _fork_baseline
    with _lock:
        for writer in _writers.values():
            writer.stop()
        _writers.clear()
        _configured.clear()
        _forked, _fork_baseline = False, None
    signals.uninstall()


def _after_fork_in_child() -> None:
    """A forked child is a new process: its own file, its own writer threads."""
    global _lock, _identity, _forked, _fork_baseline
    _lock = threading.Lock()
    _identity = None
    _forked, _fork_baseline = False, None
    _writers.clear()
    for directory, interval in list(_configured.items()):
        ensure_writer(directory, interval)


def _after_fork_in_parent() -> None:
    """This process forked: a preforking server's master, unless multiprocessing forked a
    helper (the parent goes on serving). The writers say so at once (`_serving`)."""
    global _forked
    if not _writers:
        return
    try:
        caller = sys._getframe(1).f_globals.get("__name__", "")  # who called os.fork()
    except ValueError:  # forked from C, no Python caller
        caller = ""
    if str(caller).startswith(("multiprocessing.", "concurrent.")):
        return
    _forked = True
    for writer in writers():
        writer.wake()


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
    os.register_at_fork(after_in_child=_after_fork_in_child, after_in_parent=_after_fork_in_parent)
