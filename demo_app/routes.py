"""HTTP routes of the demo service: thin wrappers around `demo_app.scenarios`.

Paths are `/<scenario>/<variant>/...` with the exact names used in the report, the code
sites and the dashboards. Seed 002's handlers are async; the seeds that use threads (000,
001, 003) run their threads off the event loop (`run_in_threadpool`), as FastAPI does for
the seed's `def` endpoints. Every parameter a client may pass is range-checked, so no
request can start an unbounded loop.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import asdict
from decimal import Decimal, InvalidOperation
from typing import Any

from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from demo_app import lock_metrics, snapshots, traces
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
from demo_app.state import DemoState


def _state(request: Request) -> DemoState:
    return request.app.state.demo


def _variant(request: Request, scenario: str) -> str:
    variant = request.path_params["variant"]
    if variant not in SCENARIOS[scenario].variants:
        known = ", ".join(SCENARIOS[scenario].variants)
        raise HTTPException(404, f"unknown {scenario} variant {variant!r} (known: {known})")
    return variant


async def _json(request: Request) -> dict[str, Any]:
    body = await request.body()
    if not body:
        return {}
    try:
        data = await request.json()
    except ValueError as exc:
        raise HTTPException(400, "body must be JSON") from exc
    if not isinstance(data, dict):
        raise HTTPException(400, "body must be a JSON object")
    return data


def _number(data: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    try:
        value = float(data.get(key, default))
    except (TypeError, ValueError) as exc:
        raise HTTPException(400, f"{key} must be a number") from exc
    if not low <= value <= high:
        raise HTTPException(400, f"{key} must be within [{low}, {high}]")
    return value


def _int(data: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    return int(_number(data, key, default, low, high))


# --- service-wide -------------------------------------------------------------------------


async def index(request: Request) -> JSONResponse:
    """What this service is, and where to look next."""
    return JSONResponse(
        {
            "service": "pool-monitor demo",
            "pid": os.getpid(),
            "scenarios": {
                name: {"seed": s.seed, "variants": list(s.variants), "summary": s.summary}
                for name, s in SCENARIOS.items()
            },
            "see": [
                "/metrics",
                "/demo/monitor",
                "/demo/traces/{trace_id}",
                "/healthz",
                "demo_app/README.md",
            ],
        }
    )


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "pid": os.getpid()})


async def demo_monitor(request: Request) -> JSONResponse:
    """This worker process's pool snapshots, so the runner can merge every worker's view."""
    state = _state(request)
    return JSONResponse(
        {
            "pid": os.getpid(),
            "time": time.time(),
            "pools": state.db.snapshots(),
            "jobs": state.jobs.as_dict(),
        }
    )


async def demo_trace(request: Request) -> JSONResponse:
    """One trace's spans from every worker's span file, oldest first (404 if none): what a
    trace id in the report, the logs or the sidecar's page leads to while the demo serves."""
    trace_id = request.path_params["trace_id"].lower()
    if len(trace_id) != 32 or not all(c in "0123456789abcdef" for c in trace_id):
        raise HTTPException(400, "a trace id is 32 hex digits")
    directory = _state(request).settings.traces_dir
    if not directory:
        raise HTTPException(404, "this service is not traced (no traces_dir)")
    spans = await run_in_threadpool(traces.read, directory, trace_id)
    if not spans:
        raise HTTPException(404, f"no span of trace {trace_id} in {directory}")
    return JSONResponse({"trace_id": trace_id, "spans": spans})


# --- external_call (seed 002) -------------------------------------------------------------


async def external_call_image(request: Request) -> JSONResponse:
    variant = _variant(request, "external_call")
    state = _state(request)
    data = await _json(request)
    url = str(data.get("url") or f"https://images.example/{uuid.uuid4().hex}.jpg")
    outcome = await external_call.VARIANTS[variant](state.db.api_sessions, state.processor, url)
    return JSONResponse(asdict(outcome))


# --- pool_isolation (seed 002) ------------------------------------------------------------


async def pool_isolation_job(request: Request) -> JSONResponse:
    """Queue a background render job; it runs after the 202 is sent (Starlette background)."""
    variant = _variant(request, "pool_isolation")
    state = _state(request)
    task_id = f"video-{uuid.uuid4().hex[:12]}"
    sessions = state.db.async_sessions(pool_isolation.JOB_POOL[variant])
    job = pool_isolation.JOBS[variant]
    state.jobs.submitted(variant)
    task = BackgroundTask(state.jobs.run, variant, job, sessions, state.processor, task_id)
    return JSONResponse({"task_id": task_id, "status": "queued"}, status_code=202, background=task)


async def pool_isolation_recent(request: Request) -> JSONResponse:
    """The quick API read whose latency the variants protect (or not)."""
    variant = _variant(request, "pool_isolation")
    sessions = _state(request).db.async_sessions(pool_isolation.API_POOL[variant])
    jobs = await pool_isolation.READS[variant](sessions)
    return JSONResponse({"jobs": [asdict(j) for j in jobs]})


# --- duplicate_rows (seed 002) ------------------------------------------------------------


async def duplicate_rows_create(request: Request) -> JSONResponse:
    data = await _json(request)
    task_id = str(data.get("task_id") or "")
    if not task_id or len(task_id) > 50:
        raise HTTPException(400, "task_id (1–50 characters) is required")
    sessions = _state(request).db.api_sessions
    project = await duplicate_rows.create_project(sessions, task_id, str(data.get("name", "")))
    return JSONResponse(asdict(project), status_code=201)


async def duplicate_rows_get(request: Request) -> JSONResponse:
    variant = _variant(request, "duplicate_rows")
    sessions = _state(request).db.api_sessions
    project = await duplicate_rows.VARIANTS[variant](sessions, request.path_params["task_id"])
    if project is None:
        raise HTTPException(404, "project not found")
    return JSONResponse(asdict(project))


async def duplicate_rows_duplicates(request: Request) -> JSONResponse:
    sessions = _state(request).db.api_sessions
    prefix = request.query_params.get("prefix", "")
    return JSONResponse(await duplicate_rows.duplicated_task_ids(sessions, prefix))


# --- idempotent_payment (seed 002) --------------------------------------------------------


def _amount(data: dict[str, Any]) -> Decimal:
    try:
        amount = Decimal(str(data.get("amount", "")))
    except InvalidOperation as exc:
        raise HTTPException(400, "amount must be a decimal number") from exc
    if not Decimal(0) < amount < Decimal(10) ** 8:
        raise HTTPException(400, "amount must be positive and below 10^8")
    return amount


async def payment_order(request: Request) -> JSONResponse:
    data = await _json(request)
    order_number = str(data.get("order_number") or "")
    if not order_number or len(order_number) > 50:
        raise HTTPException(400, "order_number (1–50 characters) is required")
    sessions = _state(request).db.api_sessions
    order_id = await idempotent_payment.create_order(sessions, order_number, _amount(data))
    return JSONResponse({"id": order_id, "order_number": order_number}, status_code=201)


async def payment_process(request: Request) -> JSONResponse:
    """200 when charged or replayed; 409 while another request with this key is in flight."""
    variant = _variant(request, "idempotent_payment")
    key = request.headers.get("Idempotency-Key", "")
    if not key or len(key) > 60:
        raise HTTPException(400, "the Idempotency-Key header (1–60 characters) is required")
    data = await _json(request)
    state = _state(request)
    outcome = await idempotent_payment.VARIANTS[variant](
        state.db.api_sessions,
        state.gateway,
        str(data.get("order_number", "")),
        _amount(data),
        key,
        str(data.get("card_token", "tok_demo")),
    )
    in_flight = outcome.replayed and outcome.status == "processing"
    return JSONResponse(asdict(outcome), status_code=409 if in_flight else 200)


async def payment_charges(request: Request) -> JSONResponse:
    sessions = _state(request).db.api_sessions
    prefix = request.query_params.get("prefix", "")
    return JSONResponse(await idempotent_payment.charges_per_key(sessions, prefix))


# --- lost_update (seed 003): threads, run off the event loop ------------------------------


async def lost_update_run(request: Request) -> JSONResponse:
    """The seed's `/2th`, `/2th-plock`, `/2th-olock`: threads increment one row, then read it."""
    variant = _variant(request, "lost_update")
    data = await _json(request)
    result = await run_in_threadpool(
        lost_update.run_concurrent_increments,
        _state(request).db.worker_sessions,
        variant,
        threads=_int(data, "threads", 2, 2, 16),
        increments=_int(data, "increments", 25, 1, 1000),
        think_s=_number(data, "think_s", 0.001, 0.0, 0.1),
    )
    return JSONResponse({**asdict(result), "lost": result.lost})


# --- shared_session (seed 000): threads ---------------------------------------------------


async def shared_session_run(request: Request) -> JSONResponse:
    """Process runs with a heartbeat thread; report the monitor's misuse counters for them."""
    variant = _variant(request, "shared_session")
    state = _state(request)
    data = await _json(request)
    before = state.db.snapshot("worker")
    result = await run_in_threadpool(
        shared_session.run_worker,
        state.db.worker_sessions,
        variant,
        runs=_int(data, "runs", 3, 1, 50),
        steps=_int(data, "steps", 10, 1, 200),
        step_s=_number(data, "step_s", 0.05, 0.0, 1.0),
        heartbeat_s=_number(data, "heartbeat_s", 0.01, 0.001, 1.0),
    )
    after = state.db.snapshot("worker")
    window = snapshots.delta(after, before)
    return JSONResponse(
        {
            **asdict(result),
            # A connection one thread checked out and another used: safe alone (a
            # handoff), misuse once the threads take turns (cross-thread) or overlap.
            "handoffs": after["internal"]["handoffs"] - before["internal"]["handoffs"],
            "cross_thread_uses": snapshots.total(window, snapshots.CROSS_THREAD),
            "concurrent_uses": snapshots.total(window, snapshots.CONCURRENT),
            "cross_thread_sites": {
                site: n
                for site, n in window["counters"].get(snapshots.CROSS_THREAD, {}).items()
                if n
            },
        }
    )


# --- session_store (seed 001): threads ----------------------------------------------------


async def session_store_run(request: Request) -> JSONResponse:
    """Hammer an in-memory store from a thread pool; count lost writes and lock waits."""
    variant = _variant(request, "session_store")
    data = await _json(request)
    before = lock_metrics.lock_histogram(session_store.LOCK_NAME)
    held_before = lock_metrics.lock_histogram(session_store.LOCK_NAME, lock_metrics.HOLD)
    result = await run_in_threadpool(
        session_store.run_store_load,
        variant,
        threads=_int(data, "threads", 8, 1, 64),
        sessions=_int(data, "sessions", 4, 1, 1000),
        writes=_int(data, "writes", 400, 1, 100_000),
        work_s=_number(data, "work_s", 0.001, 0.0, 0.1),
    )
    after = lock_metrics.lock_histogram(session_store.LOCK_NAME)
    held_after = lock_metrics.lock_histogram(session_store.LOCK_NAME, lock_metrics.HOLD)
    waits = snapshots.histogram_delta(after, before)
    holds = snapshots.histogram_delta(held_after, held_before)
    return JSONResponse(
        {
            **asdict(result),
            "lost_writes": result.lost_writes,
            "lock_waits": waits["count"] if waits else 0,
            "lock_wait_p99_s": snapshots.quantile(waits, 0.99),
            "lock_wait_mean_s": snapshots.mean(waits),
            # The monitor's app.lock.wait_time / hold_time histograms over this run.
            "lock_name": session_store.LOCK_NAME,
            "lock_wait_histogram": waits,
            "lock_hold_histogram": holds,
        }
    )


def routes() -> list[BaseRoute]:
    return [
        Route("/", index),
        Route("/healthz", healthz),
        Route("/demo/monitor", demo_monitor),
        Route("/demo/traces/{trace_id}", demo_trace),
        Route("/external_call/{variant}/images", external_call_image, methods=["POST"]),
        Route("/pool_isolation/{variant}/jobs", pool_isolation_job, methods=["POST"]),
        Route("/pool_isolation/{variant}/jobs/recent", pool_isolation_recent),
        Route("/duplicate_rows/projects", duplicate_rows_create, methods=["POST"]),
        Route("/duplicate_rows/duplicates", duplicate_rows_duplicates),
        Route("/duplicate_rows/{variant}/projects/{task_id}", duplicate_rows_get),
        Route("/idempotent_payment/orders", payment_order, methods=["POST"]),
        Route("/idempotent_payment/charges", payment_charges),
        Route("/idempotent_payment/{variant}/payments", payment_process, methods=["POST"]),
        Route("/lost_update/{variant}/run", lost_update_run, methods=["POST"]),
        Route("/shared_session/{variant}/run", shared_session_run, methods=["POST"]),
        Route("/session_store/{variant}/run", session_store_run, methods=["POST"]),
    ]
