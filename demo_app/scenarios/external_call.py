"""Seed 002, scenario 1: an image-processing request that calls a slow external API.

`anti` keeps its session (and so a pooled connection, idle in a transaction) for the whole
external call: with a pool of N, N concurrent requests exhaust it and the rest time out.
`three_stage` is the seed's fix: (1) write the record and commit, which returns the
connection; (2) call the external API holding nothing; (3) save the result in a new session.
Both run on the `api` pool with the same size, so the difference is only the pattern.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from demo_app.clients import ImageProcessorClient
from demo_app.models import Image


@dataclass(frozen=True)
class ImageOutcome:
    task_id: str
    status: str
    original_url: str
    processed_url: str | None


async def anti_process_image(
    sessions: async_sessionmaker[AsyncSession], processor: ImageProcessorClient, url: str
) -> ImageOutcome:
    """❌ Request → session → DB write → external call (seconds) → DB write → session returned."""
    task_id = str(uuid.uuid4())
    async with sessions() as session:
        image = Image(task_id=task_id, original_url=url, status="processing")
        session.add(image)
        await session.flush()  # checks out a connection and opens a transaction...
        # ...which stays checked out, idle in transaction, for the whole external call.
        result = await processor.process_image(url)
        image.status = "completed"
        image.processed_url = result.processed_url
        image.width, image.height = result.width, result.height
        image.file_size = result.file_size
        image.processing_time = result.processing_time
        await session.commit()
        return ImageOutcome(task_id, image.status, url, image.processed_url)


async def three_stage_process_image(
    sessions: async_sessionmaker[AsyncSession], processor: ImageProcessorClient, url: str
) -> ImageOutcome:
    """✅ Stage 1 (DB, commit) → stage 2 (external call, no session) → stage 3 (new session)."""
    task_id = str(uuid.uuid4())

    # Stage 1: create the record; commit returns the connection to the pool.
    async with sessions() as session:
        image = Image(task_id=task_id, original_url=url, status="processing")
        session.add(image)
        await session.commit()
        image_id = image.id

    # Stage 2: the slow external call holds no connection.
    try:
        result = await processor.process_image(url)
    except Exception as exc:
        async with sessions() as session:
            failed = (await session.execute(select(Image).where(Image.id == image_id))).scalar_one()
            failed.status = "failed"
            failed.error_message = str(exc)
            await session.commit()
        raise

    # Stage 3: save the result in a new, short session.
    async with sessions() as session:
        stored = (await session.execute(select(Image).where(Image.id == image_id))).scalar_one()
        stored.status = "completed"
        stored.processed_url = result.processed_url
        stored.width, stored.height = result.width, result.height
        stored.file_size = result.file_size
        stored.processing_time = result.processing_time
        await session.commit()
        return ImageOutcome(task_id, stored.status, url, stored.processed_url)


VARIANTS = {"anti": anti_process_image, "three_stage": three_stage_process_image}
