"""Drive `external_call`: the same users against `anti` and `three_stage`, one after another."""

from __future__ import annotations

import time
from typing import Any

import httpx

from demo_app import loadgen
from demo_app.drivers import DriveContext, load_progress, measure, pool_figures, site_figures


async def _variant(ctx: DriveContext, variant: str) -> dict[str, Any]:
    plan = ctx.plan
    task = ctx.progress(f"external_call/{variant}", plan.external_duration_s)

    def request(http: httpx.AsyncClient, i: int) -> Any:
        url = f"https://images.example/{i}.jpg"
        return http.post(f"/external_call/{variant}/images", json={"url": url})

    async def body() -> loadgen.LoadResult:
        async with loadgen.client(ctx.base_url, plan.external_users, 60.0) as http:
            return await loadgen.closed_loop(
                http,
                request,
                concurrency=plan.external_users,
                duration_s=plan.external_duration_s,
                max_requests=plan.external_users * int(plan.external_duration_s + 1) * 20,
                ramp_s=ctx.latency_s,
                on_progress=load_progress(task, time.monotonic()),
            )

    load, measured = await measure(ctx, f"external_call/{variant}", ["api"], body)
    api = pool_figures(measured.pools["api"])
    task.finish(f"{load.ok} ok, {load.failed} failed")
    return {
        "requests_ok": load.ok,
        "requests_failed": load.failed,
        "pool_timeouts": api["timeouts"],
        "use_time_mean_s": api["use_time_mean_s"],
        "use_time_p99_s": api["use_time_p99_s"],
        "idle_in_use_share": api["idle_in_use_share"],
        "throughput_rps": load.throughput_rps,
        "latency_p50_s": load.latency_quantile(0.5, ok_only=True),
        "latency_p99_s": load.latency_quantile(0.99, ok_only=True),
        "statuses": dict(load.statuses),
        "users": plan.external_users,
        "duration_s": load.duration_s,
        "external_latency_s": ctx.latency_s,
        # What the API pool can serve at most when each request holds a connection for the
        # whole external call: connections (all workers) × duration / latency.
        "pool_connections": ctx.sampler.workers * ctx.settings.api_pool.max_connections,
        "pool": "api",
        "monitor": api,
        "sites": site_figures(measured.pools["api"], variant),
        "workers_fresh": measured.workers_fresh,
    }


async def drive(ctx: DriveContext) -> dict[str, dict[str, Any]]:
    return {variant: await _variant(ctx, variant) for variant in ("anti", "three_stage")}
