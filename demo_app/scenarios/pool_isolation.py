"""Seed 002: background jobs and API requests on one pool vs on separate pools.

The background job is the seed's `video_task.py`/`generate_video`: it holds its session
for the whole (slow) external render. That is the workload's nature here; what the variants
change is *where* it holds it:

* `shared` – jobs and API requests use the single `shared` pool (sized like `api`): the
  jobs fill it and quick API reads queue behind them until `pool_timeout`.
* `split`  – jobs use the `background` pool (patient timeout), API reads the `api` pool,
  which the jobs can no longer touch.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from demo_app.clients import ImageProcessorClient
from demo_app.models import Video


@dataclass(frozen=True)
class JobStatus:
    task_id: str
    status: str


async def shared_render_video(
    sessions: async_sessionmaker[AsyncSession], processor: ImageProcessorClient, task_id: str
) -> None:
    """Background job on the *shared* pool, holding its connection across the render."""
    async with sessions() as session:
        video = Video(task_id=task_id, status="rendering")
        session.add(video)
        await session.flush()
        result = await processor.process_image(f"render://{task_id}")
        video.status = "completed"
        video.video_url = result.processed_url
        await session.commit()


async def split_render_video(
    sessions: async_sessionmaker[AsyncSession], processor: ImageProcessorClient, task_id: str
) -> None:
    """The same job on the *background* pool: it still holds long, but only its own pool."""
    async with sessions() as session:
        video = Video(task_id=task_id, status="rendering")
        session.add(video)
        await session.flush()
        result = await processor.process_image(f"render://{task_id}")
        video.status = "completed"
        video.video_url = result.processed_url
        await session.commit()


async def shared_recent_jobs(
    sessions: async_sessionmaker[AsyncSession], limit: int = 10
) -> list[JobStatus]:
    """A quick API read on the shared pool: competes with the jobs for connections."""
    async with sessions() as session:
        rows = await session.execute(
            select(Video.task_id, Video.status).order_by(Video.created_at.desc()).limit(limit)
        )
        return [JobStatus(task_id, status) for task_id, status in rows]


async def split_recent_jobs(
    sessions: async_sessionmaker[AsyncSession], limit: int = 10
) -> list[JobStatus]:
    """The same API read on the api pool, which background jobs never use."""
    async with sessions() as session:
        rows = await session.execute(
            select(Video.task_id, Video.status).order_by(Video.created_at.desc()).limit(limit)
        )
        return [JobStatus(task_id, status) for task_id, status in rows]


JOBS = {"shared": shared_render_video, "split": split_render_video}
READS = {"shared": shared_recent_jobs, "split": split_recent_jobs}
#: Which pool each variant's jobs and API reads use (names of `demo_app.db.Database`).
JOB_POOL = {"shared": "shared", "split": "background"}
API_POOL = {"shared": "shared", "split": "api"}
