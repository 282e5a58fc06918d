"""The fake external services of seed 002: an image processor and a payment gateway.

It runs as its own uvicorn app on its own port, so the demo service calls it over real HTTP
(httpx on 127.0.0.1) and the time spent "waiting for the external API" is real time with a
real socket open, exactly what an instrumented pool sees in production. Its only feature is
latency (default 2 s, `DEMO_EXTERNAL_LATENCY_S`, or `POST /admin/latency`).

The gateway also counts the charges it made, per idempotency key: a second, independent
ground truth for the payment scenario besides the database.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from demo_app.settings import DEFAULT_LATENCY_S

#: Tags a charge with the client's idempotency key, for counting only.
CLIENT_KEY_HEADER = "X-Demo-Client-Key"


@dataclass
class ExternalState:
    latency_s: float
    charges: Counter[str] = field(default_factory=Counter)
    processed: int = 0


def create_app(latency_s: float | None = None) -> Starlette:
    """The fake external API; `latency_s` defaults to `DEMO_EXTERNAL_LATENCY_S` or 2 s."""
    if latency_s is None:
        latency_s = float(os.environ.get("DEMO_EXTERNAL_LATENCY_S", DEFAULT_LATENCY_S))
    state = ExternalState(latency_s=latency_s)

    async def process(request: Request) -> JSONResponse:
        """The image processor: takes `latency_s`, returns a processed image's metadata."""
        body = await request.json()
        await asyncio.sleep(state.latency_s)
        state.processed += 1
        return JSONResponse(
            {
                "processed_url": f"{body.get('image_url', '')}?processed=1",
                "width": 1024,
                "height": 768,
                "file_size": 123_456,
                "processing_time": state.latency_s,
            }
        )

    async def payments(request: Request) -> JSONResponse:
        """The payment gateway: every call is a charge. It does *not* deduplicate (that is
        the service's job in this demo); it only counts charges per client key, which the
        service passes in `X-Demo-Client-Key` for the report."""
        body = await request.json()
        await asyncio.sleep(state.latency_s)
        key = request.headers.get(CLIENT_KEY_HEADER) or str(body.get("merchant_uid", ""))
        state.charges[key] += 1
        return JSONResponse(
            {
                "transaction_id": f"TX-{uuid.uuid4().hex[:16]}",
                "status": "success",
                "message": "charged",
            }
        )

    async def stats(request: Request) -> JSONResponse:
        prefix = request.query_params.get("prefix", "")
        charges = {k: n for k, n in state.charges.items() if k.startswith(prefix)}
        return JSONResponse(
            {
                "latency_s": state.latency_s,
                "processed": state.processed,
                "charges": charges,
                "charges_total": sum(charges.values()),
            }
        )

    async def set_latency(request: Request) -> JSONResponse:
        body = await request.json()
        value = float(body["latency_s"])
        if not 0 <= value <= 120:
            return JSONResponse({"error": "latency_s must be within [0, 120]"}, status_code=400)
        state.latency_s = value
        return JSONResponse({"latency_s": state.latency_s})

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "latency_s": state.latency_s})

    return Starlette(
        routes=[
            Route("/process", process, methods=["POST"]),
            Route("/v1/payments", payments, methods=["POST"]),
            Route("/stats", stats),
            Route("/admin/latency", set_latency, methods=["POST"]),
            Route("/healthz", healthz),
        ]
    )
