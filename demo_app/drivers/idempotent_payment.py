"""Drive `idempotent_payment`: every key is paid `payment_retries` times *concurrently*.

That is what a client's retry after a timeout looks like while the first attempt is still
running. A client that gets 409 (another attempt with its key is in flight) or 503 (no
connection in time) asks again a moment later, bounded, until it gets a final answer.
Charges are counted by the database (payments carrying a gateway transaction) and,
independently, by the gateway.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from demo_app import loadgen
from demo_app.clients import ensure_loopback
from demo_app.drivers import DriveContext, ProgressTask, measure, pool_figures

AMOUNT = "15000.00"
POLL_S = 0.2
MAX_ATTEMPTS = 100


#: 409: another attempt with this key is in flight; 503: the pool timed out before anything
#: was written. A well-behaved client asks again a moment later in both cases.
RETRY_STATUSES = frozenset({409, 503})


@dataclass
class _Counts:
    requests: int = 0
    conflicts: int = 0
    unavailable: int = 0
    keys_done: int = 0


async def _pay_until_done(http: httpx.AsyncClient, variant: str, key: str, counts: _Counts) -> int:
    """One client attempt (plus its 409 follow-ups); returns the final status code."""
    status = 0
    for _ in range(MAX_ATTEMPTS):
        response = await http.post(
            f"/idempotent_payment/{variant}/payments",
            headers={"Idempotency-Key": key},
            json={"order_number": f"order-{key}", "amount": AMOUNT, "card_token": "tok_demo"},
        )
        counts.requests += 1
        status = response.status_code
        if status not in RETRY_STATUSES:
            return status
        if status == 409:
            counts.conflicts += 1
        else:
            counts.unavailable += 1
        await asyncio.sleep(POLL_S)
    return status


async def _retried_key(
    http: httpx.AsyncClient,
    variant: str,
    key: str,
    retries: int,
    counts: _Counts,
    task: ProgressTask,
) -> list[int]:
    """The first attempt and its retries, all in flight at once."""
    statuses = await asyncio.gather(
        *(_pay_until_done(http, variant, key, counts) for _ in range(retries))
    )
    counts.keys_done += 1
    task.update(counts.keys_done, f"{counts.requests} requests")
    return list(statuses)


async def _variant(ctx: DriveContext, variant: str) -> dict[str, Any]:
    plan = ctx.plan
    task = ctx.progress(f"idempotent_payment/{variant}", float(plan.payment_keys))
    prefix = f"{variant}-{uuid.uuid4().hex[:8]}-"
    keys = [f"{prefix}{k}" for k in range(plan.payment_keys)]
    counts = _Counts()

    async def body() -> list[list[int]]:
        users = plan.payment_keys * plan.payment_retries
        async with loadgen.client(ctx.base_url, users, 60.0) as http:
            for key in keys:
                order = {"order_number": f"order-{key}", "amount": AMOUNT}
                (await http.post("/idempotent_payment/orders", json=order)).raise_for_status()
            calls = (
                _retried_key(http, variant, key, plan.payment_retries, counts, task) for key in keys
            )
            return await asyncio.wait_for(
                asyncio.gather(*calls), timeout=ctx.latency_s * 10 + MAX_ATTEMPTS * POLL_S
            )

    outcomes, measured = await measure(ctx, f"idempotent_payment/{variant}", ["api"], body)
    async with loadgen.client(ctx.base_url, 2, 30.0) as http:
        response = await http.get("/idempotent_payment/charges", params={"prefix": prefix})
        db_charges: dict[str, int] = response.json()
    async with httpx.AsyncClient(base_url=ensure_loopback(ctx.external_url)) as ext:
        gateway = (await ext.get("/stats", params={"prefix": prefix})).json()
    finals = [s for per_key in outcomes for s in per_key]
    charges = sum(db_charges.values())
    task.finish(f"{charges} charges for {len(keys)} keys")
    return {
        "requests": counts.requests,
        "keys": len(keys),
        "charges": charges,
        "attempts": len(finals),
        "attempts_ok": sum(1 for s in finals if 200 <= s < 300),
        "conflicts_409": counts.conflicts,
        "unavailable_503": counts.unavailable,
        "keys_charged_more_than_once": sum(1 for n in db_charges.values() if n > 1),
        "max_charges_per_key": max(db_charges.values(), default=0),
        "gateway_charges": gateway["charges_total"],
        "monitor": pool_figures(measured.pools["api"]),
    }


async def drive(ctx: DriveContext) -> dict[str, dict[str, Any]]:
    return {variant: await _variant(ctx, variant) for variant in ("naive", "idempotent")}
