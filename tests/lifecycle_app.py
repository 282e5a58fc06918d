"""The ASGI application `tests/test_lifecycle.py` serves with real uvicorn and gunicorn.

Plain ASGI (no framework), so that what the servers do around it is all there is: every
request checks out exactly one connection and answers with the worker's pid, which lets
the test count each worker's requests. Configured by environment variables, because the
servers import it by name:

- `LIFECYCLE_DATABASE_URL`: the PostgreSQL to use; `LIFECYCLE_POOL` its `pool_size`
  and `max_overflow`, as `2,1`;
- `LIFECYCLE_INSTRUMENT`: `import` (at import, as most applications do) or `lifespan`
  (in the ASGI lifespan startup, i.e. after uvicorn has installed its signal handlers);
- `POOL_MONITOR_SNAPSHOT_DIR` / `POOL_MONITOR_SNAPSHOT_INTERVAL`: read by `instrument()`.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa

import monitor

POOL_NAME = "lifecycle"

_size, _overflow = (int(n) for n in os.environ.get("LIFECYCLE_POOL", "2,1").split(","))
engine = sa.create_engine(
    os.environ["LIFECYCLE_DATABASE_URL"],
    pool_size=_size,
    max_overflow=_overflow,
    connect_args={"application_name": "pool-monitor-lifecycle"},
)
WHEN = os.environ.get("LIFECYCLE_INSTRUMENT", "import")

if WHEN == "import":
    monitor.instrument(engine, pool_name=POOL_NAME)

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            if WHEN == "lifespan":
                monitor.instrument(engine, pool_name=POOL_NAME)
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    with engine.connect() as conn:  # one checkout per request, nothing else
        conn.execute(sa.text("SELECT 1"))
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(os.getpid()).encode()})
