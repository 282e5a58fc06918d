"""Drive `duplicate_rows`: create projects (retrying some), then look them up by task id.

Every `duplicate_every`-th create is sent twice, as a client does when its first attempt
seemed to time out; the database then says which task ids really are duplicated, and so
exactly how many lookups `unsafe` must fail.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx

from demo_app import loadgen
from demo_app.drivers import DriveContext, load_progress, measure, pool_figures


async def _create_projects(ctx: DriveContext, prefix: str) -> dict[str, int]:
    plan = ctx.plan
    async with loadgen.client(ctx.base_url, 8, 30.0) as http:
        for i in range(plan.duplicate_tasks):
            body = {"task_id": f"{prefix}{i}", "name": f"project {i}"}
            attempts = 2 if i % plan.duplicate_every == 0 else 1
            for _ in range(attempts):
                (await http.post("/duplicate_rows/projects", json=body)).raise_for_status()
        response = await http.get("/duplicate_rows/duplicates", params={"prefix": prefix})
        response.raise_for_status()
        return response.json()


async def _variant(
    ctx: DriveContext, variant: str, prefix: str, duplicated: dict[str, int]
) -> dict[str, Any]:
    plan = ctx.plan
    task = ctx.progress(f"duplicate_rows/{variant}", None)

    def task_id(i: int) -> str:
        return f"{prefix}{i % plan.duplicate_tasks}"

    def lookup(http: httpx.AsyncClient, i: int) -> Any:
        return http.get(f"/duplicate_rows/{variant}/projects/{task_id(i)}")

    async def body() -> loadgen.LoadResult:
        async with loadgen.client(ctx.base_url, plan.duplicate_users, 30.0) as http:
            return await loadgen.closed_loop(
                http,
                lookup,
                concurrency=plan.duplicate_users,
                duration_s=60.0,
                max_requests=plan.duplicate_requests,
                on_progress=load_progress(task, time.monotonic()),
            )

    load, measured = await measure(ctx, f"duplicate_rows/{variant}", ["api"], body)
    task.finish(f"{load.requests} lookups, {load.failed} errors")
    return {
        "requests": load.requests,
        "errors": load.failed,
        "statuses": dict(load.statuses),
        "users": plan.duplicate_users,
        "duration_s": load.duration_s,
        "tasks": plan.duplicate_tasks,
        "duplicated_tasks": len(duplicated),
        "lookups_of_duplicated_tasks": sum(
            1 for i in range(load.requests) if task_id(i) in duplicated
        ),
        "monitor": pool_figures(measured.pools["api"]),
    }


async def drive(ctx: DriveContext) -> dict[str, dict[str, Any]]:
    prefix = f"task-{uuid.uuid4().hex[:8]}-"
    duplicated = await _create_projects(ctx, prefix)
    return {v: await _variant(ctx, v, prefix, duplicated) for v in ("unsafe", "safe")}
