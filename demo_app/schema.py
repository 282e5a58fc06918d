"""Create (or recreate) the demo's tables.

Only tables of `demo_app.models` are touched, all prefixed `demo_`. DDL runs with a
`lock_timeout`, so a forgotten idle-in-transaction connection elsewhere makes it fail
loudly instead of hanging the runner.
"""

from __future__ import annotations

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from demo_app.models import Base


def create_schema(database_url: str, *, reset: bool = False) -> None:
    """Create the demo tables; with `reset`, drop them first so a run starts from nothing."""
    engine = create_engine(
        database_url, poolclass=NullPool, connect_args={"application_name": "demo-schema"}
    )
    try:
        with engine.begin() as conn:
            conn.execute(text("SET LOCAL lock_timeout = '10s'"))
            if reset:
                Base.metadata.drop_all(conn)
            Base.metadata.create_all(conn)
    finally:
        engine.dispose()
