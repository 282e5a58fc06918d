"""Query text fit to show: literals masked, then truncated.

`pg_stat_activity.query` is the statement as the server received it. With server-side
parameters (psycopg 3, asyncpg) values travel separately and the text holds `$1`; with
client-side interpolation (psycopg2, literal SQL) the values are inside the text. The
sidecar must never show parameter values, so every string, dollar-quoted and numeric
literal is replaced by `?` before anything leaves the process — and even that text is
only fetched with `--show-query-text`.
"""

from __future__ import annotations

import re

DEFAULT_LIMIT = 200

_LITERALS = re.compile(
    r"""
      (?P<dollar>\$(?P<tag>[A-Za-z_]\w*)?\$.*?(?:\$(?P=tag)?\$|\Z))   # $$...$$, $x$...$x$
    | (?P<string>[EeBbXxNn]?'(?:[^'\\]|''|\\.)*(?:'|\Z))               # '...', E'...', cut
    | (?P<number>(?<![\w$.])(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+)(?![\w.]))
    """,
    re.VERBOSE | re.DOTALL,
)


def mask(text: str) -> str:
    """Replace every literal with `?` (positional parameters `$1` stay)."""
    return _LITERALS.sub("?", text)


def shown(text: str | None, limit: int = DEFAULT_LIMIT) -> str | None:
    """Masked and cut to `limit` characters (with `…` when cut)."""
    if text is None:
        return None
    masked = " ".join(mask(text).split())
    return masked if len(masked) <= limit else masked[: max(0, limit - 1)] + "…"
