"""Reading one snapshot file, defensively.

A worker may be killed mid-write (the rename makes that invisible, but a foreign tool may
not rename), a volume may fill up, an older or newer pool-monitor may write another
format. Any file that is not a complete, valid version-1 document is rejected with a
reason (`pool_monitor_snapshot_errors_total{reason}`), never merged in part: a half-valid
document would make the merged counters wrong, which is worse than missing.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import re
import stat
import sys
from dataclasses import dataclass
from typing import Any

from monitor.catalogue import CODE_SITE, METRICS, OTHER_SITE, SECONDS_BUCKETS
from monitor.exporters import board
from monitor.exporters.snapshot import LIVE_SUFFIX, PREFIX, SUFFIX
from monitor.sidecar import schema

#: Default largest file read, bytes (a file with 64 pools of 1000 holds is ~25 MB: no).
MAX_BYTES = 8 * 1024 * 1024

REASONS = (
    "corrupt",
    "truncated",
    "oversized",
    "unknown_version",
    "invalid",
    "unreadable",
    "incompatible",
)

_BOUNDS = list(SECONDS_BUCKETS)
#: Counters labelled by code site: what `fold_sites` bounds.
SITE_COUNTERS = tuple(m.name for m in METRICS if m.attribute == CODE_SITE)
_NAME_RE = re.compile(re.escape(PREFIX) + r".+" + re.escape(SUFFIX) + "$")


class Rejected(Exception):
    """A file that cannot be merged; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Signature:
    """What identifies one version of a file without reading it."""

    inode: int
    size: int
    mtime_ns: int


def is_snapshot_name(name: str) -> bool:
    """Final snapshot files only: temp files start with a dot and end in `.tmp`."""
    return not name.startswith(".") and bool(_NAME_RE.match(name))


def live_name(name: str) -> str:
    """The live document's file name for the full document's `name` (same identity)."""
    return name[: -len(SUFFIX)] + LIVE_SUFFIX


def board_name(name: str) -> str:
    """The board's file name for the full document's `name` (`monitor.exporters.board`)."""
    return name[: -len(SUFFIX)] + board.BOARD_SUFFIX


@dataclass(frozen=True)
class BoardView:
    """One read of a process's board: the holds out at `read_at` (this reader's wall
    clock, taken before reading), as {slot: (start by the worker's monotonic clock,
    monitor serial)} (a slot is the index of its start in the board seen as doubles, as
    the documents' `board_slot` says); `wall_offset` (wall = monotonic + offset); and
    `gone`: its process holds its lock no more (exited or killed), by the kernel's word."""

    pid: int
    read_at: float
    wall_offset: float
    slots: dict[int, tuple[float, int]]
    gone: bool = False


def read_board(path: str, read_at: float) -> BoardView:
    """Read a board (`monitor.exporters.board`); raise `Rejected`. Only a regular file is
    opened (`_open_regular`), and only the header and the slots it says were ever used are
    read: a few hundred bytes for a normal pool."""
    fd, st = _open_regular(path)
    try:
        if st.st_size != board.SIZE:
            raise Rejected("invalid", f"board is {st.st_size} bytes, not {board.SIZE}")
        head = os.pread(fd, board.HEADER, 0)
        if len(head) < board.HEAD.size:
            raise Rejected("truncated", "board header cut short")
        magic, version, slots, high, pid, mono, wall, flags = board.HEAD.unpack_from(head)
        if magic != board.MAGIC:
            raise Rejected("invalid", "not a board (magic)")
        if version != board.VERSION:
            raise Rejected(
                "unknown_version",
                f"board version {version}, this sidecar reads version {board.VERSION}",
            )
        if slots != board.SLOTS or high > slots:
            raise Rejected("invalid", f"board says {high} of {slots} slots")
        if not (math.isfinite(mono) and math.isfinite(wall)):
            raise Rejected("invalid", "board clock is not finite")
        raw = os.pread(fd, high * board.SLOT.size, board.HEADER) if high else b""
        gone = bool(flags & board.LOCKED) and _unlocked(fd)
    except OSError as exc:
        raise Rejected("unreadable", str(exc)) from None
    finally:
        os.close(fd)
    taken: dict[int, tuple[float, int]] = {}
    index = board.FIRST
    for start, serial in board.SLOT.iter_unpack(raw[: len(raw) - len(raw) % board.SLOT.size]):
        # A start and a serial (a whole number) or nothing; NaN fails every comparison.
        if start > 0.0 and math.isfinite(start) and 1 <= serial < 2**53 and serial.is_integer():
            taken[index] = (start, int(serial))
        index += 2
    return BoardView(pid, read_at, wall - mono, taken, gone)


def _unlocked(fd: int) -> bool:
    """Whether nobody holds the board's exclusive lock: its process is gone."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # no locks on this volume after all: cannot tell
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def signature(st: os.stat_result) -> Signature:
    return Signature(st.st_ino, st.st_size, st.st_mtime_ns)


def read(path: str, max_bytes: int = MAX_BYTES, kind: str = "full") -> dict[str, Any]:
    """Read, parse and validate one file (`kind`: "full" or "live"); raise `Rejected`.

    Only a regular file is read, opened without following a symlink and without blocking
    (a FIFO or a device in the directory would hang a plain `open()` forever), and at
    most `max_bytes + 1` bytes of it. The document is checked against `schema` (types,
    ranges, lengths; bounded nesting), whole: a half-valid document would make the merged
    counters wrong, which is worse than missing."""
    raw = read_regular(path, max_bytes)
    if not raw.strip():
        raise Rejected("truncated", "empty file")
    try:
        doc = schema.parse(raw, schema.LIVE if kind == "live" else schema.SNAPSHOT)
    except schema.SchemaError as exc:
        raise Rejected(exc.reason, exc.detail) from None
    _check(doc, kind)
    return doc


def read_regular(path: str, max_bytes: int) -> bytes:
    """The bytes of `path` if it is a regular file (not a symlink, FIFO, device or
    directory) of at most `max_bytes`; raise `Rejected`."""
    fd, st = _open_regular(path)
    try:
        if st.st_size > max_bytes:
            raise Rejected("oversized", f"{st.st_size} bytes > limit {max_bytes}")
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = os.read(fd, max_bytes + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise Rejected("unreadable", exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    if size > max_bytes:
        raise Rejected("oversized", f"more than {max_bytes} bytes")
    return b"".join(chunks)


def _open_regular(path: str) -> tuple[int, os.stat_result]:
    """Open `path` for reading if it is a regular file; raise `Rejected`. Never follows a
    symlink, never blocks (a FIFO or device in the directory would hang a plain `open()`
    forever); the caller closes the descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Rejected("invalid", "a symlink (only regular files are read)") from None
        raise Rejected("unreadable", exc.strerror or str(exc)) from None
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise Rejected("unreadable", exc.strerror or str(exc)) from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise Rejected("invalid", "not a regular file")
    return fd, st


def _check(doc: dict[str, Any], kind: str) -> None:
    """What the schema cannot say: histogram shapes and bounds, the holds of a whole
    process (the oldest `schema.MAX_HOLDS_PER_PROCESS` are kept), and a live hold's start
    (holds are aged from it)."""
    holds = 0
    for i, pool in enumerate(doc["pools"]):
        where = f"pools[{i}]"
        for name, hist in pool.get("histograms", {}).items():
            _histogram(hist, f"{where}.histograms[{name!r}]")
        for j, hold in enumerate(pool.get("holds", [])):
            if kind == "live" and "started_at" not in hold:
                raise Rejected("invalid", f"{where}.holds[{j}].started_at missing")
        holds += len(pool.get("holds", []))
    if holds > schema.MAX_HOLDS_PER_PROCESS:
        _keep_oldest_holds(doc["pools"], schema.MAX_HOLDS_PER_PROCESS)
    for metric, by_lock in doc.get("locks", {}).items():
        for name, hist in by_lock.items():
            _histogram(hist, f"locks[{metric!r}][{name!r}]")


def _keep_oldest_holds(pools: list[dict[str, Any]], limit: int) -> None:
    """Keep the process's `limit` oldest holds (the ones worth looking at), in place; each
    pool counts what it lost in `holds_dropped`."""
    ranked = sorted(
        (
            (hold.get("started_at", -hold.get("age_s", 0.0)), i, j)
            for i, pool in enumerate(pools)
            for j, hold in enumerate(pool.get("holds", []))
        ),
    )
    kept = {(i, j) for _, i, j in ranked[:limit]}
    for i, pool in enumerate(pools):
        holds = pool.get("holds", [])
        pool["holds"] = [h for j, h in enumerate(holds) if (i, j) in kept]
        pool["holds_dropped"] = pool.get("holds_dropped", 0) + len(holds) - len(pool["holds"])


def _histogram(value: dict[str, Any], where: str) -> None:
    bounds, counts = value["bounds"], value["counts"]
    if len(counts) != len(bounds) + 1:
        raise Rejected("invalid", f"{where} has {len(counts)} counts for {len(bounds)} bounds")
    exemplars = value.get("exemplars")
    if exemplars is not None and len(exemplars) != len(counts):
        raise Rejected(
            "invalid", f"{where} has {len(exemplars)} exemplars for {len(counts)} buckets"
        )
    if bounds != _BOUNDS:
        raise Rejected(
            "incompatible", f"{where} has bucket bounds {bounds}, this sidecar merges {_BOUNDS}"
        )


def fold_sites(pool: dict[str, Any], admitted: set[str], limit: int) -> None:
    """Keep at most `limit` code sites per pool name, merged over every process, in place.

    `admitted` is the pool's set of sites with their own series (shared by every
    process's documents, kept for the sidecar's life): a site joins while there is room,
    in the order documents name them; a later one is added into `other`. So a series,
    once exported, keeps its label, and a file naming 100,000 sites makes at most `limit`
    series."""
    counters = pool.get("counters", {})
    for name in SITE_COUNTERS:
        values = counters.get(name)
        if not isinstance(values, dict):
            continue
        folded: dict[str, float] = {}
        for site, value in values.items():
            if site not in admitted and site != OTHER_SITE and len(admitted) < limit:
                admitted.add(site)
            # Interned: 64 workers' documents name the same sites; one string each, not
            # one per document (most of a retained document's memory otherwise).
            key = sys.intern(site) if site in admitted else OTHER_SITE
            folded[key] = folded.get(key, 0.0) + value
        counters[name] = folded
