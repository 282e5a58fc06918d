"""Reading one snapshot file, defensively.

A worker may be killed mid-write (the rename makes that invisible, but a foreign tool may
not rename), a volume may fill up, an older or newer pool-monitor may write another
format. Any file that is not a complete, valid version-1 document is rejected with a
reason (`pool_monitor_snapshot_errors_total{reason}`), never merged in part: a half-valid
document would make the merged counters wrong, which is worse than missing.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from monitor.catalogue import SECONDS_BUCKETS
from monitor.exporters import board
from monitor.exporters.snapshot import LIVE_SUFFIX, LIVE_VERSION, PREFIX, SNAPSHOT_VERSION, SUFFIX

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
    opened (never a FIFO or device: `O_NONBLOCK`, then checked), and only the header and
    the slots it says were ever used are read: a few hundred bytes for a normal pool."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise Rejected("unreadable", str(exc)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Rejected("invalid", "board is not a regular file")
        if st.st_size != board.SIZE:
            raise Rejected("invalid", f"board is {st.st_size} bytes, not {board.SIZE}")
        head = os.pread(fd, board.HEADER, 0)
        if len(head) < board.HEAD.size:
            raise Rejected("truncated", "board header cut short")
        magic, version, slots, high, pid, mono, wall, flags = board.HEAD.unpack_from(head)
        if magic != board.MAGIC:
            raise Rejected("invalid", "not a board (magic)")
        if version != board.VERSION:
            raise Rejected("unknown_version", f"board version {version}, this sidecar "
                           f"reads version {board.VERSION}")  # fmt: skip
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


def read(
    path: str,
    size: int,
    max_bytes: int = MAX_BYTES,
    check: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Parse and validate one file (of `size` bytes when stat'ed); raise `Rejected`.

    `check` is the validator (default `validate`, the full document; `validate_live` for
    a live document): one reader, so both kinds are refused for the same reasons."""
    if size > max_bytes:
        raise Rejected("oversized", f"{size} bytes > limit {max_bytes}")
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise Rejected("unreadable", str(exc)) from None
    if len(raw) > max_bytes:
        raise Rejected("oversized", f"more than {max_bytes} bytes")
    try:
        doc = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise Rejected("corrupt", f"not UTF-8: {exc.reason}") from None
    except json.JSONDecodeError as exc:
        # Running out of input means a cut-off write; anything else is garbage.
        tail = raw[exc.pos :].strip() if exc.pos < len(raw) else b""
        reason = "truncated" if not tail or not raw.strip() else "corrupt"
        raise Rejected(reason, f"{exc.msg} at byte {exc.pos} of {len(raw)}") from None
    (check or validate)(doc)
    return doc


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise Rejected("invalid", f"{where} is {value!r}, not a number")
    return value


def _counter(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for key, v in value.items():
            _number(v, f"{where}[{key!r}]")
    else:
        _number(value, where)


def _histogram(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise Rejected("invalid", f"{where} is not a histogram")
    bounds, counts = value.get("bounds"), value.get("counts")
    if (
        not isinstance(bounds, list)
        or not isinstance(counts, list)
        or len(counts) != len(bounds) + 1
    ):
        raise Rejected("invalid", f"{where} has malformed bounds/counts")
    if bounds != _BOUNDS:
        raise Rejected(
            "incompatible", f"{where} has bucket bounds {bounds}, this sidecar merges {_BOUNDS}"
        )
    for i, c in enumerate(counts):
        _number(c, f"{where}.counts[{i}]")
    _number(value.get("sum"), f"{where}.sum")


def _gauge(value: Any, where: str) -> None:
    _counter(value, where)  # same shape: a number, or {label value: number}


def _section(pool: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = pool.get(key, {})
    if not isinstance(value, dict):
        raise Rejected("invalid", f"{where}.{key} is not an object")
    return value


def _lock_histograms(locks: Any) -> None:
    if not isinstance(locks, dict):
        raise Rejected("invalid", "locks is not an object")
    for metric, by_lock in locks.items():
        if not isinstance(by_lock, dict):
            raise Rejected("invalid", f"locks[{metric!r}] is not an object")
        for name, hist in by_lock.items():
            _histogram(hist, f"locks[{metric!r}][{name!r}]")


def validate(doc: Any) -> None:
    """Everything the merge reads has the type it expects, or the whole file is rejected."""
    if not isinstance(doc, dict):
        raise Rejected("invalid", "not a JSON object")
    if doc.get("version") != SNAPSHOT_VERSION:
        raise Rejected(
            "unknown_version",
            f"version {doc.get('version')!r}, this sidecar reads version {SNAPSHOT_VERSION}",
        )
    if _number(doc.get("interval"), "interval") <= 0:
        raise Rejected("invalid", "interval must be positive")
    for where, pool in _process_pools(doc):
        for name, value in _section(pool, "counters", where).items():
            _counter(value, f"{where}.counters[{name!r}]")
        for name, value in _section(pool, "gauges", where).items():
            _gauge(value, f"{where}.gauges[{name!r}]")
        for name, value in _section(pool, "histograms", where).items():
            _histogram(value, f"{where}.histograms[{name!r}]")
        holds = pool.get("holds", [])
        if not isinstance(holds, list) or not all(isinstance(h, dict) for h in holds):
            raise Rejected("invalid", f"{where}.holds is not a list of objects")
    _lock_histograms(doc.get("locks", {}))


def _process_pools(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """What both documents share: a process with a pid, a `written_at`, a list of named
    pools (each returned with its path, for the messages)."""
    process = doc.get("process")
    if not isinstance(process, dict) or not isinstance(process.get("pid"), int):
        raise Rejected("invalid", "process.pid missing")
    _number(doc.get("written_at"), "written_at")
    pools = doc.get("pools")
    if not isinstance(pools, list):
        raise Rejected("invalid", "pools is not a list")
    checked = []
    for i, pool in enumerate(pools):
        where = f"pools[{i}]"
        if not isinstance(pool, dict) or not isinstance(pool.get("pool"), str):
            raise Rejected("invalid", f"{where}.pool missing")
        checked.append((where, pool))
    return checked


def validate_live(doc: Any) -> None:
    """A live document (`snapshot.live_document`): what the hold list reads, or rejected.
    Every hold needs a numeric `started_at`: the sidecar ages holds from it."""
    if not isinstance(doc, dict):
        raise Rejected("invalid", "not a JSON object")
    if doc.get("version") != LIVE_VERSION or doc.get("kind") != "live":
        raise Rejected(
            "unknown_version",
            f"live version {doc.get('version')!r} kind {doc.get('kind')!r}, this sidecar "
            f"reads live version {LIVE_VERSION}",
        )
    for where, pool in _process_pools(doc):
        threshold = pool.get("long_held_threshold")
        if threshold is not None:
            _number(threshold, f"{where}.long_held_threshold")
        holds = pool.get("holds")
        if not isinstance(holds, list) or not all(isinstance(h, dict) for h in holds):
            raise Rejected("invalid", f"{where}.holds is not a list of objects")
        for j, hold in enumerate(holds):
            _number(hold.get("started_at"), f"{where}.holds[{j}].started_at")
