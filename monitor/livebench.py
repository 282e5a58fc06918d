"""`pool-monitor bench-live`: what the live-hold document costs a worker process.

The snapshot writer thread checks every `LIVE_CHECK_S` whether the set of live holds
changed, writes the small live document if so and touches it if not
(`monitor.exporters.snapshot`). Its cost is CPU time of that one thread, so it is measured
as exactly that: the writer thread's own CPU clock (`pthread_getcpuclockid`, nanoseconds),
over a fixed window, as a percentage of one core. The writer here has an interval of an
hour, so after its first full document (before the window) everything it does in the
window is live-document work. Two windows: idle (an instrumented pool, nobody checking
out) and under load (threads doing short checkouts back to back, so the set of holds
changes all the time and every check writes). The process has its board, as with a
snapshot directory (the writer stamps its clock every check). The application threads'
own cost (the hooks, including posting holds on the board) is what `pool-monitor bench`
measures (`with_sidecar`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from typing import Any

#: Default measuring window per case, seconds.
WINDOW_S = 3.0


def _thread_cpu(thread: threading.Thread) -> float:
    """CPU seconds `thread` has used (Linux/Unix: its own CPU-time clock)."""
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def measure(window: float = WINDOW_S, threads: int = 8, url: str | None = None) -> dict[str, Any]:
    """Run both cases; return per case the writer thread's CPU % of one core, the live
    writes and touches it made, and (under load) the checkouts the load made."""
    import sqlalchemy as sa

    import monitor
    from monitor.exporters import board, snapshot

    with tempfile.TemporaryDirectory(prefix="pool-monitor-livebench-") as tmp:
        engine = sa.create_engine(
            url or f"sqlite:///{os.path.join(tmp, 'bench.sqlite')}",
            poolclass=sa.pool.QueuePool,
            pool_size=threads,
            max_overflow=0,
        )
        monitor.instrument(engine, pool_name="livebench")
        writer = snapshot.SnapshotWriter(tmp, interval=3600.0)
        own_board = board.current[0] is None  # (as `ensure_writer` would: the hooks post)
        if own_board:
            board.open_board(os.path.join(tmp, snapshot.board_file_name(snapshot.identity())))
        try:
            writer.start()
            deadline = time.monotonic() + 10
            while writer.writes < 1 or writer.live_writes < 1:  # the full document is done
                if time.monotonic() > deadline:
                    raise RuntimeError("the snapshot writer did not start")
                time.sleep(0.01)

            def one_window(load: bool) -> dict[str, Any]:
                stop = threading.Event()
                checkouts = [0] * threads

                def work(i: int) -> None:
                    while not stop.is_set():
                        with engine.connect() as conn:
                            conn.exec_driver_sql("SELECT 1")
                        checkouts[i] += 1

                workers = [
                    threading.Thread(target=work, args=(i,), daemon=True)
                    for i in range(threads if load else 0)
                ]
                for w in workers:
                    w.start()
                time.sleep(0.3)  # warm up
                writes, touches = writer.live_writes, writer.live_touches
                done = sum(checkouts)
                cpu0, t0 = _thread_cpu(writer._thread), time.monotonic()
                time.sleep(window)
                cpu1, t1 = _thread_cpu(writer._thread), time.monotonic()
                result = {
                    "cpu_percent_of_one_core": 100.0 * (cpu1 - cpu0) / (t1 - t0),
                    "window_s": t1 - t0,
                    "live_writes": writer.live_writes - writes,
                    "live_touches": writer.live_touches - touches,
                    "live_errors": writer.live_errors,
                    "checkouts_per_s": (sum(checkouts) - done) / (t1 - t0),
                    "load_threads": len(workers),
                }
                stop.set()
                for w in workers:
                    w.join(10)
                return result

            return {"idle": one_window(False), "load": one_window(True)}
        finally:
            writer.stop(timeout=5)
            writer.remove_live()
            if own_board:
                board.close_current()
            monitor.uninstrument(engine)
            engine.dispose()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pool-monitor bench-live", description=__doc__)
    p.add_argument("--window", type=float, default=WINDOW_S, help="seconds per case")
    p.add_argument("--threads", type=int, default=8, help="load threads (and pool size)")
    p.add_argument("--url", help="database URL (default: a temporary SQLite file)")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    result = measure(args.window, args.threads, args.url)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for case, r in result.items():
        print(
            f"{case:5s}: writer thread {r['cpu_percent_of_one_core']:.3f}% of one core over "
            f"{r['window_s']:.1f} s; {r['live_writes']} live writes, {r['live_touches']} "
            f"touches; {r['checkouts_per_s']:.0f} checkouts/s by {r['load_threads']} threads"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
