"""The demo's scenarios without HTTP, on a real PostgreSQL: exact outcomes per variant.

The external service is real too (uvicorn on 127.0.0.1, 0.3 s latency), so the hold times
the monitor records are real waits on a socket.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal

import httpx
import pytest
from sqlalchemy.exc import MultipleResultsFound

from demo_app import external, lock_metrics, snapshots
from demo_app.clients import ImageProcessorClient, PaymentGatewayClient
from demo_app.db import Database
from demo_app.scenarios import (
    SCENARIOS,
    duplicate_rows,
    external_call,
    idempotent_payment,
    lost_update,
    pool_isolation,
    session_store,
    shared_session,
)
from demo_app.schema import create_schema
from demo_app.servers import serve_in_thread
from demo_app.settings import DemoSettings

LATENCY_S = 0.3


@pytest.fixture(scope="module")
def external_url() -> Iterator[str]:
    with serve_in_thread(external.create_app(LATENCY_S)) as url:
        yield url


@pytest.fixture(scope="module")
def settings(database_url: str, external_url: str) -> DemoSettings:
    create_schema(database_url)
    return DemoSettings.scaled(database_url, external_url, LATENCY_S)


@pytest.fixture
async def db(settings: DemoSettings) -> AsyncIterator[Database]:
    """Fresh engines per test: async connections must not outlive their event loop."""
    database = Database(settings)
    try:
        yield database
    finally:
        await database.dispose()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


def test_every_scenario_has_the_agreed_variants() -> None:
    assert {name: s.variants for name, s in SCENARIOS.items()} == {
        "external_call": ("anti", "three_stage"),
        "pool_isolation": ("shared", "split"),
        "duplicate_rows": ("unsafe", "safe"),
        "idempotent_payment": ("naive", "idempotent"),
        "lost_update": ("naive", "pessimistic", "optimistic"),
        "shared_session": ("shared", "factory"),
        "session_store": ("unlocked", "locked"),
    }


# --- lost_update (seed 003) ---------------------------------------------------------------


async def test_lost_update_naive_loses_increments(db: Database) -> None:
    result = lost_update.run_concurrent_increments(db.worker_sessions, "naive")
    assert result.errors == []
    assert result.expected == 50
    assert result.actual < 50


@pytest.mark.parametrize("variant", ["pessimistic", "optimistic"])
async def test_lost_update_locks_give_exactly_50(db: Database, variant: str) -> None:
    result = lost_update.run_concurrent_increments(db.worker_sessions, variant)
    assert result.errors == []
    assert (result.expected, result.actual) == (50, 50)
    if variant == "pessimistic":
        assert result.retries == 0


# --- duplicate_rows (seed 002) ------------------------------------------------------------


async def test_duplicate_rows_unsafe_raises_and_safe_returns_latest(db: Database) -> None:
    task_id = f"dup-{uuid.uuid4().hex[:8]}"
    await duplicate_rows.create_project(db.api_sessions, task_id, "first")
    retry = await duplicate_rows.create_project(db.api_sessions, task_id, "retry")
    with pytest.raises(MultipleResultsFound):
        await duplicate_rows.unsafe_get_project(db.api_sessions, task_id)
    latest = await duplicate_rows.safe_get_project(db.api_sessions, task_id)
    assert latest is not None and latest.id == retry.id
    assert await duplicate_rows.duplicated_task_ids(db.api_sessions, task_id) == {task_id: 2}


async def test_duplicate_rows_agree_on_unique_and_missing_ids(db: Database) -> None:
    task_id = f"one-{uuid.uuid4().hex[:8]}"
    created = await duplicate_rows.create_project(db.api_sessions, task_id, "only")
    for lookup in duplicate_rows.VARIANTS.values():
        assert await lookup(db.api_sessions, task_id) == created
        assert await lookup(db.api_sessions, f"{task_id}-missing") is None


# --- idempotent_payment (seed 002) --------------------------------------------------------


async def _pay_concurrently(
    db: Database, http: httpx.AsyncClient, external_url: str, variant: str, attempts: int
) -> tuple[str, list[idempotent_payment.PaymentOutcome]]:
    key = f"{variant}-{uuid.uuid4().hex[:8]}"
    await idempotent_payment.create_order(db.api_sessions, f"order-{key}", Decimal("100.00"))
    gateway = PaymentGatewayClient(http, external_url)
    pay = idempotent_payment.VARIANTS[variant]
    outcomes = await asyncio.gather(
        *(
            pay(db.api_sessions, gateway, f"order-{key}", Decimal("100.00"), key)
            for _ in range(attempts)
        )
    )
    return key, list(outcomes)


async def test_naive_payment_charges_every_retry(
    db: Database, http: httpx.AsyncClient, external_url: str
) -> None:
    key, outcomes = await _pay_concurrently(db, http, external_url, "naive", 3)
    assert [o.status for o in outcomes] == ["completed"] * 3
    assert await idempotent_payment.charges_per_key(db.api_sessions, key) == {key: 3}


async def test_idempotent_payment_charges_once_under_concurrent_retries(
    db: Database, http: httpx.AsyncClient, external_url: str
) -> None:
    # As many retries at once as the API pool has connections (2 + 1 overflow): more would
    # wait for the pool, whose 0.15 s timeout a busy machine can exceed (a flake, not a
    # finding: the claim is about charges, not pool waits).
    key, outcomes = await _pay_concurrently(db, http, external_url, "idempotent", 3)
    owners = [o for o in outcomes if not o.replayed]
    assert len(owners) == 1 and owners[0].status == "completed"
    assert all(o.payment_id == f"PAY-{key}" for o in outcomes)
    assert await idempotent_payment.charges_per_key(db.api_sessions, key) == {key: 1}
    stats = (await http.get(f"{external_url}/stats", params={"prefix": key})).json()
    assert stats["charges"] == {key: 1}  # the gateway agrees with the database
    # A later retry replays the finished payment and charges nothing.
    gateway = PaymentGatewayClient(http, external_url)
    again = await idempotent_payment.idempotent_process_payment(
        db.api_sessions, gateway, f"order-{key}", Decimal("100.00"), key
    )
    assert again.replayed and again.status == "completed"
    assert again.transaction_id == owners[0].transaction_id


async def test_idempotent_payment_rejects_unknown_order_and_frees_the_key(
    db: Database, http: httpx.AsyncClient, external_url: str
) -> None:
    key = f"reject-{uuid.uuid4().hex[:8]}"
    gateway = PaymentGatewayClient(http, external_url)
    with pytest.raises(idempotent_payment.PaymentRejected) as rejected:
        await idempotent_payment.idempotent_process_payment(
            db.api_sessions, gateway, "no-such-order", Decimal("1.00"), key
        )
    assert rejected.value.status_code == 404
    await idempotent_payment.create_order(db.api_sessions, f"order-{key}", Decimal("1.00"))
    paid = await idempotent_payment.idempotent_process_payment(
        db.api_sessions, gateway, f"order-{key}", Decimal("1.00"), key
    )
    assert not paid.replayed and paid.status == "completed"


# --- external_call (seed 002) -------------------------------------------------------------


async def test_external_call_anti_holds_across_the_call_and_three_stage_does_not(
    db: Database, http: httpx.AsyncClient, external_url: str
) -> None:
    processor = ImageProcessorClient(http, external_url)
    holds: dict[str, dict[str, dict[str, float]]] = {}
    for variant, process in external_call.VARIANTS.items():
        before = db.snapshot("api")
        outcome = await process(db.api_sessions, processor, "https://images.example/a.jpg")
        assert outcome.status == "completed"
        assert outcome.processed_url == "https://images.example/a.jpg?processed=1"
        holds[variant] = snapshots.sites(snapshots.delta(db.snapshot("api"), before), variant)

    (anti_site,) = holds["anti"]
    assert anti_site.endswith(":anti_process_image")
    assert holds["anti"][anti_site]["checkouts"] == 1
    assert holds["anti"][anti_site]["use_time_s"] >= LATENCY_S
    three = holds["three_stage"]
    assert {s.rsplit(":", 1)[1] for s in three} == {"three_stage_process_image"}
    assert sum(s["checkouts"] for s in three.values()) == 2  # stage 1 and stage 3
    assert sum(s["use_time_s"] for s in three.values()) < LATENCY_S / 2


async def test_external_call_anti_exhausts_the_pool_under_concurrency(
    db: Database, http: httpx.AsyncClient, external_url: str
) -> None:
    processor = ImageProcessorClient(http, external_url)
    pool_max = db.settings.api_pool.max_connections
    before = db.snapshot("api")
    results = await asyncio.gather(
        *(
            external_call.anti_process_image(db.api_sessions, processor, f"https://x/{i}")
            for i in range(pool_max * 3)
        ),
        return_exceptions=True,
    )
    timeouts = [r for r in results if isinstance(r, Exception)]
    assert timeouts and all(type(t).__name__ == "TimeoutError" for t in timeouts)
    window = snapshots.delta(db.snapshot("api"), before)
    assert snapshots.total(window, snapshots.TIMEOUTS) == len(timeouts)

    before = db.snapshot("api")
    fixed = await asyncio.gather(
        *(
            external_call.three_stage_process_image(db.api_sessions, processor, f"https://y/{i}")
            for i in range(pool_max * 3)
        )
    )
    assert all(r.status == "completed" for r in fixed)
    assert snapshots.total(snapshots.delta(db.snapshot("api"), before), snapshots.TIMEOUTS) == 0


# --- pool_isolation (seed 002) ------------------------------------------------------------


async def test_pool_isolation_jobs_hold_their_own_pool(
    db: Database, http: httpx.AsyncClient, external_url: str
) -> None:
    processor = ImageProcessorClient(http, external_url)
    for variant, job in pool_isolation.JOBS.items():
        job_pool = pool_isolation.JOB_POOL[variant]
        sessions = db.async_sessions(job_pool)
        before = {name: db.snapshot(name) for name in ("api", "background", "shared")}
        await job(sessions, processor, f"video-{variant}-{uuid.uuid4().hex[:6]}")
        recent = await pool_isolation.READS[variant](
            db.async_sessions(pool_isolation.API_POOL[variant])
        )
        assert recent and recent[0].status == "completed"
        used = {
            name
            for name, snap in before.items()
            if snapshots.sites(snapshots.delta(db.snapshot(name), snap), f"{variant}_render")
        }
        assert used == {job_pool}


# --- shared_session (seed 000) ------------------------------------------------------------


def _run_worker(db: Database, variant: str) -> tuple[shared_session.SharedSessionResult, float]:
    before = db.snapshot("worker")
    result = shared_session.run_worker(db.worker_sessions, variant, runs=2, steps=8)
    window = snapshots.delta(db.snapshot("worker"), before)
    return result, snapshots.total(window, snapshots.CROSS_THREAD)


async def test_shared_session_is_used_across_threads(db: Database) -> None:
    result, cross_thread = _run_worker(db, "shared")
    assert cross_thread > 0
    assert result.heartbeats_ok > 0


async def test_session_factory_never_crosses_threads(db: Database) -> None:
    result, cross_thread = _run_worker(db, "factory")
    assert cross_thread == 0
    assert result.errors == 0
    assert result.runs_completed == result.runs == 2
    assert result.heartbeat_version_mismatches == 0
    assert result.heartbeats_recorded == result.heartbeats_ok > 0  # every beat landed once


async def test_factory_heartbeat_refuses_a_stale_version(db: Database) -> None:
    run_id = shared_session.create_run(db.worker_sessions)
    mine = shared_session.LeaseVersion(0)
    assert shared_session.factory_send_heartbeat(db.worker_sessions, run_id, mine)
    stale = shared_session.LeaseVersion(0)  # a second holder that missed the first beat
    assert not shared_session.factory_send_heartbeat(db.worker_sessions, run_id, stale)
    assert shared_session.factory_send_heartbeat(db.worker_sessions, run_id, mine)
    assert mine.value == 2


# --- session_store (seed 001) -------------------------------------------------------------


def test_unlocked_store_loses_writes() -> None:
    result = session_store.run_store_load("unlocked", threads=8, sessions=2, writes=200)
    assert result.errors == 0
    assert result.lost_writes > 0


def test_locked_store_loses_none_and_records_lock_waits() -> None:
    before = lock_metrics.lock_histogram(session_store.LOCK_NAME)
    result = session_store.run_store_load("locked", threads=8, sessions=2, writes=200)
    assert result.errors == 0
    assert (result.writes, result.stored, result.lost_writes) == (200, 200, 0)
    after = lock_metrics.lock_histogram(session_store.LOCK_NAME)
    assert after is not None
    waits = after["count"] - (before["count"] if before else 0)
    assert waits >= 200  # one acquisition per write (plus the final reads)
