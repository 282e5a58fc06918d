"""Drive the thread-based seeds (003 `lost_update`, 000 `shared_session`, 001 `session_store`).

Each variant is one request: the service runs the seed's threads inside one worker, as the
seed's own endpoints do (`/2th` starts two threads and returns the final value), and
answers with ground truth read back from the database or the store, plus the monitor's
counters for that window.
"""

from __future__ import annotations

from typing import Any

from demo_app import loadgen
from demo_app.drivers import DriveContext, measure, pool_figures


async def _run_variant(
    ctx: DriveContext, scenario: str, variant: str, body: dict[str, Any], pools: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    task = ctx.progress(f"{scenario}/{variant}", None)

    async def call() -> dict[str, Any]:
        async with loadgen.client(ctx.base_url, 1, 120.0) as http:
            response = await http.post(f"/{scenario}/{variant}/run", json=body)
            response.raise_for_status()
            return response.json()

    result, measured = await measure(ctx, f"{scenario}/{variant}", pools, call)
    task.finish()
    return result, {pool: pool_figures(delta) for pool, delta in measured.pools.items()}


async def drive_lost_update(ctx: DriveContext) -> dict[str, dict[str, Any]]:
    plan = ctx.plan
    body = {"threads": plan.lost_update_threads, "increments": plan.lost_update_increments}
    results: dict[str, dict[str, Any]] = {}
    for variant in ("naive", "pessimistic", "optimistic"):
        r, monitor = await _run_variant(ctx, "lost_update", variant, body, ["worker"])
        results[variant] = {
            "expected": r["expected"],
            "actual": r["actual"],
            "retries": r["retries"],
            "lock_wait_max_s": r["lock_wait_max_s"],
            "lost": r["lost"],
            "duration_s": r["duration_s"],
            "errors": r["errors"],
            "monitor": monitor["worker"],
        }
    return results


async def drive_shared_session(ctx: DriveContext) -> dict[str, dict[str, Any]]:
    body = {"runs": ctx.plan.shared_session_runs}
    results: dict[str, dict[str, Any]] = {}
    for variant in ("shared", "factory"):
        r, monitor = await _run_variant(ctx, "shared_session", variant, body, ["worker"])
        results[variant] = {
            "cross_thread_uses": r["cross_thread_uses"],
            "errors": r["errors"],
            "error_types": r["error_types"],
            "concurrent_uses": r["concurrent_uses"],
            "runs": r["runs"],
            "runs_completed": r["runs_completed"],
            "heartbeats_ok": r["heartbeats_ok"],
            "heartbeats_recorded": r["heartbeats_recorded"],
            "heartbeat_version_mismatches": r["heartbeat_version_mismatches"],
            "cross_thread_sites": {k: v for k, v in r["cross_thread_sites"].items() if v},
            "monitor": monitor["worker"],
        }
    return results


async def drive_session_store(ctx: DriveContext) -> dict[str, dict[str, Any]]:
    plan = ctx.plan
    body = {
        "threads": plan.store_threads,
        "sessions": plan.store_sessions,
        "writes": plan.store_writes,
    }
    results: dict[str, dict[str, Any]] = {}
    for variant in ("unlocked", "locked"):
        r, _ = await _run_variant(ctx, "session_store", variant, body, [])
        results[variant] = {
            "writes": r["writes"],
            "lost_writes": r["lost_writes"],
            "lock_wait_p99_s": r["lock_wait_p99_s"],
            "lock_waits": r["lock_waits"],
            "lock_wait_mean_s": r["lock_wait_mean_s"],
            "lock_name": r["lock_name"],
            "lock_wait_histogram": r["lock_wait_histogram"],
            "lock_hold_histogram": r["lock_hold_histogram"],
            "stored": r["stored"],
            "threads": r["threads"],
            "sessions": r["sessions"],
            "duration_s": r["duration_s"],
        }
    return results
