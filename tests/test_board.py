"""The hold board (`monitor.exporters.board`): the application's own threads say which
holds are out, so the sidecar's list is true however starved the snapshot thread is.

The writer side runs in this process on SQLite (the board does not depend on the
driver); processes that must be killed or fork are real subprocesses. The reader is the
sidecar's own `files.read_board` and `aggregate._board_holds`, fed hostile files too.
"""

from __future__ import annotations

import math
import os
import signal
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

import monitor
from monitor.exporters import board, snapshot
from monitor.sidecar import aggregate, files

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _stop_writers() -> Iterator[None]:
    yield
    snapshot.stop_all()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[sa.Engine]:
    eng = sa.create_engine(
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        poolclass=sa.pool.QueuePool,
        pool_size=3,
        max_overflow=0,
    )
    yield eng
    monitor.uninstrument(eng)
    eng.dispose()


def _read(path: str) -> files.BoardView:
    return files.read_board(path, 1000.0)


def test_a_hold_is_on_the_board_exactly_while_it_is_out(tmp_path: Path, engine: sa.Engine) -> None:
    pm = monitor.instrument(engine, pool_name="b1", snapshot_dir=str(tmp_path / "s"))
    own = board.current[0]
    assert own is not None and Path(own.path).parent == tmp_path / "s"
    assert _read(own.path).slots == {}
    first = engine.connect()
    second = engine.connect()
    [hold1] = [h for h in pm.ledger.holds.values() if h.slot == board.FIRST]
    view = _read(own.path)
    assert view.pid == os.getpid() and view.gone is False  # we hold its lock
    assert view.slots == {
        board.FIRST: (hold1.start, pm.serial),
        board.FIRST + 2: (
            pm.ledger.holds[second._dbapi_connection._connection_record].start,
            pm.serial,
        ),
    }
    first.close()
    assert list(_read(own.path).slots) == [board.FIRST + 2]  # cleared by the return itself
    third = engine.connect()  # the freed slot is reused: `high` stays at most-out-at-once
    assert sorted(_read(own.path).slots) == [board.FIRST, board.FIRST + 2]
    second.close()
    third.close()
    assert _read(own.path).slots == {} and own.high_index == board.FIRST + 2
    assert sorted(own.free)[:2] == [board.FIRST, board.FIRST + 2]
    assert len(own.free) == board.SLOTS
    # Wall time from the clock pair: the slot's start converts to within a millisecond.
    held = engine.connect()
    import time

    wall_now, [(start, _)] = time.time(), _read(own.path).slots.values()
    view = _read(own.path)
    assert abs(start + view.wall_offset - wall_now) < 0.5
    held.close()


def test_documents_name_each_hold_s_slot(tmp_path: Path, engine: sa.Engine) -> None:
    pm = monitor.instrument(engine, pool_name="b2", snapshot_dir=str(tmp_path))
    with engine.connect():
        [hold] = pm.ledger.holds.values()
        doc = snapshot.live_document(snapshot.live_holds())
        [row] = next(p for p in doc["pools"] if p["pool"] == "b2")["holds"]
        assert row["board_slot"] == hold.slot == board.FIRST
        assert row["started_mono"] == hold.start


def test_uninstrument_clears_the_slots_of_holds_still_out(
    tmp_path: Path, engine: sa.Engine
) -> None:
    monitor.instrument(engine, pool_name="b3", snapshot_dir=str(tmp_path))
    own = board.current[0]
    assert own is not None
    conn = engine.connect()
    assert len(_read(own.path).slots) == 1
    monitor.uninstrument(engine)  # its return will not come to us
    assert _read(own.path).slots == {} and len(own.free) == board.SLOTS
    conn.close()
    assert len(own.free) == board.SLOTS  # and nothing is freed twice


def test_a_full_board_leaves_holds_to_the_documents(tmp_path: Path, engine: sa.Engine) -> None:
    pm = monitor.instrument(engine, pool_name="b4", snapshot_dir=str(tmp_path))
    own = board.current[0]
    assert own is not None
    kept, own.free[:] = list(own.free), []
    try:
        with engine.connect():
            [hold] = pm.ledger.holds.values()
            assert hold.board is None and _read(own.path).slots == {}
            doc = snapshot.live_document(snapshot.live_holds())
            [row] = next(p for p in doc["pools"] if p["pool"] == "b4")["holds"]
            assert "board_slot" not in row
        assert pm.ledger.counters.errors == 0
    finally:
        own.free[:] = kept


def _run(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )


def test_killed_process_board_says_gone_and_forked_child_has_its_own(tmp_path: Path) -> None:
    """The kernel releases the board's lock with its process, whatever pid namespace the
    reader is in; a forked child never writes its parent's board (it makes its own)."""
    proc = _run(f"""
        import os, sys, time
        import sqlalchemy as sa
        import monitor
        from monitor.exporters import board
        engine = sa.create_engine("sqlite:///{tmp_path}/db.sqlite", pool_size=2)
        monitor.instrument(engine, pool_name="k", snapshot_dir="{tmp_path}/s")
        held = engine.connect()
        parent = board.current[0].path
        pid = os.fork()
        if pid == 0:
            with engine.connect():  # the child's own checkout
                print(board.current[0].path, flush=True)
                time.sleep(0.5)
            os._exit(0)
        os.waitpid(pid, 0)
        print(parent, flush=True)
        time.sleep(60)
    """)
    assert proc.stdout is not None
    child_path = proc.stdout.readline().strip()
    parent_path = proc.stdout.readline().strip()
    assert child_path != parent_path and child_path.endswith(".board")
    view = _read(parent_path)
    assert view.gone is False and len(view.slots) == 1  # the child wrote only its own
    [(start, serial)] = view.slots.values()
    assert start > 0 and serial >= 1
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    after = _read(parent_path)
    assert after.gone is True and len(after.slots) == 1  # the slot stays: the lock tells


def _header(**override: object) -> bytes:
    fields = {
        "magic": board.MAGIC,
        "version": board.VERSION,
        "slots": board.SLOTS,
        "high": 2,
        "pid": 42,
        "mono": 10.0,
        "wall": 1000.0,
        "flags": 0,
    }
    fields.update(override)
    return board.HEAD.pack(*fields.values()).ljust(board.HEADER, b"\0")


def _write(path: Path, head: bytes, slots: bytes = b"") -> str:
    body = head + slots
    path.write_bytes(body + b"\0" * (board.SIZE - len(body)))
    return str(path)


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (_header(magic=b"NOTBOARD"), "invalid"),
        (_header(version=2), "unknown_version"),
        (_header(slots=10), "invalid"),
        (_header(high=board.SLOTS + 1), "invalid"),
        (_header(mono=math.inf), "invalid"),
        (_header(wall=math.nan), "invalid"),
    ],
)
def test_bad_headers_are_rejected_with_a_reason(tmp_path: Path, head: bytes, reason: str) -> None:
    with pytest.raises(files.Rejected) as caught:
        _read(_write(tmp_path / "x.board", head))
    assert caught.value.reason == reason


def test_only_a_regular_file_of_the_right_size_is_read(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.board"
    os.mkfifo(fifo)  # would block a plain open() forever: refused at once
    with pytest.raises(files.Rejected, match="not a regular file"):
        _read(str(fifo))
    short = tmp_path / "short.board"
    short.write_bytes(_header())
    with pytest.raises(files.Rejected, match="not 65600"):
        _read(str(short))
    target = _write(tmp_path / "real.board", _header())
    link = tmp_path / "link.board"
    link.symlink_to(target)
    with pytest.raises(files.Rejected) as caught:
        _read(str(link))
    assert caught.value.reason == "invalid"  # as a symlinked snapshot file is


def test_slots_that_cannot_be_holds_are_ignored(tmp_path: Path) -> None:
    slots = b"".join(
        board.SLOT.pack(*pair)
        for pair in [
            (5.0, 1.0),
            (math.nan, 1.0),
            (-1.0, 1.0),
            (math.inf, 1.0),
            (7.0, 0.0),
            (8.0, 2.0**60),
            (9.0, 3.0),
        ]
    )
    view = _read(_write(tmp_path / "x.board", _header(high=7), slots))
    assert view.slots == {board.FIRST: (5.0, 1), board.FIRST + 12: (9.0, 3)}
    assert view.wall_offset == 990.0 and view.gone is False  # (no LOCKED flag: not asked)


@settings(max_examples=200, deadline=None)
@given(high=st.integers(0, board.SLOTS), body=st.binary(max_size=2048))
def test_any_slot_bytes_read_without_raising(
    tmp_path_factory: pytest.TempPathFactory, high: int, body: bytes
) -> None:
    path = tmp_path_factory.mktemp("h") / "x.board"
    view = _read(_write(path, _header(high=high), body))
    for index, (start, serial) in view.slots.items():
        assert index >= board.FIRST and (index - board.FIRST) % 2 == 0
        assert math.isfinite(start) and start > 0 and 0 < serial < 2**53


def _pool(serial: int, holds: list[dict[str, object]]) -> dict[str, object]:
    return {"pool": f"p{serial}", "monitor_id": serial, "long_held_threshold": 5.0, "holds": holds}


def test_documents_are_checked_against_the_board() -> None:
    """Ended since the document: dropped. Newer than it: shown, pending. Off the board
    (none free, older library): the document's word. Another hold in the slot: ended."""
    still = {"started_at": 990.0, "board_slot": 8, "started_mono": 1.5, "site": "a.py:1"}
    ended = {"started_at": 991.0, "board_slot": 10, "started_mono": 2.5, "site": "a.py:2"}
    reused = {"started_at": 992.0, "board_slot": 12, "started_mono": 3.5, "site": "a.py:3"}
    off = {"started_at": 993.0, "site": "a.py:4"}
    view = files.BoardView(
        pid=1,
        read_at=1000.0,
        wall_offset=990.0,
        slots={8: (1.5, 1), 12: (4.0, 1), 14: (6.0, 2), 16: (7.0, 99)},
    )
    full = [_pool(1, []), {"pool": "p2", "monitor_id": 2, "settings": {"long_held_threshold": 3}}]
    out = aggregate._board_holds([_pool(1, [still, ended, reused, off])], full, view)
    by_pool = {p["pool"]: p["holds"] for p in out}
    assert [h.get("site") for h in by_pool["p1"]] == ["a.py:1", "a.py:4", None]
    assert by_pool["p1"][0]["as_of"] == 1000.0 and "as_of" not in by_pool["p1"][1]
    assert by_pool["p1"][2] == {
        "started_at": 994.0,
        "pending": True,
        "board_slot": 12,
        "as_of": 1000.0,
    }
    assert by_pool["p2"] == [
        {"started_at": 996.0, "pending": True, "board_slot": 14, "as_of": 1000.0}
    ]
    assert [p["pool"] for p in out] == ["p1", "p2"]  # serial 99: no such pool, not shown
    assert next(p for p in out if p["pool"] == "p2")["long_held_threshold"] == 3


def test_struct_layout_is_what_the_hooks_index() -> None:
    assert board.HEAD.size <= board.HEADER and board.HEADER % 8 == 0
    assert board.FIRST == board.HEADER // 8 and board.SIZE == 64 + 4096 * 16
    assert struct.calcsize("=dd") == board.SLOT.size == 16
