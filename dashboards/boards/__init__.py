"""The dashboards, one module each; `BOARDS` maps the committed file name to its builder."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dashboards.boards import demo, overview, postgres, sessions

BOARDS: dict[str, Callable[[], dict[str, Any]]] = {
    "pool-overview.json": overview.build,
    "sessions-and-code-sites.json": sessions.build,
    "postgresql.json": postgres.build,
    "demo-anti-pattern-vs-fix.json": demo.build,
}
