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

Holds come from each process's *live* document (`<name>.live`, see
`monitor.exporters.snapshot`) when it has one, re-read every `--live-scan-interval` (0.2 s)
without re-merging anything else: the worker rewrites it within 0.1 s of a checkout or a
return and otherwise advances its mtime, so its mtime is the moment the worker last vouched
for those holds (`as_of`). Ages are counted from each hold's start by this sidecar's clock,
but never more than `AGE_SLACK_S` past `as_of`, and `long_held` is decided here from that
age: a hold that ended is never shown older than it got by more than 0.25 s, nor flagged
from a snapshot's moment. Holds vouched for longer than `STALE_AFTER_S` ago are still shown,
marked stale ("as of" on the page); a process without a live document (an older library)
has its full document's holds, as of when it was written.

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
from dataclasses import dataclass, field, replace
from typing import Any

from monitor.catalogue import OTHER_SITE
from monitor.exporters import snapshot
from monitor.sidecar import files, merge

log = logging.getLogger("monitor.sidecar.aggregate")

#: A process is live while its document is younger than this many of its intervals.
FRESH_INTERVALS = 3.0
#: A hold is aged past the moment its worker last vouched for it (`as_of`) by at most this
#: much: if it ended right after, its shown age is at most this much above its true one.
AGE_SLACK_S = 0.25
#: Holds last vouched for longer ago than this are marked `stale` ("as of" on the page):
#: the worker's live document is late (a starved or paused process, an older library
#: without live documents). A live document is vouched for every
#: `snapshot.LIVE_CHECK_S` (0.1 s) and read every 0.2 s, so a healthy one never is.
STALE_AFTER_S = 0.5
#: The live document wins over the full one unless the full one is newer by more than
#: this (both come from one thread, the full one a moment before the live check).
LIVE_TOLERANCE_S = 0.05

#: Bounds on what the sidecar keeps (see the sidecar README, "Bounds"): processes known at
#: once (files beyond are rejected and counted), dead processes kept whole before their
#: counters are folded into the retained totals early, pool names in the retained totals
#: (beyond: `RETIRED_POOL`), code sites per pool (beyond: `other`; `--max-sites`).
MAX_PROCESSES = 512
MAX_DEAD = 64
MAX_RETAINED_POOLS = 256
RETIRED_POOL = "(retired)"
DEFAULT_MAX_SITES = 200

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
    #: its live document (`<name>.live`), when it writes one, and until when the worker
    #: vouched for it: the file's mtime, which the worker advances while nothing changed.
    live_doc: dict[str, Any] | None = None
    live_sig: files.Signature | None = None
    live_as_of: float = 0.0
    #: its board (`monitor.exporters.board`), read right after the live document: which
    #: holds are out, by the application threads' own word, as of its `read_at`.
    board: files.BoardView | None = None

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
    #: when the holds were last re-attached (the live scan; `scanned_at` is the full one)
    holds_at: float = 0.0

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
    _live_rejected: dict[str, files.Signature] = field(default_factory=dict)
    _board_rejected: set[str] = field(default_factory=set)
    #: per pool name, the code sites with their own series (`files.fold_sites`)
    _sites: dict[str, set[str]] = field(default_factory=dict)
    max_sites: int = DEFAULT_MAX_SITES
    _base: View = EMPTY  # the last full merge, holds not yet attached

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
        for pool in doc["pools"]:
            files.fold_sites(pool, self._sites.setdefault(pool["pool"], set()), self.max_sites)
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
                merge.add_totals(
                    self._compacted.setdefault(key[0], merge.totals()), old_pool, exemplars=False
                )
            else:
                merge.high_water(old_pool, new_pool)
        proc.doc = doc
        if not proc.live and not doc.get("exited"):  # (a last word after its pid went: no)
            log.info("process of %s is writing again", name)
            proc.live, proc.dead_since = True, None

    def _bound_retained(self) -> None:
        """At most `MAX_RETAINED_POOLS` pool names in the retained totals: beyond, the
        longest-retained names that no known process has any more are added into one
        `RETIRED_POOL` series. Every total stays in some series, so a sum over pools never
        goes down; the retired names' own series end (Prometheus sees them stop, not
        reset), and 6,000 short-lived workers with distinct pool names leave a bounded
        number of series."""
        excess = len(self._compacted) - MAX_RETAINED_POOLS
        if excess <= 0:
            return
        in_use = {pool["pool"] for proc in self.procs.values() for pool in proc.doc["pools"]}
        for name in [n for n in self._compacted if n not in in_use and n != RETIRED_POOL]:
            if excess <= 0:
                break
            merge.add_totals(
                self._compacted.setdefault(RETIRED_POOL, merge.totals()),
                _without_sites(self._compacted.pop(name)),
            )
            self._sites.pop(name, None)
            excess -= 1

    def _compact(self, proc: Process, file_exists: bool) -> None:
        for key, pool in _series(proc.doc).items():
            merge.add_totals(
                self._compacted.setdefault(key[0], merge.totals()), pool, exemplars=False
            )
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
                st = os.lstat(path)  # (a symlink's own signature: `files.read` refuses it)
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
                if proc is None and len(self.procs) >= MAX_PROCESSES:
                    raise files.Rejected("invalid", f"more than {MAX_PROCESSES} processes")
                doc = files.read(path, self.max_bytes)
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
                or self._gone(proc)
            ):
                proc.live, proc.dead_since = False, now
            if not proc.live and now - (proc.dead_since or now) > self.retain_dead_s:
                self._compact(proc, proc.name in seen)
        dead = sorted(
            (p for p in self.procs.values() if not p.live), key=lambda p: p.dead_since or 0.0
        )
        for proc in dead[: max(0, len(dead) - MAX_DEAD)]:  # churn: fold the oldest early
            self._compact(proc, proc.name in seen)
        self._bound_retained()
        self._scans += 1
        self._read_live()
        self._base = self._view(now, started)
        return self._with_holds(self._base, now)

    # -- live documents ---------------------------------------------------------------------
    def scan_live(self) -> View:
        """Re-read only the live processes' small live documents and boards, and re-attach
        the holds to the last full merge: the fast path (every `--live-scan-interval`). A
        process found gone in the meantime gets a full scan, so its holds go at once."""
        if any(p.live and self._gone(p) for p in self.procs.values()):
            return self.scan()
        self._read_live()
        if any(p.live and p.board is not None and p.board.gone for p in self.procs.values()):
            return self.scan()
        return self._with_holds(self._base, self.clock())

    def _gone(self, proc: Process) -> bool:
        """Sure that the process is gone: by its pid (`gone`, same namespace only), or by
        its board's lock, released by the kernel when the process ended (any namespace)."""
        if proc.board is not None and proc.board.gone:
            return True
        return self.gone(proc.doc["process"])

    def _read_live(self) -> None:
        known = {files.live_name(name) for name in self.procs}
        for name in [n for n in self._live_rejected if n not in known]:
            del self._live_rejected[name]
        for proc in self.procs.values():
            if not proc.live:
                continue
            name = files.live_name(proc.name)
            path = os.path.join(self.directory, name)
            try:
                st = os.lstat(path)
            except OSError:
                if proc.live_doc is not None:  # it had one: the worker removes it at exit,
                    # so its holds are over (never fall back to the older full document's)
                    proc.live_doc = {**proc.live_doc, "pools": []}
                    proc.live_sig, proc.live_as_of = None, self.clock()
                continue  # else none: an older library, the full document's holds
            sig = files.signature(st)
            if sig == proc.live_sig or self._live_rejected.get(name) == sig:
                continue
            try:
                doc = files.read(path, self.max_bytes, "live")
                if doc["process"].get("pid") != proc.doc["process"]["pid"]:
                    raise files.Rejected("invalid", "live document of another process")
            except files.Rejected as exc:
                self._live_rejected[name] = sig
                self._reject_live(name, exc)
                continue
            self._live_rejected.pop(name, None)
            proc.live_doc, proc.live_sig = doc, sig
            proc.live_as_of = max(st.st_mtime, doc["written_at"])
        for proc in self.procs.values():  # after the live documents: see `_board_holds`
            proc.board = self._read_board(proc) if proc.live else None

    def _read_board(self, proc: Process) -> files.BoardView | None:
        """The process's board, or None (none: an older library, or gone at exit; a bad
        one is logged and counted once, until it reads well again)."""
        name = files.board_name(proc.name)
        try:
            view = files.read_board(os.path.join(self.directory, name), self.clock())
            if view.pid != proc.doc["process"]["pid"]:
                raise files.Rejected("invalid", "board of another process")
        except files.Rejected as exc:
            missing = exc.reason == "unreadable" and not os.path.lexists(
                os.path.join(self.directory, name)
            )
            if not missing and name not in self._board_rejected:
                self._board_rejected.add(name)
                self._reject_live(name, exc)
            return None
        self._board_rejected.discard(name)
        return view

    def _reject_live(self, name: str, exc: files.Rejected) -> None:
        self.errors[exc.reason] += 1
        log.warning("skipping live document %s: %s", name, exc)

    def _with_holds(self, base: View, now: float) -> View:
        """`base` with every live, serving process's holds attached to their pools, each
        with `as_of` (when its worker last vouched for it) and `age_s` as of `now`."""
        by_pool: dict[str, list[dict[str, Any]]] = {}
        for proc in self.procs.values():
            if not (proc.live and proc.doc.get("serving", True)):
                continue
            process = proc.doc["process"]
            live = proc.live_doc
            if live is not None and proc.live_as_of >= proc.doc["written_at"] - LIVE_TOLERANCE_S:
                as_of, pools = proc.live_as_of, live["pools"]
            else:  # no live document (older library, or failing): the full one's holds
                as_of, pools = proc.doc["written_at"], proc.doc["pools"]
            if proc.board is not None:
                pools = _board_holds(pools, proc.doc["pools"], proc.board)
            for pool in pools:
                by_pool.setdefault(pool["pool"], []).extend(_holds(pool, process, as_of, now))
        out = []
        for acc in base.pools:
            holds = by_pool.pop(acc["pool"], [])
            holds.sort(key=lambda h: h["age_s"], reverse=True)
            out.append({**acc, "holds": holds})
        for name, holds in by_pool.items():  # a pool newer than the last full merge
            holds.sort(key=lambda h: h["age_s"], reverse=True)
            acc = _empty_pool(name, merge.totals())
            acc["gauges"] = merge.copy_totals(merge.ZERO_GAUGES)
            out.append({**acc, "holds": holds})
        out.sort(key=lambda p: p["pool"])
        return replace(base, pools=out, holds_at=now)

    # -- the merged view ------------------------------------------------------------------
    def _view(self, now: float, started: float) -> View:
        pools: dict[str, dict[str, Any]] = {}

        def pool_acc(name: str) -> dict[str, Any]:
            acc = pools.get(name)
            if acc is None:
                acc = pools[name] = _empty_pool(name, self._compacted.get(name, merge.totals()))
            return acc

        for name in self._compacted:
            pool_acc(name)
        locks = merge.copy_totals(self._compacted_locks)
        processes: list[dict[str, Any]] = []
        for proc in self.procs.values():
            doc = proc.doc
            for pool in doc["pools"]:
                acc = pool_acc(pool["pool"])
                merge.add_totals(acc, pool)
                if proc.live and doc.get("serving", True):
                    acc["processes"] += 1
                    acc["pool_class"] = pool.get("pool_class")
                    merge.add_gauges(acc["gauges"], pool.get("gauges", {}))
            merge.add_locks(locks, doc.get("locks", {}))
            processes.append(_process_summary(proc, now))
        for acc in pools.values():
            if not acc["processes"]:
                acc["gauges"] = merge.copy_totals(merge.ZERO_GAUGES)
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


def _without_sites(totals: dict[str, Any]) -> dict[str, Any]:
    """A retired pool's totals with every code site added into `other` (the retired
    series must not carry the union of every retired pool's sites)."""
    counters = {
        name: ({OTHER_SITE: sum(value.values())} if name in files.SITE_COUNTERS else value)
        if isinstance(value, dict)
        else value
        for name, value in totals["counters"].items()
    }
    return {**totals, "counters": counters}


def _series(doc: dict[str, Any]) -> dict[tuple[str, Any], dict[str, Any]]:
    """A process's pools keyed by (name, monitor id): two engines may share a pool name,
    and a re-instrumented engine gets a new monitor (its counters restart from zero)."""
    out: dict[tuple[str, Any], dict[str, Any]] = {}
    for n, pool in enumerate(doc["pools"]):
        out[(pool["pool"], pool.get("monitor_id", f"#{n}"))] = pool
    return out


def _empty_pool(name: str, kept: dict[str, Any]) -> dict[str, Any]:
    """A pool's merge accumulator, starting from its retained totals `kept`."""
    return {
        "pool": name,
        "pool_class": None,
        "processes": 0,
        "gauges": {},
        "counters": merge.copy_totals(kept["counters"]),
        "histograms": merge.copy_totals(kept["histograms"]),
        "holds": [],
    }


def hold_age(hold: dict[str, Any], now: float) -> float:
    """A hold's age at `now` by this sidecar's clock: from its start, but never further
    than `AGE_SLACK_S` past `as_of`, the last moment its worker said it was still out.
    So a hold that has ended since is never shown more than that much older than it got,
    however late its worker's next word is. (Without `started_at`: its age at `as_of`.)"""
    as_of = hold.get("as_of")
    until = now if not isinstance(as_of, (int, float)) else min(now, as_of + AGE_SLACK_S)
    started = hold.get("started_at")
    if isinstance(started, (int, float)):
        return max(0.0, until - started)
    base = float(hold.get("age_s") or 0.0)
    return base + max(0.0, until - as_of) if isinstance(as_of, (int, float)) else base


def long_held(hold: dict[str, Any], age: float) -> bool:
    """Long held by the sidecar's own clock (`age` from `hold_age`), not the flag the
    worker computed when it wrote: that one is up to an interval late."""
    threshold = hold.get("long_held_threshold")
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        return threshold > 0 and age >= threshold
    return bool(hold.get("long_held"))


def _holds(
    pool: dict[str, Any], process: dict[str, Any], as_of: float, now: float
) -> list[dict[str, Any]]:
    """The pool's holds as vouched for at `as_of`, aged to `now` (`hold_age`)."""
    threshold = pool.get("long_held_threshold")
    if threshold is None:  # a full document: the monitor's settings
        threshold = (pool.get("settings") or {}).get("long_held_threshold")
    out = []
    for hold in pool.get("holds", []):
        row = {
            "as_of": as_of,
            **hold,
            "long_held_threshold": threshold,
            "pool": pool["pool"],
            "process": {"hostname": process.get("hostname"), "pid": process.get("pid")},
        }
        row["age_s"] = hold_age(row, now)
        row["long_held"] = long_held(row, row["age_s"])
        out.append(row)
    return out


def _board_holds(
    pools: list[dict[str, Any]], full_pools: list[dict[str, Any]], view: files.BoardView
) -> list[dict[str, Any]]:
    """The documents' holds checked against the board read after them (`view`).

    A hold the document placed on the board is shown only while its slot still holds its
    start, and is then vouched for as of the board's read (`as_of`), however late the
    document: an ended hold goes at the next read. A slot taken by none of the document's
    holds is a hold newer than the document: shown, aged exactly, its details `pending`
    until the next live document. Holds off the board (none free, or an older library)
    keep the document's word."""
    slots = dict(view.slots)
    out = []
    for pool in pools:
        serial = pool.get("monitor_id")
        holds = []
        for hold in pool.get("holds", []):
            slot, start = hold.get("board_slot"), hold.get("started_mono")
            if not isinstance(slot, int) or not isinstance(start, float):
                holds.append(hold)
            elif slots.get(slot) == (start, serial):
                del slots[slot]
                holds.append({**hold, "as_of": view.read_at})
        out.append({**pool, "holds": holds})
    by_serial = {p.get("monitor_id"): p for p in out}
    names = {p.get("monitor_id"): p for p in full_pools}
    for slot, (start, serial) in sorted(slots.items()):
        pool = by_serial.get(serial)
        if pool is None and serial in names:  # no live entry yet: a pool with no holds
            threshold = (names[serial].get("settings") or {}).get("long_held_threshold")
            pool = by_serial[serial] = {
                "pool": names[serial]["pool"],
                "monitor_id": serial,
                "long_held_threshold": threshold,
                "holds": [],
            }
            out.append(pool)
        if pool is not None:  # (a slot of an engine not in any document yet: next read)
            pool["holds"].append(
                {
                    "started_at": start + view.wall_offset,
                    "pending": True,
                    "board_slot": slot,
                    "as_of": view.read_at,
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
