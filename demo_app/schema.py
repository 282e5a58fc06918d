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


def main(argv: list[str] | None = None) -> int:
    """`python -m demo_app.schema [--wait SECONDS]`: create the tables at `DATABASE_URL`,
    waiting for PostgreSQL to accept connections (a Kubernetes init container starts
    before the database is ready)."""
    import argparse
    import os
    import sys
    import time

    from demo_app.embedded_pg import as_psycopg_url

    parser = argparse.ArgumentParser(prog="python -m demo_app.schema", description=main.__doc__)
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        help="seconds to keep retrying while PostgreSQL is not ready",
    )
    parser.add_argument("--reset", action="store_true", help="drop the demo tables first")
    args = parser.parse_args(argv)
    url = os.environ.get("DATABASE_URL")
    if not url:
        parser.error("DATABASE_URL is not set (the PostgreSQL URL to create the tables in)")
    deadline = time.monotonic() + args.wait
    while True:
        try:
            create_schema(as_psycopg_url(url), reset=args.reset)
        except Exception as exc:
            if time.monotonic() >= deadline:
                print(f"demo schema not created: {type(exc).__name__}: {exc}", file=sys.stderr)
                return 1
            print(f"waiting for PostgreSQL: {type(exc).__name__}", file=sys.stderr, flush=True)
            time.sleep(2)
        else:
            print("demo tables ready", flush=True)
            return 0


if __name__ == "__main__":
    raise SystemExit(main())
