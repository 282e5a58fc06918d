"""A real PostgreSQL for the demo and the tests: `DATABASE_URL` if set, else embedded.

The embedded server comes from the `pgserver` package (PostgreSQL 16 binaries on PyPI), so
a fresh machine needs nothing but pip. It listens on a Unix socket only.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import make_url


def as_psycopg_url(url: str) -> str:
    """SQLAlchemy URL for psycopg 3 (`postgresql+psycopg://`), whatever scheme was given."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


@contextmanager
def postgres_url(data_dir: str | None = None) -> Iterator[str]:
    """Yield a SQLAlchemy URL (psycopg 3 driver) to a running PostgreSQL.

    Uses `DATABASE_URL` when set; otherwise starts an embedded server in `data_dir` (a
    temporary directory by default) and stops it on exit.
    """
    env = os.environ.get("DATABASE_URL")
    if env:
        yield as_psycopg_url(env)
        return
    import pgserver  # imported late: only needed without DATABASE_URL

    with tempfile.TemporaryDirectory(prefix="pool-monitor-pg-") as tmp:
        server = pgserver.get_server(data_dir or tmp, cleanup_mode="stop")
        try:
            yield as_psycopg_url(server.get_uri())
        finally:
            server.cleanup()
