"""Seed 002, §1.1: "Multiple rows were found when one or none was required".

`task_id` is indexed but not unique, and clients retry their create request when the
service is slow, so some task ids exist twice. `unsafe` looks one up with
`scalar_one_or_none()` and raises `MultipleResultsFound` on those; `safe` asks for the
latest one (`order_by(created_at.desc()).limit(1)`), which can never be more than one.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from demo_app.models import Project


@dataclass(frozen=True)
class ProjectView:
    id: int
    task_id: str
    name: str


async def create_project(
    sessions: async_sessionmaker[AsyncSession], task_id: str, name: str
) -> ProjectView:
    """Insert a project. Not idempotent: a retried request inserts a second row."""
    async with sessions() as session:
        project = Project(task_id=task_id, name=name)
        session.add(project)
        await session.commit()
        return ProjectView(project.id, project.task_id, project.name)


async def unsafe_get_project(
    sessions: async_sessionmaker[AsyncSession], task_id: str
) -> ProjectView | None:
    """❌ The seed's original lookup: raises `MultipleResultsFound` on a duplicated task id."""
    async with sessions() as session:
        result = await session.execute(select(Project).where(Project.task_id == task_id))
        project = result.scalar_one_or_none()
        return ProjectView(project.id, project.task_id, project.name) if project else None


async def safe_get_project(
    sessions: async_sessionmaker[AsyncSession], task_id: str
) -> ProjectView | None:
    """✅ The seed's fix: the latest row only."""
    async with sessions() as session:
        result = await session.execute(
            select(Project)
            .where(Project.task_id == task_id)
            .order_by(Project.created_at.desc())
            .limit(1)
        )
        project = result.scalar_one_or_none()
        return ProjectView(project.id, project.task_id, project.name) if project else None


async def duplicated_task_ids(
    sessions: async_sessionmaker[AsyncSession], prefix: str
) -> dict[str, int]:
    """Ground truth from the database: task ids under `prefix` with more than one row."""
    async with sessions() as session:
        rows = await session.execute(
            select(Project.task_id, func.count())
            .where(Project.task_id.startswith(prefix))
            .group_by(Project.task_id)
            .having(func.count() > 1)
        )
        return {task_id: n for task_id, n in rows}


VARIANTS = {"unsafe": unsafe_get_project, "safe": safe_get_project}
