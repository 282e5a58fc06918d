"""Per-process state of the demo service: engines, external clients, background jobs."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from opentelemetry import trace

from demo_app.clients import KEEPALIVE_EXPIRY_S, ImageProcessorClient, PaymentGatewayClient
from demo_app.db import Database
from demo_app.settings import DemoSettings

log = logging.getLogger("demo_app.jobs")
#: The global provider's tracer (a no-op until `demo_app.traces.setup()` sets one).
tracer = trace.get_tracer("demo_app")


@dataclass
class JobTracker:
    """Counts background jobs per variant, so the runner knows when they have drained."""

    in_flight: Counter[str] = field(default_factory=Counter)
    ok: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    failure_types: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def submitted(self, variant: str) -> None:
        """Counted when the job is queued, so "in flight" covers the gap before it starts."""
        with self._lock:
            self.in_flight[variant] += 1

    async def run(self, variant: str, job: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run a job in a span of its own (`job pool_isolation/<variant>`), a child of the
        request that queued it: the job outlives the request's span, and its checkouts
        (and their `pool.wait` spans) belong to it."""
        try:
            with tracer.start_as_current_span(f"job pool_isolation/{variant}"):
                await job(*args)
        except Exception as exc:  # a failed job is a figure of the demo, not a crash
            with self._lock:
                self.failed[variant] += 1
                self.failure_types[type(exc).__name__] += 1
            log.info("background job %s failed: %s", variant, type(exc).__name__)
        else:
            with self._lock:
                self.ok[variant] += 1
        finally:
            with self._lock:
                self.in_flight[variant] -= 1

    def as_dict(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {
                "in_flight": dict(self.in_flight),
                "ok": dict(self.ok),
                "failed": dict(self.failed),
                "failure_types": dict(self.failure_types),
            }


class DemoState:
    """What the routes need, created in the app's lifespan and closed at shutdown."""

    def __init__(self, settings: DemoSettings) -> None:
        self.settings = settings
        self.db = Database(settings)
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.external_latency_s * 5 + 10.0, connect=5.0),
            limits=httpx.Limits(
                max_connections=1000,
                max_keepalive_connections=200,
                keepalive_expiry=KEEPALIVE_EXPIRY_S,
            ),
        )
        self.processor = ImageProcessorClient(self.http, settings.external_url)
        self.gateway = PaymentGatewayClient(self.http, settings.external_url)
        self.jobs = JobTracker()

    async def close(self) -> None:
        await self.http.aclose()
        await self.db.dispose()
