"""Every worker's snapshot file, merged into one view that never lets a counter go down.

Per file (one per process, see `monitor.exporters.snapshot`) the aggregator keeps the
last valid document. A process is *live* while its document is fresher than three of its
intervals and not marked exited; only live processes contribute gauges and holds. Dead
processes keep contributing their last counters and histograms, so the merged totals
never drop when a worker exits or is killed.

Why no file is ever deleted here: the sidecar runs with the snapshot volume mounted
read-only (the issue's rule: it never writes there). The writers prune files nobody has
rewritten for a minute; this class only has to forget them in memory, in two steps:

1. *dead*: the document stays as is, for `retain_dead_s` (default 10 minutes). If the
   process was only paused (SIGSTOP, a long GC, a frozen container) and writes again, it
   simply becomes live again, with no double counting.
2. *compacted*: after that its counters move into a per-pool retained total and the
   document is dropped, so memory stays bounded however many workers come and go. Its
   file name is remembered only while the file still exists, so an unchanged stale file
   is neither re-read nor counted twice.

Two refinements of "live", both about what a pod can actually serve with:

- A process is found *dead* at once, without waiting for its document to go stale, when
  it shares this sidecar's pid namespace (same boot id and namespace in its document:
  `shareProcessNamespace: true`, or one host) and its pid is gone, a zombie, or now
  another process (start ticks differ). Pids are only compared within one namespace:
  across containers the same pid is a different process.
- A live process whose document says `"serving": false` — a preforking master such as
  `gunicorn --preload`'s, which instruments the engine and forks the workers but checks
  out nothing itself — is *standby*: its counters count, its gauges (`max`, idle) do not,
  or the pod would show one more pool's capacity than it has.

Series are per monitor (`monitor_id` in the file): when a live process uninstruments an
engine, or instruments it again (counters back at zero), the old series' last values are
compacted too. Within a series counters are held at their high-water mark (see
`merge.high_water`), so the merged counters never dip.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from monitor.exporters import snapshot
from monitor.sidecar import files, merge

log = logging.getLogger("monitor.sidecar.aggregate")

#: A process is live while its document is younger than this many of its intervals.
FRESH_INTERVALS = 3.0

_own_namespace: dict[str, str] | None = snapshot.pid_namespace()


def process_gone(process: dict[str, Any]) -> bool:
    """True only when this reader is sure the document's process no longer runs: it is in
    our pid namespace (`snapshot.pid_namespace()`), and its pid is free, a zombie, or a
    later process. Anything it cannot tell (another namespace, no /proc, no start ticks
    in the document, a permission error) is False: staleness decides then."""
    ns = _own_namespace
    token = process.get("start_token")
    if (
        ns is None
        or process.get("boot_id") != ns["boot_id"]
        or process.get("pid_ns") != ns["pid_ns"]
        or not isinstance(token, str)
        or not token.isdigit()
    ):
        return False
    pid = process["pid"]
    if pid <= 0:  # kill(0 or -n, 0) would ask about a process group
        return False
    if not _pid_exists(pid):
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode()
        fields = stat[stat.rindex(")") + 2 :].split()
    except OSError:  # exited since, or hidden from us (mounted with hidepid)
        return not _pid_exists(pid)
    except (ValueError, IndexError):
        return False
    return fields[0] in ("Z", "X") or fields[19] != token  # zombie/dead, or pid reused


def _pid_exists(pid: int) -> bool:
    """kill(pid, 0): unlike /proc, not hidden by `hidepid`; True when unsure."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by another user
        pass
    return True


@dataclass
class Process:
    """The last valid document of one snapshot file."""

    name: str
    sig: files.Signature
    doc: dict[str, Any]
    live: bool = True
    dead_since: float | None = None

    def stale(self, now: float) -> bool:
        doc = self.doc
        return (
            bool(doc.get("exited")) or now - doc["written_at"] > FRESH_INTERVALS * doc["interval"]
        )


@dataclass(frozen=True)
class View:
    """One merge result: what every endpoint serves until the next scan."""

    scanned_at: float
    scan_s: float
    pools: list[dict[str, Any]]
    locks: dict[str, dict[str, Any]]
    processes: list[dict[str, Any]]
    errors: dict[str, int]
    dir_error: str | None
    scans: int

    @property
    def holds(self) -> list[dict[str, Any]]:
        return [hold for pool in self.pools for hold in pool["holds"]]


EMPTY = View(0.0, 0.0, [], {}, [], dict.fromkeys(files.REASONS, 0), None, 0)


@dataclass
class Aggregator:
    """Scans one directory; `scan()` returns the merged `View`. Not thread-safe: one
    scanning thread, any number of readers of the returned (never mutated) views."""

    directory: str
    max_bytes: int = files.MAX_BYTES
    retain_dead_s: float = 600.0
    clock: Callable[[], float] = time.time
    gone: Callable[[dict[str, Any]], bool] = process_gone
    procs: dict[str, Process] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(files.REASONS, 0))
    _compacted: dict[str, dict[str, Any]] = field(default_factory=dict)
    _compacted_locks: dict[str, dict[str, Any]] = field(default_factory=dict)
    _rejected: dict[str, files.Signature] = field(default_factory=dict)
    _forgotten: dict[str, files.Signature] = field(default_factory=dict)
    _dir_error: str | None = None
    _scans: int = 0

    # -- reading the directory ------------------------------------------------------------
    def _list(self) -> list[str]:
        try:
            names = [n for n in os.listdir(self.directory) if files.is_snapshot_name(n)]
        except OSError as exc:
            message = f"cannot read snapshot directory {self.directory}: {exc.strerror or exc}"
            if message != self._dir_error:
                self.errors["unreadable"] += 1
                log.warning("%s; serving what was read before", message)
            self._dir_error = message
            return []
        if self._dir_error is not None:
            log.info("snapshot directory %s is readable again", self.directory)
        self._dir_error = None
        return names

    def _reject(self, name: str, sig: files.Signature, exc: files.Rejected) -> None:
        self._rejected[name] = sig
        self.errors[exc.reason] += 1
        log.warning(
            "skipping snapshot file %s: %s (counted in "
            "pool_monitor_snapshot_errors_total{reason=%r})",
            name,
            exc,
            exc.reason,
        )

    def _accept(self, name: str, sig: files.Signature, doc: dict[str, Any]) -> None:
        proc = self.procs.get(name)
        if proc is None:
            if self._forgotten.pop(name, None) is not None:
                log.warning(
                    "process of %s wrote again after %.0f s presumed dead; its earlier "
                    "counts are in the retained totals and now count twice",
                    name,
                    self.retain_dead_s,
                )
            self.procs[name] = Process(name, sig, doc)
            return
        proc.sig = sig
        if doc["written_at"] < proc.doc["written_at"]:
            return  # an older document put back: keep the newer one
        old, new = _series(proc.doc), _series(doc)
        for key, old_pool in old.items():
            new_pool = new.get(key)
            if new_pool is None:  # that monitor is gone (uninstrumented): keep its counts
                merge.add_totals(self._compacted.setdefault(key[0], merge.totals()), old_pool)
            else:
                merge.high_water(old_pool, new_pool)
        proc.doc = doc
        if not proc.live and not doc.get("exited"):  # (a last word after its pid went: no)
            log.info("process of %s is writing again", name)
            proc.live, proc.dead_since = True, None

    def _compact(self, proc: Process, file_exists: bool) -> None:
        for key, pool in _series(proc.doc).items():
            merge.add_totals(self._compacted.setdefault(key[0], merge.totals()), pool)
        merge.add_locks(self._compacted_locks, proc.doc.get("locks", {}))
        del self.procs[proc.name]
        if file_exists:
            self._forgotten[proc.name] = proc.sig

    # -- one scan -------------------------------------------------------------------------
    def scan(self) -> View:
        started = time.perf_counter()
        now = self.clock()
        seen: set[str] = set()
        for name in self._list():
            path = os.path.join(self.directory, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            seen.add(name)
            sig = files.signature(st)
            proc = self.procs.get(name)
            if (
                (proc is not None and proc.sig == sig)
                or self._rejected.get(name) == sig
                or self._forgotten.get(name) == sig
            ):
                continue
            try:
                doc = files.read(path, st.st_size, self.max_bytes)
            except files.Rejected as exc:
                self._reject(name, sig, exc)
                continue
            self._rejected.pop(name, None)
            self._accept(name, sig, doc)
        if self._dir_error is None:  # a file gone means its process is gone
            for name in [n for n in self._rejected if n not in seen]:
                del self._rejected[name]
            for name in [n for n in self._forgotten if n not in seen]:
                del self._forgotten[name]
        for proc in list(self.procs.values()):
            if proc.live and (
                proc.stale(now)
                or (self._dir_error is None and proc.name not in seen)
                or self.gone(proc.doc["process"])
            ):
                proc.live, proc.dead_since = False, now
            if not proc.live and now - (proc.dead_since or now) > self.retain_dead_s:
                self._compact(proc, proc.name in seen)
        self._scans += 1
        return self._view(now, started)

    # -- the merged view ------------------------------------------------------------------
    def _view(self, now: float, started: float) -> View:
        pools: dict[str, dict[str, Any]] = {}

        def pool_acc(name: str) -> dict[str, Any]:
            acc = pools.get(name)
            if acc is None:
                kept = self._compacted.get(name, merge.totals())
                acc = pools[name] = {
                    "pool": name,
                    "pool_class": None,
                    "processes": 0,
                    "gauges": {},
                    "counters": merge.copy_totals(kept["counters"]),
                    "histograms": merge.copy_totals(kept["histograms"]),
                    "holds": [],
                }
            return acc

        for name in self._compacted:
            pool_acc(name)
        locks = merge.copy_totals(self._compacted_locks)
        processes: list[dict[str, Any]] = []
        for proc in self.procs.values():
            doc = proc.doc
            process = doc["process"]
            for pool in doc["pools"]:
                acc = pool_acc(pool["pool"])
                merge.add_totals(acc, pool)
                if proc.live and doc.get("serving", True):
                    acc["processes"] += 1
                    acc["pool_class"] = pool.get("pool_class")
                    merge.add_gauges(acc["gauges"], pool.get("gauges", {}))
                    acc["holds"].extend(_holds(pool, process, doc["written_at"], now))
            merge.add_locks(locks, doc.get("locks", {}))
            processes.append(_process_summary(proc, now))
        for acc in pools.values():
            if not acc["processes"]:
                acc["gauges"] = merge.copy_totals(merge.ZERO_GAUGES)
            acc["holds"].sort(key=lambda h: h["age_s"], reverse=True)
        ordered = [pools[name] for name in sorted(pools)]
        return View(
            now,
            time.perf_counter() - started,
            ordered,
            locks,
            processes,
            dict(self.errors),
            self._dir_error,
            self._scans,
        )


def _series(doc: dict[str, Any]) -> dict[tuple[str, Any], dict[str, Any]]:
    """A process's pools keyed by (name, monitor id): two engines may share a pool name,
    and a re-instrumented engine gets a new monitor (its counters restart from zero)."""
    out: dict[tuple[str, Any], dict[str, Any]] = {}
    for n, pool in enumerate(doc["pools"]):
        out[(pool["pool"], pool.get("monitor_id", f"#{n}"))] = pool
    return out


def _holds(
    pool: dict[str, Any], process: dict[str, Any], written_at: float, now: float
) -> list[dict[str, Any]]:
    """The pool's live holds, aged to `now` (not to when the file was written)."""
    out = []
    for hold in pool.get("holds", []):
        started = hold.get("started_at")
        if isinstance(started, (int, float)):
            age = max(0.0, now - started)
        else:
            age = float(hold.get("age_s") or 0.0) + max(0.0, now - written_at)
        out.append(
            {
                **hold,
                "age_s": age,
                "pool": pool["pool"],
                "process": {"hostname": process.get("hostname"), "pid": process.get("pid")},
            }
        )
    return out


def _process_summary(proc: Process, now: float) -> dict[str, Any]:
    doc = proc.doc
    process = doc["process"]
    if proc.live:
        state = "live" if doc.get("serving", True) else "standby"
    else:
        state = "exited" if doc.get("exited") else "dead"
    return {
        "file": proc.name,
        "hostname": process.get("hostname"),
        "pid": process.get("pid"),
        "start_time": process.get("start_time"),
        "argv0": process.get("argv0"),
        "state": state,
        "written_at": doc["written_at"],
        "age_s": max(0.0, now - doc["written_at"]),
        "interval": doc["interval"],
        "pools": [p["pool"] for p in doc["pools"]],
        "write_errors": (doc.get("writer") or {}).get("errors", 0),
    }
