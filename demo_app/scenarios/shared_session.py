"""Seed 000: a worker processing a run while a heartbeat thread extends the run's lease.

* `shared`  – the seed's bug: `WorkerLoop` hands its own `Session` to `HeartbeatThread`.
  Both threads now run statements on one Session, and so on one pooled connection
  checked out by the other thread (the monitor counts these as cross-thread uses), and
  they commit each other's half-done work. SQLAlchemy notices some of the overlap and
  raises; the rest is silent corruption.
* `factory` – the seed's fix: pass the session *factory*; each heartbeat opens its own short
  session, and extends the lease only if the run's `version` is still the one it last
  wrote (`UPDATE … WHERE version = :v`), so a stale heartbeat can never overwrite.

Time is scaled down: the seed beats every 30 s with a 120 s lease; here beats are tens of
milliseconds apart so each run sees many of them.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from demo_app.models import Run

SessionFactory = Callable[[], Session]
LEASE = timedelta(seconds=120)
#: Statements a pack step runs on the worker's session while it works: the heartbeat's
#: statements land between them, on the connection the worker checked out.
PACK_READS = 10


@dataclass
class Errors:
    """Exceptions from either thread, by type (thread-safe)."""

    by_type: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, exc: BaseException) -> None:
        with self._lock:
            self.by_type[type(exc).__name__] += 1

    @property
    def total(self) -> int:
        return sum(self.by_type.values())


@dataclass(frozen=True)
class SharedSessionResult:
    variant: str
    runs: int
    runs_completed: int
    heartbeats_ok: int
    heartbeat_version_mismatches: int
    heartbeats_recorded: int  # ground truth: the runs' `heartbeats` column summed
    errors: int
    error_types: dict[str, int]
    duration_s: float


class HeartbeatThread(threading.Thread):
    """Calls `beat()` every `interval_s` until stopped; counts outcomes, never dies on errors."""

    def __init__(self, beat: Callable[[], bool], interval_s: float, errors: Errors) -> None:
        super().__init__(daemon=True, name="heartbeat")
        self._beat = beat
        self._interval_s = interval_s
        self._errors = errors
        self._stopped = threading.Event()
        self.ok = 0
        self.mismatches = 0

    def run(self) -> None:
        while not self._stopped.is_set():
            try:
                if self._beat():
                    self.ok += 1
                else:
                    self.mismatches += 1
            except Exception as exc:  # the seed logs "Heartbeat error" and keeps beating
                self._errors.add(exc)
            self._stopped.wait(self._interval_s)

    def stop(self) -> None:
        self._stopped.set()


def create_run(factory: SessionFactory, tenant_id: str = "demo") -> str:
    run_id = f"run-{uuid.uuid4().hex[:12]}"
    with factory() as session:
        session.add(Run(run_id=run_id, tenant_id=tenant_id, status="queued"))
        session.commit()
    return run_id


def _lease_end() -> datetime:
    return datetime.now(timezone.utc) + LEASE


# --- ❌ shared ----------------------------------------------------------------------


def shared_send_heartbeat(session: Session, run_id: str) -> bool:
    """The seed's `HeartbeatThread.run` body: uses the *main thread's* session."""
    run = session.get(Run, run_id)
    if run is None:
        return False
    run.lease_expires_at = _lease_end()
    run.heartbeats += 1
    session.commit()
    return True


def shared_process_run(
    session: Session, run_id: str, *, steps: int, step_s: float, heartbeat_s: float, errors: Errors
) -> HeartbeatThread:
    """The seed's `WorkerLoop._process_message`, passing its session to the heartbeat."""
    run = session.get(Run, run_id)
    if run is None:
        raise LookupError(run_id)
    run.status = "processing"
    heartbeat = HeartbeatThread(lambda: shared_send_heartbeat(session, run_id), heartbeat_s, errors)
    heartbeat.start()
    try:
        for step in range(steps):  # execute_pack(run): reads while it works, then a commit
            try:
                for _ in range(PACK_READS):
                    session.execute(select(Run.progress).where(Run.run_id == run_id))
                    time.sleep(step_s / PACK_READS)
                run.progress = step + 1
                session.commit()
            except Exception as exc:
                errors.add(exc)
                _quiet_rollback(session, errors)
    finally:
        heartbeat.stop()
        heartbeat.join(timeout=10)
    try:
        run.status = "completed"
        session.commit()
    except Exception as exc:
        errors.add(exc)
        _quiet_rollback(session, errors)
    return heartbeat


def _quiet_rollback(session: Session, errors: Errors) -> None:
    try:
        session.rollback()
    except Exception as exc:
        errors.add(exc)


# --- ✅ factory ---------------------------------------------------------------------


class LeaseVersion:
    """The heartbeat's last written version (the seed's `self.current_version`)."""

    def __init__(self, value: int = 0) -> None:
        self.value = value


def factory_send_heartbeat(factory: SessionFactory, run_id: str, version: LeaseVersion) -> bool:
    """Own short session; extend the lease only if nobody changed the run since our last beat."""
    with factory() as session:
        result = session.execute(
            update(Run)
            .where(Run.run_id == run_id, Run.version == version.value)
            .values(
                lease_expires_at=_lease_end(),
                version=Run.version + 1,
                heartbeats=Run.heartbeats + 1,
            )
        )
        session.commit()
    if result.rowcount == 1:  # type: ignore[attr-defined]
        version.value += 1
        return True
    return False  # "Heartbeat failed - version mismatch"


def factory_process_run(
    factory: SessionFactory,
    run_id: str,
    *,
    steps: int,
    step_s: float,
    heartbeat_s: float,
    errors: Errors,
) -> HeartbeatThread:
    """The fixed `WorkerLoop`: its own session, and the *factory* for the heartbeat."""
    with factory() as session:
        run = session.get(Run, run_id)
        if run is None:
            raise LookupError(run_id)
        run.status = "processing"
        session.commit()
        version = LeaseVersion(run.version)
        heartbeat = HeartbeatThread(
            lambda: factory_send_heartbeat(factory, run_id, version), heartbeat_s, errors
        )
        heartbeat.start()
        try:
            for step in range(steps):  # execute_pack(run): short transactions only
                time.sleep(step_s)
                session.execute(update(Run).where(Run.run_id == run_id).values(progress=step + 1))
                session.commit()
        finally:
            heartbeat.stop()
            heartbeat.join(timeout=10)
        session.execute(update(Run).where(Run.run_id == run_id).values(status="completed"))
        session.commit()
    return heartbeat


# --- driver ---------------------------------------------------------------------------


def run_worker(
    factory: SessionFactory,
    variant: str,
    *,
    runs: int = 3,
    steps: int = 10,
    step_s: float = 0.05,
    heartbeat_s: float = 0.01,
) -> SharedSessionResult:
    """Process `runs` runs one after another, as one worker loop does."""
    if variant not in VARIANTS:
        raise KeyError(variant)
    errors = Errors()
    run_ids = [create_run(factory) for _ in range(runs)]
    completed = ok = mismatches = 0
    started = time.perf_counter()
    for run_id in run_ids:
        try:
            if variant == "shared":
                with factory() as session:
                    heartbeat = shared_process_run(
                        session,
                        run_id,
                        steps=steps,
                        step_s=step_s,
                        heartbeat_s=heartbeat_s,
                        errors=errors,
                    )
            else:
                heartbeat = factory_process_run(
                    factory,
                    run_id,
                    steps=steps,
                    step_s=step_s,
                    heartbeat_s=heartbeat_s,
                    errors=errors,
                )
        except Exception as exc:
            errors.add(exc)
            continue
        ok += heartbeat.ok
        mismatches += heartbeat.mismatches
    duration = time.perf_counter() - started
    with factory() as session:
        completed = session.execute(
            select(func.count()).where(Run.run_id.in_(run_ids), Run.status == "completed")
        ).scalar_one()
        recorded = session.execute(
            select(func.coalesce(func.sum(Run.heartbeats), 0)).where(Run.run_id.in_(run_ids))
        ).scalar_one()
    return SharedSessionResult(
        variant=variant,
        runs=runs,
        runs_completed=completed,
        heartbeats_ok=ok,
        heartbeat_version_mismatches=mismatches,
        heartbeats_recorded=int(recorded),
        errors=errors.total,
        error_types=dict(errors.by_type),
        duration_s=duration,
    )


VARIANTS = {"shared": shared_process_run, "factory": factory_process_run}
