"""Drive `pool_isolation`: background jobs keep arriving while API users read.

Jobs arrive a quarter faster than the shared pool can serve them (both workers'
connections divided by the render time), at the same rate in both variants; the background
pool has room for that rate. In `shared` the jobs fill the pool the API reads need and
queue in front of them; in `split` they only occupy the background pool.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from demo_app import loadgen, snapshots
from demo_app.drivers import DriveContext, load_progress, measure, pool_figures, site_figures
from demo_app.scenarios.pool_isolation import API_POOL, JOB_POOL


async def _submit_jobs(
    http: httpx.AsyncClient, variant: str, rate_per_s: float, duration_s: float
) -> tuple[int, int]:
    """POST jobs at a fixed rate for `duration_s`; returns (accepted, refused)."""
    accepted = refused = 0
    started = time.monotonic()
    n = 0
    pending: set[asyncio.Task[httpx.Response]] = set()
    while (due := started + n / rate_per_s) < started + duration_s:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        pending.add(asyncio.create_task(http.post(f"/pool_isolation/{variant}/jobs")))
        n += 1
    for outcome in await asyncio.gather(*pending, return_exceptions=True):
        if isinstance(outcome, httpx.Response) and outcome.status_code == 202:
            accepted += 1
        else:
            refused += 1
    return accepted, refused


async def _drain(ctx: DriveContext, variant: str, timeout_s: float) -> int:
    """Wait until this variant's background jobs have finished in every worker."""
    deadline = time.monotonic() + timeout_s
    in_flight = -1
    while time.monotonic() < deadline:
        await ctx.sampler.fresh()
        in_flight = ctx.sampler.jobs().get(variant, {}).get("in_flight", 0)
        if in_flight == 0:
            return 0
        await asyncio.sleep(0.2)
    return in_flight


def _mean_hold(sites: dict[str, dict[str, float]]) -> float | None:
    checkouts = sum(s["checkouts"] for s in sites.values())
    return sum(s["use_time_s"] for s in sites.values()) / checkouts if checkouts else None


async def _variant(ctx: DriveContext, variant: str, job_rate: float) -> dict[str, Any]:
    plan = ctx.plan
    task = ctx.progress(f"pool_isolation/{variant}", plan.isolation_duration_s)
    jobs_before = ctx.sampler.jobs().get(variant, {})
    api_pool, job_pool = API_POOL[variant], JOB_POOL[variant]

    def read(http: httpx.AsyncClient, i: int) -> Any:
        return http.get(f"/pool_isolation/{variant}/jobs/recent")

    async def body() -> tuple[loadgen.LoadResult, tuple[int, int], int]:
        users = plan.isolation_api_users
        async with (
            loadgen.client(ctx.base_url, users, 60.0) as api_http,
            loadgen.client(ctx.base_url, 64, 60.0, keep_alive=False) as job_http,
        ):
            api, submitted = await asyncio.gather(
                loadgen.closed_loop(
                    api_http,
                    read,
                    concurrency=users,
                    duration_s=plan.isolation_duration_s,
                    max_requests=users * int(plan.isolation_duration_s + 1) * 100,
                    think_s=plan.isolation_api_think_s,
                    ramp_s=0.5,
                    on_progress=load_progress(task, time.monotonic()),
                ),
                _submit_jobs(job_http, variant, job_rate, plan.isolation_duration_s),
            )
        left = await _drain(ctx, variant, ctx.settings.background_pool.timeout_s + 30)
        return api, submitted, left

    (api, submitted, left), measured = await measure(
        ctx, f"pool_isolation/{variant}", sorted({api_pool, job_pool}), body
    )
    jobs_after = ctx.sampler.jobs().get(variant, {})
    api_figures = pool_figures(measured.pools[api_pool])
    task.finish(f"API {api.ok} ok, {api.failed} failed")
    return {
        "api_requests_ok": api.ok,
        "api_requests_failed": api.failed,
        "api_latency_p99_s": api.latency_quantile(0.99),
        "api_wait_time_p99_s": api_figures["wait_time_p99_s"],
        "api_latency_p50_s": api.latency_quantile(0.5),
        "api_statuses": dict(api.statuses),
        "api_pool": api_pool,
        "api_pool_timeouts": api_figures["timeouts"],
        "job_pool": job_pool,
        "jobs_submitted": submitted[0],
        "jobs_ok": jobs_after.get("ok", 0) - jobs_before.get("ok", 0),
        "jobs_failed": jobs_after.get("failed", 0) - jobs_before.get("failed", 0),
        "jobs_left_running": left,
        "job_rate_per_s": job_rate,
        "job_hold_mean_s": _mean_hold(
            snapshots.sites(measured.pools[job_pool], f"{variant}_render_video")
        ),
        "monitor": {pool: pool_figures(delta) for pool, delta in measured.pools.items()},
        "sites": {pool: site_figures(delta, variant) for pool, delta in measured.pools.items()},
        "workers_fresh": measured.workers_fresh,
    }


#: Jobs arrive a bit faster than the shared pool can serve them (but slower than the
#: background pool can), as when a burst of uploads queues render work.
OVERLOAD = 1.25


async def drive(ctx: DriveContext) -> dict[str, dict[str, Any]]:
    # The same job rate for both variants.
    settings = ctx.settings
    rate = OVERLOAD * ctx.sampler.workers * settings.shared_pool.max_connections / ctx.latency_s
    return {variant: await _variant(ctx, variant, rate) for variant in ("shared", "split")}
