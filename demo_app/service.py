"""The demo service: a Starlette app factory, served by uvicorn.

    uvicorn demo_app.service:create_app --factory --workers 2

Settings come from the environment (see `demo_app.settings`); the runner sets them. The
app exposes every scenario's routes (`demo_app.routes`), `/metrics` (the monitor's
Prometheus exposition of this process's pools) and `/demo/monitor` (the same as JSON,
tagged with the worker's pid). With `DEMO_MONITOR_EVENTS` set (the runner sets it), the
monitor's long-held and misuse records are also written there as JSON lines, with their
structured fields (`demo_app.events`). Errors the scenarios are *meant* to produce map to the
status codes a real service would return: a pool timeout is a 503, a failing external
call a 502, the duplicate-row error a 500 that names `MultipleResultsFound`.

With `DemoSettings.traces_dir` set (`DemoStack` sets it), each worker runs an OpenTelemetry
SDK tracer and opens a SERVER span per request, continuing an incoming `traceparent`;
finished spans go to `<traces_dir>/spans-<pid>.jsonl` (`demo_app.traces`), and
`/demo/traces/{trace_id}` returns one trace's spans from every worker's file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from sqlalchemy.exc import MultipleResultsFound
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount

import monitor
from demo_app import events, traces
from demo_app.routes import routes
from demo_app.scenarios import session_store
from demo_app.scenarios.idempotent_payment import PaymentRejected
from demo_app.settings import DemoSettings
from demo_app.state import DemoState

log = logging.getLogger("demo_app.service")


async def _pool_timeout(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": "pool_timeout", "detail": str(exc)[:200]}, status_code=503)


async def _multiple_rows(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": "MultipleResultsFound", "detail": str(exc)}, status_code=500)


async def _external_failed(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": "external_call_failed", "detail": repr(exc)}, status_code=502)


async def _payment_rejected(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PaymentRejected)
    return JSONResponse({"error": "payment_rejected", "detail": str(exc)}, exc.status_code)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code)


def create_app(settings: DemoSettings | None = None) -> Starlette:
    """The demo service; `settings` default to `DemoSettings.from_env()`."""
    resolved = settings or DemoSettings.from_env()
    served = [*routes(), Mount("/metrics", app=monitor.metrics_app())]
    # The tracer first: the engines (created in the lifespan) may check out under a span.
    tracing = traces.setup(resolved.traces_dir) if resolved.traces_dir else None

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Create the session-store lock now, so its series are exported (at zero) from the
        # start: a burst that creates them already at their final values shows no rate.
        monitor.lock(session_store.LOCK_NAME)
        with events.capture(os.environ.get(events.ENV_VAR)):
            app.state.demo = DemoState(resolved)
            try:
                yield
            finally:
                await app.state.demo.close()
                if tracing is not None:
                    tracing.close()

    return Starlette(
        routes=served,
        middleware=[traces.middleware(served, tracing)] if tracing else [],
        lifespan=lifespan,
        exception_handlers={
            PoolTimeoutError: _pool_timeout,
            MultipleResultsFound: _multiple_rows,
            httpx.HTTPError: _external_failed,
            PaymentRejected: _payment_rejected,
            HTTPException: _http_error,
        },
    )
