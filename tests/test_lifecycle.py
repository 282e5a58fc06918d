"""Process lifecycle under real servers (issue "Tell the truth in real deployments").

uvicorn catches SIGTERM/SIGINT, shuts down gracefully and re-raises the signal with its
default action, so no atexit handler runs: before `monitor.exporters.signals`, every
`--workers` worker on any stop, and a single uvicorn on SIGTERM, left no exit document
and looked "dead" with live gauges until its file went stale. `gunicorn --preload`'s master
instruments the engine too and looked like one more serving process.

Each test runs a real server (`tests/lifecycle_app.py`) on the embedded PostgreSQL, serves
known requests, stops it the way an orchestrator (a signal to the main process) or a
terminal (SIGINT to the process group) does, and asserts that every worker's exit document
(`"exited": true`, checkouts equal to the requests that worker served) is there within two
snapshot intervals, that the sidecar's merge keeps every count, and that the server ends
as it does without pool-monitor: the same exit status, and under gunicorn each worker
still dies of the signal (as gunicorn logs). `test_snapshot` compares bare and
instrumented plain processes directly.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from monitor.sidecar.aggregate import Aggregator

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: Snapshot interval: generous, so "within two intervals" says which mechanism worked (a
#: file going stale takes three), not how fast this machine is.
INTERVAL = 1.5
REQUESTS = 12
POOL_NAME = "lifecycle"  # tests/lifecycle_app.py's
POOL_SIZE, MAX_OVERFLOW = 2, 1
POOL_MAX = POOL_SIZE + MAX_OVERFLOW


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    snapdir: Path
    log: Path
    #: Requests answered so far, by worker pid (the readiness probe's included).
    served: Counter[int] = field(default_factory=Counter)

    def docs(self) -> dict[int, dict[str, Any]]:
        """Every process's last document, by pid."""
        out = {}
        for path in self.snapdir.glob("pool-monitor-*.json"):
            doc = json.loads(path.read_text())
            out[doc["process"]["pid"]] = doc
        return out

    def get(self, timeout: float = 10) -> int:
        """One request (one checkout); the pid of the worker that answered."""
        r = httpx.get(f"http://127.0.0.1:{self.port}/", timeout=timeout)
        assert r.status_code == 200, r.text
        pid = int(r.text)
        self.served[pid] += 1
        return pid

    def serve(self, n: int) -> None:
        """`n` requests, a new connection each, so they spread over the workers."""
        for _ in range(n):
            self.get()

    def stop(self, sig: signal.Signals, group: bool = False) -> float:
        """`sig` to the main process (Kubernetes sends SIGTERM to it) or to the whole
        process group (Ctrl+C sends SIGINT to it); the time it was sent."""
        sent = time.monotonic()
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        return sent

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def start(database_url: str, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def _start(command: list[str], instrument: str = "import") -> Server:
        port = free_port()
        snapdir = tmp_path / f"snapshots-{len(started)}"
        snapdir.mkdir()
        log = tmp_path / f"server-{len(started)}.log"
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "LIFECYCLE_DATABASE_URL": database_url,
            "LIFECYCLE_INSTRUMENT": instrument,
            "LIFECYCLE_POOL": f"{POOL_SIZE},{MAX_OVERFLOW}",
            "POOL_MONITOR_SNAPSHOT_DIR": str(snapdir),
            "POOL_MONITOR_SNAPSHOT_INTERVAL": str(INTERVAL),
        }
        argv = [a.replace("{port}", str(port)) for a in command]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, for SIGINT like Ctrl+C
            )
        server = Server(proc, port, snapdir, log)
        started.append(server)

        def up() -> bool:
            assert proc.poll() is None, server.output()
            try:
                server.get(timeout=2)
            except httpx.TransportError:
                return False
            return True

        wait_for(up, 20, f"{argv[0]} answering")
        return server

    yield _start
    for server in started:
        if server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(10)


def uvicorn(workers: int = 1) -> list[str]:
    command = [str(BIN / "uvicorn"), "tests.lifecycle_app:app", "--port", "{port}"]
    return [*command, "--workers", str(workers)] if workers > 1 else command


def gunicorn(*options: str) -> list[str]:
    command = [str(BIN / "gunicorn"), "tests.lifecycle_app:app", "-b", "127.0.0.1:{port}"]
    return [*command, "-w", "2", "-k", "uvicorn.workers.UvicornWorker", *options]


def wait_for_exit_documents(
    server: Server, pids: set[int], sent: float
) -> dict[int, dict[str, Any]]:
    """Every pid's document marked exited, no later than two intervals after `sent`."""

    def all_exited() -> dict[int, dict[str, Any]] | None:
        docs = server.docs()
        return docs if all(docs[pid]["exited"] for pid in pids) else None

    docs = wait_for(all_exited, 20, f"exit documents of {sorted(pids)}")
    took = time.monotonic() - sent
    assert took <= 2 * INTERVAL, (
        f"exit documents after {took:.2f} s, more than 2 intervals; log:\n{server.output()}"
    )
    return docs


def checkouts(doc: dict[str, Any]) -> float:
    [pool] = [p for p in doc["pools"] if p["pool"] == POOL_NAME]
    return pool["counters"]["sqlalchemy.pool.checkouts"]


def merged(snapdir: Path) -> tuple[dict[str, Any], Counter[str]]:
    """The sidecar's merge of the directory: the pool, and the processes by state."""
    view = Aggregator(str(snapdir)).scan()
    [pool] = [p for p in view.pools if p["pool"] == POOL_NAME]
    return pool, Counter(p["state"] for p in view.processes)


def assert_final(server: Server, processes: set[int], sent: float) -> None:
    """Each process's exit document within two intervals of `sent`, with exactly the
    requests it served; the sidecar's merge keeps them all and shows no capacity left."""
    docs = wait_for_exit_documents(server, processes, sent)
    assert {pid: checkouts(docs[pid]) for pid in processes} == {
        pid: server.served.get(pid, 0) for pid in processes
    }
    pool, states = merged(server.snapdir)
    assert pool["counters"]["sqlalchemy.pool.checkouts"] == sum(server.served.values())
    assert pool["processes"] == 0 and pool["gauges"]["db.client.connection.count"]["used"] == 0
    assert "db.client.connection.max" not in pool["gauges"]
    assert states == Counter(exited=len(processes))


def document_pids(server: Server, count: int) -> set[int]:
    """The pids of the `count` processes that write documents, once all have."""
    return set(wait_for(lambda: len(server.docs()) == count and server.docs(), 20, "documents"))


@pytest.mark.parametrize(
    ("sig", "instrument", "returncode"),
    [
        (signal.SIGTERM, "import", -signal.SIGTERM),  # uvicorn dies of the re-raised signal
        (signal.SIGINT, "import", 0),  # KeyboardInterrupt, caught by uvicorn.run()
        (signal.SIGTERM, "lifespan", -signal.SIGTERM),
    ],
    ids=["sigterm", "sigint", "sigterm-instrumented-in-lifespan"],
)
def test_uvicorn_single_process(
    start: Callable[..., Server], sig: signal.Signals, instrument: str, returncode: int
) -> None:
    """In-lifespan instrumenting happens after uvicorn installed its handlers, so the one
    it puts back before re-raising is SIG_DFL, not ours."""
    server = start(uvicorn(), instrument)
    pids = document_pids(server, 1)
    server.serve(REQUESTS)
    assert_final(server, pids, server.stop(sig))
    assert server.proc.wait(20) == returncode, server.output()


@pytest.mark.parametrize(
    ("sig", "group"),
    [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True)],
    ids=["sigterm", "sigint", "sigint-to-the-group"],
)
def test_uvicorn_workers(start: Callable[..., Server], sig: signal.Signals, group: bool) -> None:
    """`--workers 2`: each worker is a spawned process that imports the application after
    uvicorn installed its handlers; the supervisor stops them with SIGTERM."""
    server = start(uvicorn(workers=2))
    workers = document_pids(server, 2)
    server.serve(REQUESTS)
    assert_final(server, workers, server.stop(sig, group))
    assert server.proc.wait(20) == 0, server.output()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_gunicorn_uvicorn_workers(start: Callable[..., Server], sig: signal.Signals) -> None:
    """gunicorn relays SIGTERM to its workers; Ctrl+C sends SIGINT to every process. The
    workers still die of that signal, as gunicorn's log of each one says.

    (SIGINT to the master alone makes it send SIGQUIT, which `UvicornWorker` does not
    act on: gunicorn SIGKILLs the workers after `--graceful-timeout`. Nothing in-process
    can write then; the sidecar sees the pids go.)"""
    server = start(gunicorn())
    workers = document_pids(server, 2)
    server.serve(REQUESTS)
    assert_final(server, workers, server.stop(sig, group=sig == signal.SIGINT))
    assert server.proc.wait(20) == 0, server.output()
    for pid in workers:
        assert f"Worker (pid:{pid}) was sent {sig.name}!" in server.output()


def test_gunicorn_preload_master_adds_no_capacity(start: Callable[..., Server]) -> None:
    """`--preload`: the master imports the application (so instruments the engine) and
    forks the workers. It writes a document, with its counters, but as `standby`: the
    merged `max` is workers × pool max, also while the workers are idle."""
    server = start(gunicorn("--preload"))
    pids = document_pids(server, 3)
    master = server.proc.pid
    assert master in pids

    def settled() -> tuple[dict[str, Any], Counter[str]] | None:
        pool, states = merged(server.snapdir)
        return (pool, states) if states == Counter(live=2, standby=1) else None

    pool, _ = wait_for(settled, 2 * INTERVAL + 5, "2 live workers and a standby master")
    assert server.docs()[master]["serving"] is False
    assert pool["gauges"]["db.client.connection.max"] == 2 * POOL_MAX
    assert pool["processes"] == 2
    server.serve(REQUESTS)
    time.sleep(INTERVAL)  # a document written after the requests, by every process
    pool, states = merged(server.snapdir)
    assert states == Counter(live=2, standby=1)
    assert pool["gauges"]["db.client.connection.max"] == 2 * POOL_MAX
    assert_final(server, pids, server.stop(signal.SIGTERM))
    assert server.proc.wait(20) == 0, server.output()
