"""Snapshot files (issue 5, part 1): named per process, atomic, written at exit and after
fork, pruned when dead, and never an exception in the application.

Processes that must exit, fork or lose privileges run as real subprocesses, so atexit,
fork handlers and the kernel's own EACCES/ENOSPC are what is tested.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import monitor
from monitor.exporters import board, snapshot
from tests.helpers import wait_until

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


def _docs(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(Path(p).read_text()) for p in sorted(glob.glob(f"{directory}/*.json"))]


def run_script(code: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("POOL_MONITOR_SNAPSHOT_DIR", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_document_and_file_name(tmp_path: Path, engine: sa.Engine) -> None:
    out = tmp_path / "snap"
    monitor.instrument(engine, pool_name="snap-doc", snapshot_dir=str(out), snapshot_interval=0.05)
    seen: list[dict[str, Any]] = []

    def hold_written() -> bool:
        seen[:] = [p for d in _docs(out) for p in d["pools"] if p["pool"] == "snap-doc"]
        return bool(seen and seen[0]["holds"])

    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
        held = engine.connect()  # a live hold the document must carry
        try:
            wait_until(hold_written, 5, "a snapshot with the live hold")
        finally:
            held.close()
    hold = seen[0]["holds"][0]
    assert hold["backend_pid"] is None  # sqlite has no server backend
    assert hold["site"].startswith("tests/test_snapshot.py:") and hold["age_s"] >= 0
    names = sorted(os.listdir(out))  # the full document, the board and the live document
    assert len(names) == 3, names
    ident = snapshot.identity()
    host = socket.gethostname()
    assert names[0].startswith(f"pool-monitor-{host}-{os.getpid()}-")
    assert names == sorted(
        [snapshot.file_name(ident), snapshot.live_file_name(ident), snapshot.board_file_name(ident)]
    )
    doc = _docs(out)[0]
    assert doc["version"] == 1
    assert doc["process"] == {
        "hostname": host,
        "pid": os.getpid(),
        "start_time": ident["start_time"],
        "argv0": ident["argv0"],
        "start_token": ident["start_token"],
        **(snapshot.pid_namespace() or {}),
    }
    assert time.time() - 24 * 3600 < doc["process"]["start_time"] <= time.time()
    assert doc["interval"] == 0.05 and doc["exited"] is False and doc["serving"] is True
    assert doc["writer"]["errors"] == 0
    assert set(doc["locks"]) == {"app.lock.wait_time", "app.lock.hold_time"}
    pool = next(p for p in doc["pools"] if p["pool"] == "snap-doc")
    assert isinstance(pool["monitor_id"], int)

    def both_returned() -> bool:
        pool = next(p for p in _docs(out)[0]["pools"] if p["pool"] == "snap-doc")
        return pool["counters"]["sqlalchemy.pool.checkouts"] == 2 and not pool["holds"]

    wait_until(both_returned, 5, "a snapshot after both connections returned")


def test_writes_are_atomic_for_a_concurrent_reader(tmp_path: Path, engine: sa.Engine) -> None:
    """A reader polling as fast as it can never sees a partial document."""
    monitor.instrument(
        engine, pool_name="snap-atomic", snapshot_dir=str(tmp_path), snapshot_interval=0.05
    )
    (writer,) = [w for w in snapshot.writers() if os.path.samefile(w.directory, tmp_path)]
    stop = threading.Event()

    def hammer() -> None:  # many more writes than the interval alone would make
        while not stop.is_set():
            writer.write()

    thread = threading.Thread(target=hammer)
    thread.start()
    reads = 0
    try:
        deadline = time.monotonic() + 1.0
        path = writer.path
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError):
                json.loads(Path(path).read_bytes())  # raises on a torn file
                reads += 1
    finally:
        stop.set()
        thread.join()
        writer.stop(timeout=5)
    # Counts only prove both sides ran (a loaded machine runs them slower); atomicity is
    # json.loads never raising above.
    assert reads > 10 and writer.writes > 5, (reads, writer.writes)
    assert sorted(os.listdir(tmp_path)) == sorted(  # no temp file left
        [os.path.basename(p) for p in (writer.path, writer.live_path, board.current[0].path)]
    )


def test_ensure_writer_is_idempotent(tmp_path: Path) -> None:
    snapshot.ensure_writer(str(tmp_path), 0.5)
    snapshot.ensure_writer(str(tmp_path), 0.2)
    snapshot.ensure_writer(str(tmp_path / "."), 1.0)  # the same directory, spelled otherwise
    writers = snapshot.writers()
    assert len(writers) == 1 and writers[0].interval == 0.2


def test_exit_fork_and_multiprocessing_children_write_their_own_final_files(tmp_path: Path) -> None:
    """atexit in the parent, atexit in an os.fork() child (sys.exit), and multiprocessing's
    finalizers in a fork-context child (which leaves with os._exit)."""
    result = run_script(f"""
        import multiprocessing, os, sys
        import sqlalchemy as sa
        import monitor
        engine = sa.create_engine("sqlite://")
        monitor.instrument(engine, pool_name="p", snapshot_dir={str(tmp_path)!r},
                           snapshot_interval=30)
        def work(n):
            for _ in range(n):
                with engine.connect() as c:
                    c.execute(sa.text("SELECT 1"))
        work(2)
        pid = os.fork()
        if pid == 0:
            work(3)
            sys.exit(0)
        os.waitpid(pid, 0)
        child = multiprocessing.get_context("fork").Process(target=work, args=(4,))
        child.start(); child.join()
        print(os.getpid(), pid, child.pid)
    """)
    assert result.returncode == 0, result.stderr
    parent, forked, mp_child = map(int, result.stdout.split())
    docs = {d["process"]["pid"]: d for d in _docs(tmp_path)}
    assert set(docs) == {parent, forked, mp_child}
    checkouts = {
        pid: d["pools"][0]["counters"]["sqlalchemy.pool.checkouts"] for pid, d in docs.items()
    }
    # each child starts from zero after the fork: its parent's counts are not its own
    assert checkouts == {parent: 2, forked: 3, mp_child: 4}
    assert all(d["exited"] for d in docs.values())
    assert (
        len({snapshot.file_name({**d["process"], "start_token": "x"}) for d in docs.values()}) == 3
    )


def test_read_only_directory_is_logged_once_counted_and_never_raised(tmp_path: Path) -> None:
    """The kernel's own EACCES: the directory is not writable for the app's user (root
    ignores modes, so as root the app drops to `nobody` once everything is imported)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    result = run_script(f"""
        import logging, os, time
        import sqlalchemy as sa
        import monitor
        import monitor.locks, monitor.watchdog
        from monitor.exporters import snapshot
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
        engine = sa.create_engine("sqlite://")
        with engine.connect() as c:  # import everything lazy before dropping privileges
            c.execute(sa.text("SELECT 1"))
        if os.geteuid() == 0:
            os.setgid(65534)
            os.setuid(65534)
        monitor.instrument(engine, pool_name="p", snapshot_dir={str(ro)!r},
                           snapshot_interval=0.05)
        for _ in range(20):
            with engine.connect() as c:
                c.execute(sa.text("SELECT 1"))
            time.sleep(0.02)
        print(snapshot.write_errors())
    """)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) >= 5
    warnings = [
        ln for ln in result.stderr.splitlines() if ln.startswith("WARNING monitor.snapshot")
    ]
    assert len(warnings) == 1, result.stderr
    assert "Permission denied" in warnings[0] and str(ro) in warnings[0]
    assert "not writable" in warnings[0]
    assert os.listdir(ro) == []


@contextlib.contextmanager
def _full_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Any]]:
    """A directory whose writes fail with the kernel's ENOSPC: a tiny tmpfs filled up
    when this process may mount, else temp files opened on /dev/full."""
    full = tmp_path / "full"
    full.mkdir()
    try:
        mounted = (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)],
                capture_output=True,
                check=False,
            ).returncode
            == 0
        )
    except OSError:  # no mount(8) here
        mounted = False
    filler = full / "filler"
    try:
        if mounted:
            with contextlib.suppress(OSError), open(filler, "wb") as f:
                while True:
                    f.write(b"x" * 4096)
                    f.flush()

            def free() -> None:
                filler.unlink()
        else:
            real_open = open

            def dev_full_open(path: Any, *args: Any, **kwargs: Any) -> Any:
                if str(path).endswith(".tmp"):
                    return real_open("/dev/full", *args, **kwargs)
                return real_open(path, *args, **kwargs)

            monkeypatch.setattr(snapshot, "open", dev_full_open, raising=False)

            def free() -> None:
                monkeypatch.delattr(snapshot, "open")

        yield full, free
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(full)], check=False)


def test_full_disk_is_logged_once_counted_and_recovers(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    engine: sa.Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="monitor.snapshot")
    with _full_directory(tmp_path, monkeypatch) as (full, free):
        before = snapshot.write_errors()
        monitor.instrument(
            engine, pool_name="snap-full", snapshot_dir=str(full), snapshot_interval=0.05
        )
        writer = snapshot.writers()[0]
        for _ in range(10):  # the application keeps working
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        wait_until(lambda: writer.errors >= 3, 5, "failed writes")
        assert snapshot.write_errors() - before >= 3
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "disk full" in warnings[0].getMessage()
        assert (
            errno.errorcode[errno.ENOSPC] in warnings[0].getMessage()
            or "No space left" in warnings[0].getMessage()
        )
        # No temporary file is left behind. One may exist for an instant while a write is
        # being tried (a CI run listed a `.live.tmp` mid-attempt): a leftover never goes.
        wait_until(
            lambda: not [n for n in os.listdir(full) if n.endswith(".tmp")],
            5,
            "no temporary file left in the full directory",
        )
        free()
        wait_until(lambda: os.path.exists(writer.path), 5, "a write after space came back")
        assert any("work again" in r.getMessage() for r in caplog.records)
        doc = json.loads(Path(writer.path).read_text())
        assert doc["writer"]["errors"] >= 3


def test_writers_prune_only_stale_pool_monitor_files(tmp_path: Path) -> None:
    old = time.time() - 120
    stale = tmp_path / "pool-monitor-otherhost-7-123.json"
    stale_tmp = tmp_path / ".pool-monitor-otherhost-7-123.json.tmp"
    fresh = tmp_path / "pool-monitor-otherhost-8-456.json"
    foreign = tmp_path / "unrelated.json"
    for path in (stale, stale_tmp, fresh, foreign):
        path.write_text("{}")
    for path in (stale, stale_tmp, foreign):
        os.utime(path, (old, old))
    writer = snapshot.SnapshotWriter(str(tmp_path), 1.0)
    assert writer.prune() == 2
    assert sorted(os.listdir(tmp_path)) == sorted([fresh.name, foreign.name])
    assert writer.prune() == 0  # rate-limited: once a minute


def test_holds_are_capped_per_pool(
    tmp_path: Path, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(snapshot, "MAX_HOLDS_PER_POOL", 2)
    monitor.instrument(engine, pool_name="snap-cap")
    conns = [engine.connect() for _ in range(3)]
    try:
        doc = snapshot.process_snapshot(1.0)
    finally:
        for conn in conns:
            conn.close()
    pool = next(p for p in doc["pools"] if p["pool"] == "snap-cap")
    assert len(pool["holds"]) == 2 and pool["holds_dropped"] == 1
    assert pool["holds"][0]["age_s"] >= pool["holds"][1]["age_s"]


def test_preforking_parent_is_standby_until_it_checks_out(tmp_path: Path) -> None:
    """`gunicorn --preload`'s shape: instrument, then fork workers. The parent serves
    nothing until it checks out again; a multiprocessing helper fork changes nothing."""
    result = run_script(f"""
        import json, multiprocessing, os, time
        import sqlalchemy as sa
        import monitor
        from monitor.exporters import snapshot
        engine = sa.create_engine("sqlite://")
        monitor.instrument(engine, pool_name="p", snapshot_dir={str(tmp_path)!r},
                           snapshot_interval=30)
        def checkout():
            with engine.connect() as c:
                c.execute(sa.text("SELECT 1"))
        checkout()  # e.g. a warm-up query at import
        serving = [snapshot.process_snapshot(30)["serving"]]
        pid = os.fork()
        if pid == 0:
            os._exit(0 if snapshot.process_snapshot(30)["serving"] else 1)  # a worker
        _, status = os.waitpid(pid, 0)
        serving.append(snapshot.process_snapshot(30)["serving"])
        serving.append(snapshot.process_snapshot(30)["serving"])  # still: nothing done
        checkout()
        serving.append(snapshot.process_snapshot(30)["serving"])
        child = multiprocessing.get_context("fork").Process(target=checkout)
        child.start(); child.join()
        serving.append(snapshot.process_snapshot(30)["serving"])
        print(json.dumps({{"serving": serving, "child_serving": status == 0}}))
    """)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out == {"serving": [True, False, False, True, True], "child_serving": True}


def _stopped_by(
    tmp_path: Path, sig: signal.Signals, handler: str, instrumented: bool
) -> tuple[int, str, list[dict[str, Any]]]:
    """Run a plain python process that does 3 checkouts, send it `sig`, and return its
    exit status, its output and the documents it left."""
    snapdir = tmp_path / ("instrumented" if instrumented else "bare")
    snapdir.mkdir()
    code = textwrap.dedent(f"""
        import signal, sys, time
        import sqlalchemy as sa
        import monitor
        def own(signum, frame):
            print("own handler", signal.Signals(signum).name, flush=True)
            sys.exit(3)
        if {handler!r} == "before":
            signal.signal({int(sig)}, own)
        engine = sa.create_engine("sqlite://")
        settings = dict(snapshot_dir={str(snapdir)!r}, snapshot_interval=30)
        monitor.instrument(engine, pool_name="p", **(settings if {instrumented} else {{}}))
        if {handler!r} == "after":
            signal.signal({int(sig)}, own)
        for _ in range(3):
            with engine.connect() as c:
                c.execute(sa.text("SELECT 1"))
        print("ready", flush=True)
        time.sleep(30)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("POOL_MONITOR_SNAPSHOT_DIR", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return proc.returncode, out, _docs(snapdir)


@pytest.mark.parametrize(
    ("sig", "handler"),
    [
        (signal.SIGTERM, "none"),  # SIG_DFL: atexit never runs
        (signal.SIGINT, "none"),  # KeyboardInterrupt
        (signal.SIGTERM, "before"),  # the application's handler, installed first
        (signal.SIGTERM, "after"),  # … or after instrument()
    ],
    ids=["sigterm", "sigint", "own-handler-before", "own-handler-after"],
)
def test_plain_process_stopped_by_a_signal_writes_its_exit_document(
    tmp_path: Path, sig: signal.Signals, handler: str
) -> None:
    """The process ends exactly as it does without pool-monitor (same status, the
    application's own handler runs), and leaves its exit document."""
    bare = _stopped_by(tmp_path, sig, handler, instrumented=False)
    status, out, docs = _stopped_by(tmp_path, sig, handler, instrumented=True)
    assert (status, out) == bare[:2]
    assert status == (3 if handler != "none" else -sig)
    [doc] = docs
    assert doc["exited"] is True
    assert doc["pools"][0]["counters"]["sqlalchemy.pool.checkouts"] == 3
