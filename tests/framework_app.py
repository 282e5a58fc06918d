"""Real framework applications that `tests/test_frameworks.py` serves with uvicorn/gunicorn.

`FRAMEWORK_APP` picks one, each in its framework's standard shape, so the monitor meets
their real request cycle (threadpools, dependencies, sessions):

- `fastapi_sync`: a sync dependency (`with Session(engine) as s: yield s`) that runs a
  statement, and a sync endpoint: FastAPI runs them on different threadpool threads, one
  after the other (a handoff, which is not misuse);
- `fastapi_async`: an `AsyncSession` dependency and an async endpoint;
- `starlette`: a plain Starlette sync endpoint (run in Starlette's threadpool);
- `threadpool`: an async endpoint handing the database work to a `ThreadPoolExecutor`.

`GET /` checks out exactly one connection and answers with the worker's pid. `GET /misuse`
plants seed 000's bug once: a session used by the request's thread, then by a helper
thread, then by the request's thread again (two threads taking turns). Database settings
come from `LIFECYCLE_DATABASE_URL` / `LIFECYCLE_POOL` (see `tests/lifecycle_app.py`).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import sqlalchemy as sa
from sqlalchemy.orm import Session

import monitor

POOL_NAME = "framework"
KIND = os.environ.get("FRAMEWORK_APP", "fastapi_sync")
URL = os.environ["LIFECYCLE_DATABASE_URL"]
_size, _overflow = (int(n) for n in os.environ.get("LIFECYCLE_POOL", "2,1").split(","))

engine = sa.create_engine(URL, pool_size=_size, max_overflow=_overflow)


def _pid() -> str:
    return str(os.getpid())


def plant_misuse() -> None:
    """Seed 000: one session, two threads taking turns on it."""
    with Session(engine) as session:
        session.execute(sa.text("select 1"))  # the request's thread checks out
        helper = threading.Thread(target=lambda: session.execute(sa.text("select 2")))
        helper.start()
        helper.join()
        session.execute(sa.text("select 3"))  # and comes back: interleaved use


if KIND == "fastapi_async":
    from fastapi import Depends, FastAPI
    from fastapi.responses import PlainTextResponse
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    async_engine = create_async_engine(
        URL.replace("postgresql+psycopg://", "postgresql+psycopg_async://"),
        pool_size=_size,
        max_overflow=_overflow,
    )
    monitor.instrument(async_engine, pool_name=POOL_NAME)
    monitor.instrument(engine, pool_name="misuse")
    app = FastAPI()

    async def get_session() -> AsyncIterator[AsyncSession]:
        async with AsyncSession(async_engine) as session:
            yield session

    @app.get("/", response_class=PlainTextResponse)
    async def root(session: AsyncSession = Depends(get_session)) -> str:  # noqa: B008
        await session.execute(sa.text("select 1"))
        return _pid()

    @app.get("/misuse", response_class=PlainTextResponse)
    def misuse() -> str:
        plant_misuse()
        return _pid()

elif KIND == "fastapi_sync":
    from fastapi import Depends, FastAPI
    from fastapi.responses import PlainTextResponse

    monitor.instrument(engine, pool_name=POOL_NAME)
    app = FastAPI()

    def get_db() -> Iterator[Session]:
        with Session(engine) as session:
            # Typical per-request setup: a statement on the dependency's thread.
            session.execute(sa.text("set local statement_timeout = '5s'"))
            yield session

    @app.get("/", response_class=PlainTextResponse)
    def root(db: Session = Depends(get_db)) -> str:  # noqa: B008
        db.execute(sa.text("select 1"))  # the endpoint's thread: a handoff
        return _pid()

    @app.get("/misuse", response_class=PlainTextResponse)
    def misuse() -> str:
        plant_misuse()
        return _pid()

elif KIND == "starlette":
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    monitor.instrument(engine, pool_name=POOL_NAME)

    def homepage(request: Request) -> PlainTextResponse:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        return PlainTextResponse(_pid())

    def misuse_route(request: Request) -> PlainTextResponse:
        plant_misuse()
        return PlainTextResponse(_pid())

    app = Starlette(routes=[Route("/", homepage), Route("/misuse", misuse_route)])

elif KIND == "threadpool":
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    monitor.instrument(engine, pool_name=POOL_NAME)
    workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="background")

    def background_job() -> None:
        with Session(engine) as session, session.begin():
            session.execute(sa.text("select 1"))

    async def enqueue(request: Request) -> PlainTextResponse:
        await asyncio.wrap_future(workers.submit(background_job))
        return PlainTextResponse(_pid())

    async def misuse_route(request: Request) -> PlainTextResponse:
        await asyncio.wrap_future(workers.submit(plant_misuse))
        return PlainTextResponse(_pid())

    app = Starlette(routes=[Route("/", enqueue), Route("/misuse", misuse_route)])

else:  # pragma: no cover
    raise SystemExit(f"FRAMEWORK_APP={KIND!r}: unknown")
