"""Shared fixtures: a real PostgreSQL (embedded via pgserver unless DATABASE_URL is set)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from demo_app.embedded_pg import postgres_url


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with postgres_url() as url:
        yield url


def require_binary(name: str) -> str:
    """Path of a binary a test needs: skip outside CI with a clear reason, fail under CI."""
    path = shutil.which(name)
    if path:
        return path
    message = f"`{name}` is not installed (Debian package: apt-get install -y {name})"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must have it (.ci/run installs it)")
    pytest.skip(message)
