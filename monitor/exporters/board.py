"""The hold board: which holds are out *right now*, in memory the sidecar reads.

The live document (`monitor.exporters.snapshot`) says who holds each connection, where
and doing what; a background thread writes it. A thread is only as prompt as the GIL
lets it be: with the application's own threads busy (8 CPU-bound threads on 2 cores), that
thread ran a few times a second and an ended hold stayed listed up to 1.1 s; with 32, up
to 8 s. So the *fact* that a hold is out is not left to that thread: the application's
thread that checks a connection out writes the hold's start into a slot of this board,
and the thread that returns it clears the slot, before the return completes. A memory
store each way, no system call, no lock. The sidecar reads the board (an ordinary file,
memory-mapped here) and shows a hold only while its slot still says so; the live
document only adds the details.

One board per process, in the first snapshot directory (`<name>.board`, next to the
process's `.json` and `.live`). Layout, in the machine's byte order (writer and reader
share a kernel), fixed size:

- header (`HEADER` bytes): magic `PMBOARD1`, version, slot count, `high` (one past the
  highest slot ever used: readers need not read further), the process id, a clock pair
  (`time.perf_counter()`, `time.time()` read together) that turns a slot's monotonic
  start into wall time, and flags (`LOCKED`).
- `SLOTS` slots of two doubles: the hold's start by `time.perf_counter()` (0.0 = free) and
  its monitor's serial (`PoolMonitor.serial`, the documents' `monitor_id`; exact as a
  double). A taker stores the serial first, then the start; a return clears the start.
  The hooks store through a `memoryview` of doubles: ~25 ns a store, a third of
  `struct.pack_into`'s cost.

A process with more holds out than slots leaves the rest off the board (they still travel
in the live document, as before). The board is never unmapped while the process runs: a
return may still clear its slot after the exit document (the file itself is removed then).

Memory-mapped files have one hazard: a store into a page the file no longer backs is
SIGBUS. So the board's blocks are allocated when it is created (a full volume fails then,
and the process simply has no board), the file is never truncated (a new one is created
instead), and other pool-monitor processes only ever unlink files. A process that
truncates another's board on purpose can crash it, as it could kill it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import struct
import threading
import time

log = logging.getLogger("monitor.snapshot")

MAGIC = b"PMBOARD1"
VERSION = 1
BOARD_SUFFIX = ".board"
#: Slots per process: more than any pool's connections; a NullPool with more threads
#: than this out at once leaves the rest to the live document.
SLOTS = 4096
HEADER = 64
SLOT = struct.Struct("=dd")  # start (perf_counter; 0.0 = free), monitor serial
HEAD = struct.Struct("=8sIIIIddI")  # magic, version, slots, high, pid, perf, wall, flags
HIGH_AT = 16  # offset of `high` in the header
HIGH = struct.Struct("=I")
CLOCK_AT = 24  # offset of the clock pair
CLOCK = struct.Struct("=dd")
#: Index of slot 0's start in the board seen as doubles (the hooks' unit).
FIRST = HEADER // 8
SIZE = HEADER + SLOTS * SLOT.size
#: Header flag: the process holds an exclusive `flock` on the board for its whole life, so
#: a reader that can take a shared one knows the process is gone (killed, say), even from
#: another pid namespace: the kernel drops the lock with the process.
LOCKED = 1


class Board:
    """This process's board, mapped, and seen as doubles (`view`). `free` is a stack of
    free slots, each the index of its start in `view` (lowest on top, so `high` stays at
    the most holds ever out at once); list `pop`/`append` are atomic, which is all the
    hot path needs."""

    __slots__ = ("_high_lock", "fd", "free", "high_index", "mm", "path", "view")

    def __init__(self, path: str, mm: mmap.mmap, fd: int) -> None:
        self.path = path
        self.mm = mm
        self.fd = fd  # open for the process's life: it carries the `LOCKED` flock
        self.view = memoryview(mm).cast("d")
        self.free = [FIRST + 2 * i for i in reversed(range(SLOTS))]
        self.high_index = 0  # the highest slot index taken so far
        self._high_lock = threading.Lock()

    def raise_high(self, index: int) -> None:
        """A slot beyond the highest so far was taken: readers must read that far now.
        Locked (two threads may race here), and rare: once per new most-holds-at-once."""
        with self._high_lock:
            if index > self.high_index:
                self.high_index = index
                HIGH.pack_into(self.mm, HIGH_AT, (index - FIRST) // 2 + 1)

    def stamp_clock(self) -> None:
        """Refresh the clock pair (the snapshot thread does, every live check)."""
        CLOCK.pack_into(self.mm, CLOCK_AT, time.perf_counter(), time.time())

    def remove(self) -> None:
        """At exit: the file goes; the mapping stays for returns still to come."""
        with contextlib.suppress(OSError):
            os.unlink(self.path)


#: The process's board (one element, so the hooks bind the list once and see a board
#: that appears later, or is replaced in a forked child).
current: list[Board | None] = [None]
_lock = threading.Lock()


def open_board(path: str) -> Board | None:
    """Create and map the board at `path` and make it current; None (logged at DEBUG: the
    snapshot writer reports an unwritable directory) if it cannot. Idempotent per
    process: an existing board is returned."""
    with _lock:
        board = current[0]
        if board is not None:
            return board
        try:
            # Never truncate a file that may be mapped (ours from before, in tests): a
            # mapped page past a file's end is SIGBUS. A new file, always.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            log.debug("pool-monitor board not created at %s: %s", path, exc)
            return None
        try:
            # Every block allocated now: a store into a page a full volume cannot back
            # would be SIGBUS in the application. A full volume fails here instead.
            os.posix_fallocate(fd, 0, SIZE)
            mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError) as exc:
            log.debug("pool-monitor board not mapped at %s: %s", path, exc)
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None
        flags = 0
        with contextlib.suppress(OSError):  # (a volume without locks: readers are told)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flags |= LOCKED
        HEAD.pack_into(
            mm,
            0,
            b"\0" * 8,
            VERSION,
            SLOTS,
            0,
            os.getpid(),
            time.perf_counter(),
            time.time(),
            flags,
        )
        mm[0:8] = MAGIC  # last: a reader sees a board only once its header is complete
        board = current[0] = Board(path, mm, fd)
        return board


def close_current() -> None:
    """Remove the board and stop using it (tests start each case without one). Holds
    still out keep writing to the old mapping, which nobody reads any more."""
    with _lock:
        old, current[0] = current[0], None
    if old is not None:
        old.remove()
        with contextlib.suppress(OSError):
            os.close(old.fd)


def forget_after_fork() -> None:
    """In a forked child: the inherited mapping is the parent's board; never write it, and
    let go of its descriptor (the parent keeps the lock through its own)."""
    global _lock
    _lock = threading.Lock()
    inherited, current[0] = current[0], None
    if inherited is not None:
        with contextlib.suppress(OSError):
            os.close(inherited.fd)
