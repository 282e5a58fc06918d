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
- Live holds travel separately, fast: the full document is written every interval, which
  is too slow for a list of holds (a hold ended 0.1 s ago must not be shown for another
  second, nor aged from a snapshot a second old). The same thread checks every
  `LIVE_CHECK_S` whether the set of live holds changed (an identity comparison of the
  ledgers' hold objects, no folding, no lock) and, if so, writes a small *live* document
  (`<name>.live`: only the holds, atomically like the full one); if not, it only touches
  the file (`os.utime`), so the file's mtime says "the holds were these as of then". The
  sidecar reads these files every 0.2 s and ages holds from their start, never past what
  that mtime vouches for (`monitor.sidecar.aggregate`). A process's idle cost is one
  `utime` per check (`pool-monitor bench-live`, `monitor.livebench`).
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
import json
import logging
import os
import re
import socket
import sys
import threading
import time
from typing import Any

from monitor.exporters import board, signals
from monitor.locks import lock_snapshot
from monitor.registry import monitors

SNAPSHOT_VERSION = 1
PREFIX = "pool-monitor-"
SUFFIX = ".json"
#: The live document's name is the full one's with this instead of `SUFFIX`; an older
#: sidecar, which reads `*.json` only, ignores it.
LIVE_SUFFIX = ".live"
LIVE_VERSION = 1
#: How often the writer thread checks whether the set of live holds changed (and, if not,
#: touches the live file): the bound on how late an ended hold leaves the live document.
LIVE_CHECK_S = 0.1
#: Live holds kept per pool in a file (the oldest ones): bounds a file's size when a
#: NullPool serves thousands of threads. The count left out is `holds_dropped`.
MAX_HOLDS_PER_POOL = 1000
#: How often a writer looks for dead processes' files to remove.
PRUNE_EVERY_S = 60.0

log = logging.getLogger("monitor.snapshot")

_FILE_RE = re.compile(r"^\.?pool-monitor-.+\.(json|live|board)(\.tmp)?$")

_lock = threading.Lock()
_writers: dict[str, SnapshotWriter] = {}
_configured: dict[str, float] = {}  # directory -> interval, survives fork
_identity: dict[str, Any] | None = None
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


def live_file_name(ident: dict[str, Any]) -> str:
    """The live document's name: the full one's, ending in `LIVE_SUFFIX`."""
    return file_name(ident)[: -len(SUFFIX)] + LIVE_SUFFIX


def board_file_name(ident: dict[str, Any]) -> str:
    """The board's name (`monitor.exporters.board`): the full one's, ending in `.board`."""
    return file_name(ident)[: -len(SUFFIX)] + board.BOARD_SUFFIX


def _pool_snapshot(pm: Any) -> dict[str, Any]:
    snap = pm.snapshot()
    # Unique per monitor for the process's life: the sidecar tells an engine instrumented
    # again (counters back at zero) from the same series continuing.
    snap["monitor_id"] = pm.serial
    holds, dropped = _limit_holds(snap.get("holds") or [])
    if dropped:
        snap["holds_dropped"] = dropped
        snap["holds"] = holds
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


def _limit_holds(holds: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The oldest `MAX_HOLDS_PER_POOL` holds, and how many were left out."""
    if len(holds) <= MAX_HOLDS_PER_POOL:
        return holds, 0
    holds.sort(key=lambda h: h.get("age_s", 0.0), reverse=True)
    return holds[:MAX_HOLDS_PER_POOL], len(holds) - MAX_HOLDS_PER_POOL


def live_holds() -> list[tuple[Any, list[Any]]]:
    """Every active monitor with its live `Hold` objects, read without the ledger lock.

    `list(dict.values())` runs in C under the GIL, so it is one consistent copy; the Hold
    objects themselves (new for every checkout, compared by identity) are what tells
    whether the set changed since the last check: no folding, no counting."""
    out = []
    for pm in monitors():
        holds = pm.ledger.holds
        for _ in range(3):  # a resize during the copy is impossible in CPython; be safe
            try:
                out.append((pm, list(holds.values())))
                break
            except RuntimeError:
                continue
    return out


def live_document(state: list[tuple[Any, list[Any]]], as_of: float | None = None) -> dict[str, Any]:
    """The live document for `state` (from `live_holds()`, read at wall time `as_of`, the
    moment its holds are vouched for): identity, `written_at` = `as_of`, and per pool its
    holds as the full document describes them (`PoolMonitor._hold_dict`)."""
    now = time.perf_counter()
    wall = time.time()
    pools = []
    for pm, holds in state:
        threshold = pm.settings.long_held_threshold
        dicts, dropped = _limit_holds([pm._hold_dict(h, now, wall, threshold) for h in holds])
        pools.append(
            {
                "pool": pm.name,
                "monitor_id": pm.serial,
                "long_held_threshold": threshold,
                "holds": dicts,
                "holds_dropped": dropped,
            }
        )
    ident = identity()
    return {
        "version": LIVE_VERSION,
        "kind": "live",
        "process": {k: ident[k] for k in _PROCESS_FIELDS if k in ident},
        "written_at": wall if as_of is None else as_of,
        "check_interval": LIVE_CHECK_S,
        "pools": pools,
    }


def _same(a: list[tuple[Any, list[Any]]], b: list[tuple[Any, list[Any]]] | None) -> bool:
    """Same monitors, same Hold objects (identity; `Hold` has no `__eq__`)."""
    if b is None or len(a) != len(b):
        return False
    return all(pa is pb and ha == hb for (pa, ha), (pb, hb) in zip(a, b, strict=True))


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
        # Live document: the state last written (strong references, so a Hold's identity
        # cannot be reused while compared), and when it was written (monotonic).
        self._live_state: list[tuple[Any, list[Any]]] | None = None
        self._live_written = 0.0
        self.live_writes = 0
        self.live_touches = 0
        self.live_errors = 0
        self._thread = threading.Thread(target=self._run, name="pool-monitor-snapshot", daemon=True)

    @property
    def path(self) -> str:
        return os.path.join(self.directory, file_name(identity()))

    @property
    def live_path(self) -> str:
        return os.path.join(self.directory, live_file_name(identity()))

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive() and self._pid == os.getpid()

    def _run(self) -> None:
        next_full = 0.0
        while True:
            if self._final_requested:
                self.write(exited=True)
                self.remove_live()
                self._final_done.set()
                return
            if self._stop.is_set():
                return
            if time.monotonic() >= next_full:
                self.write()
                self.prune()
                if not self._uvicorn_patched:  # uvicorn may be imported after instrument()
                    self._uvicorn_patched = signals.patch_uvicorn()
                next_full = time.monotonic() + self.interval
            self.write_live()
            wait = min(LIVE_CHECK_S, next_full - time.monotonic())
            if self._wake.wait(max(0.0, wait)):
                self._wake.clear()
                next_full = 0.0

    def write_live(self) -> bool:
        """Write the live document if the set of live holds changed since the last write
        (or it has not been rewritten for an interval while holds are out: their
        `executing` and SQL time move on); otherwise touch it, which tells the sidecar the
        holds it has are still the holds. True if it wrote. Never raises; a failure is
        counted (`live_errors`) and the next call writes in full."""
        try:
            # Taken before the holds are read: every hold read was still out at this time,
            # so this is what the file vouches for (its mtime), however long the write
            # then waits for the GIL.
            wall = time.time()
            own = board.current[0]
            if own is not None:
                own.stamp_clock()
            state = live_holds()
            now = time.monotonic()
            if _same(state, self._live_state) and not (
                any(holds for _, holds in state) and now - self._live_written >= self.interval
            ):
                try:
                    os.utime(self.live_path, (wall, wall))
                    self.live_touches += 1
                    return False
                except FileNotFoundError:
                    pass  # removed (pruned by hand, volume recreated): write it again
            data = json.dumps(live_document(state, wall), separators=(",", ":"), default=str)
            self._replace(data, self.live_path, mtime=wall)
            self._live_state, self._live_written = state, now
            self.live_writes += 1
            return True
        except Exception:
            # The full document's write, on this same thread and directory, logs the
            # cause; here only count, and start over.
            self.live_errors += 1
            self._live_state = None
            return False

    def remove_live(self) -> None:
        """At exit: the live document and the board go (the exit document says the process
        is gone; stale files would only wait for the prune)."""
        with contextlib.suppress(OSError):
            os.unlink(self.live_path)
        own = board.current[0]
        if own is not None and os.path.dirname(own.path) == self.directory:
            own.remove()

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
        written = self.write(exited=True, timeout=timeout)
        if written:
            self.remove_live()
        return written

    def write(self, exited: bool = False, timeout: float = -1) -> bool:
        """Write the snapshot now; True if it reached the directory. Never raises."""
        if not self._write_lock.acquire(timeout=timeout):
            return False
        try:
            if self.final_written:
                return False  # the exit document stays the last word
            stats = {
                "writes": self.writes,
                "errors": self.errors,
                "live_writes": self.live_writes,
                "live_errors": self.live_errors,
            }
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

    def _replace(self, data: str, final: str | None = None, mtime: float | None = None) -> None:
        final = self.path if final is None else final
        tmp = os.path.join(self.directory, "." + os.path.basename(final) + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(data)
            if mtime is not None:
                os.utime(tmp, (mtime, mtime))
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
        ident = identity()
        own = (file_name(ident), live_file_name(ident), board_file_name(ident))
        removed = 0
        try:
            names = set(os.listdir(self.directory))
        except OSError:
            return 0
        for name in names:
            if name in own or not _FILE_RE.match(name):
                continue
            path = os.path.join(self.directory, name)
            try:
                mtime = os.stat(path).st_mtime
                if name.endswith(board.BOARD_SUFFIX):
                    # Written through memory, its mtime is not kept up: the board lives
                    # as long as its process's full document is rewritten.
                    sibling = name[: -len(board.BOARD_SUFFIX)] + SUFFIX
                    if sibling in names:
                        mtime = max(mtime, os.stat(os.path.join(self.directory, sibling)).st_mtime)
                if mtime < stale:
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
            if board.current[0] is None:  # the first directory gets the process's board
                board.open_board(os.path.join(directory, board_file_name(identity())))
        signals.install(write_final)
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
    board.close_current()
    signals.uninstall()


def _after_fork_in_child() -> None:
    """A forked child is a new process: its own file, its own writer threads."""
    global _lock, _identity, _forked, _fork_baseline
    board.forget_after_fork()
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
