"""PostgreSQL's own view of the applications' connections, polled on its own schedule.

What the pool metrics cannot see: a connection the application holds "idle in
transaction" (it keeps locks and snapshot while the code calls an external API), how old
each open transaction is, and who blocks whom. One autocommit connection (application
name `pool-monitor-sidecar`) reads `pg_stat_activity` every `interval` seconds; the result
is cached, so scrapes and page refreshes never reach the database.

Cheap and safe by construction:

- `statement_timeout` and `lock_timeout` on the session: a sick server cannot stall us.
- `pg_blocking_pids()` takes the lock manager's locks briefly, so it is called only for
  rows that are waiting on a lock (`wait_event_type = 'Lock'`), and `pg_locks` (for when
  each wait began) is read only when such rows exist.
- Query text is selected only with `--show-query-text`, then masked and truncated
  (`sqltext`); parameter values never leave the server through us.
- When the server is down or the DSN is bad: `pg_up 0`, one readable log line per streak
  (password redacted), reconnects with exponential backoff (1 s doubling up to 30 s).

Privileges: a role with `pg_monitor` sees every session's state and query:

    CREATE ROLE pool_monitor LOGIN PASSWORD '...';
    GRANT pg_monitor TO pool_monitor;

Without it, other users' sessions show state NULL (exported as `unknown`).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from monitor.sidecar import sqltext

log = logging.getLogger("monitor.sidecar.postgres")

APPLICATION_NAME = "pool-monitor-sidecar"
#: Distinct application names exported; the rest are summed under `(other)`.
MAX_APPLICATIONS = 100
OTHER_APPLICATION = "(other)"
#: States every application gets a `pg_app_backends` series for, even at 0 (alerts).
STATES = ("active", "idle", "idle in transaction", "idle in transaction (aborted)")
IDLE_IN_TRANSACTION = ("idle in transaction", "idle in transaction (aborted)")

_ACTIVITY = """
SELECT pid,
       coalesce(application_name, '') AS application_name,
       coalesce(state, 'unknown') AS state,
       wait_event_type,
       wait_event,
       extract(epoch FROM now() - xact_start)::float8 AS xact_age,
       extract(epoch FROM now() - state_change)::float8 AS state_age,
       CASE WHEN wait_event_type = 'Lock' THEN pg_blocking_pids(pid) END AS blocked_by,
       {query} AS query
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
"""
_LOCK_WAITS = """
SELECT pid, extract(epoch FROM now() - min(waitstart))::float8
FROM pg_locks WHERE NOT granted AND pid = ANY(%s) GROUP BY pid
"""
_SETTINGS = """
SELECT current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int
       + coalesce(nullif(current_setting('reserved_connections', true), ''), '0')::int
"""


@dataclass(frozen=True)
class Backend:
    """One client backend as the server sees it."""

    pid: int
    application_name: str
    state: str
    wait_event_type: str | None
    wait_event: str | None
    xact_age_s: float | None
    state_age_s: float | None
    blocked_by: tuple[int, ...]
    lock_wait_s: float | None
    query: str | None


@dataclass
class AppStats:
    """Per `application_name`: what the `pg_app_*` series export."""

    backends: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    idle_in_transaction_max_s: float = 0.0
    transaction_max_s: float = 0.0
    blocked: int = 0
    lock_wait_max_s: float = 0.0


@dataclass(frozen=True)
class PgView:
    """The cached result of the last poll."""

    configured: bool
    up: bool = False
    error: str | None = None
    polled_at: float | None = None
    poll_s: float = 0.0
    max_connections: int | None = None
    reserved_connections: int | None = None
    backends: dict[int, Backend] = field(default_factory=dict)
    apps: dict[str, AppStats] = field(default_factory=dict)


_SECRET_RES = (
    re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE),
    re.compile(r"(://[^:/@\s]*:)([^@\s]*)(@)"),
)


def redact(text: str) -> str:
    """`password=…` and `user:password@` hidden, for log lines and /api/pools."""
    text = _SECRET_RES[0].sub(r"\1***", text)
    return _SECRET_RES[1].sub(r"\1***\3", text)


def summarize(backends: list[Backend]) -> dict[str, AppStats]:
    """`pg_app_*` figures per application name (bounded: see MAX_APPLICATIONS)."""
    counts: dict[str, int] = {}
    for b in backends:
        counts[b.application_name] = counts.get(b.application_name, 0) + 1
    keep = set(sorted(counts, key=lambda a: (-counts[a], a))[:MAX_APPLICATIONS])
    apps: dict[str, AppStats] = {}
    for b in backends:
        name = b.application_name if b.application_name in keep else OTHER_APPLICATION
        stats = apps.setdefault(name, AppStats())
        stats.backends[b.state] = stats.backends.get(b.state, 0) + 1
        if b.state in IDLE_IN_TRANSACTION and b.state_age_s is not None:
            stats.idle_in_transaction_max_s = max(stats.idle_in_transaction_max_s, b.state_age_s)
        if b.xact_age_s is not None:
            stats.transaction_max_s = max(stats.transaction_max_s, b.xact_age_s)
        if b.blocked_by:
            stats.blocked += 1
        if b.lock_wait_s is not None:
            stats.lock_wait_max_s = max(stats.lock_wait_max_s, b.lock_wait_s)
    return apps


class PostgresCollector:
    """Polls one server in a daemon thread; `view` is the latest result (never blocks)."""

    def __init__(
        self,
        dsn: str | None,
        interval: float = 5.0,
        *,
        show_query_text: bool = False,
        query_text_limit: int = sqltext.DEFAULT_LIMIT,
        backoff_max: float = 30.0,
        connect_timeout: int = 5,
        statement_timeout_ms: int = 2000,
    ) -> None:
        self.dsn = dsn
        self.interval = interval
        self.show_query_text = show_query_text
        self.query_text_limit = query_text_limit
        self.backoff_max = backoff_max
        self.connect_timeout = connect_timeout
        self.statement_timeout_ms = statement_timeout_ms
        self.polls = 0
        self.errors = 0
        self.last_success: float | None = None
        self.view = PgView(
            configured=dsn is not None, error=None if dsn else "no PostgreSQL DSN configured"
        )
        self._conn: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        query = f"left(query, {int(query_text_limit) * 4})" if show_query_text else "NULL"
        self._activity_sql = _ACTIVITY.format(query=query)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        if self.dsn is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="pool-monitor-postgres", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.connect_timeout + 2)
        self._close()

    def _run(self) -> None:
        backoff = 1.0
        delay = 0.0
        while not self._stop.wait(delay):
            if self.poll():
                backoff = 1.0
                delay = self.interval
            else:
                delay = min(backoff, self.backoff_max)
                backoff *= 2

    # -- one poll ---------------------------------------------------------------------------
    def poll(self) -> bool:
        """Poll once (connecting if needed); update `view`; True on success. Never raises."""
        if self.dsn is None:
            return False
        started = time.perf_counter()
        self.polls += 1
        try:
            conn = self._connect()
            backends, max_conn, reserved = self._read(conn)
        except Exception as exc:
            self._close()
            self.errors += 1
            message = redact(" ".join(str(exc).split())) or type(exc).__name__
            if "connection info string" in message or "invalid dsn" in message.lower():
                message = f"invalid DSN: {message}"
            self.view = PgView(
                configured=True,
                up=False,
                error=message,
                polled_at=time.time(),
                poll_s=time.perf_counter() - started,
            )
            if not self._failing:
                log.warning(
                    "PostgreSQL unreachable: %s (pg_up 0; retrying with backoff up to %g s)",
                    message,
                    self.backoff_max,
                )
            self._failing = True
            return False
        if self._failing:
            log.info("PostgreSQL reachable again (pg_up 1)")
        self._failing = False
        now = time.time()
        self.last_success = now
        self.view = PgView(
            configured=True,
            up=True,
            polled_at=now,
            poll_s=time.perf_counter() - started,
            max_connections=max_conn,
            reserved_connections=reserved,
            backends={b.pid: b for b in backends},
            apps=summarize(backends),
        )
        return True

    def _connect(self) -> Any:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        import psycopg

        conn = psycopg.connect(
            self.dsn,
            autocommit=True,
            connect_timeout=self.connect_timeout,
            application_name=APPLICATION_NAME,
        )
        try:
            conn.execute(f"SET statement_timeout = {int(self.statement_timeout_ms)}")
            conn.execute(f"SET lock_timeout = {int(self.statement_timeout_ms)}")
        except Exception:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                log.debug("closing the PostgreSQL connection failed", exc_info=True)

    def _read(self, conn: Any) -> tuple[list[Backend], int, int]:
        rows = conn.execute(self._activity_sql).fetchall()
        waiting = [r[0] for r in rows if r[3] == "Lock"]
        wait_s: dict[int, float] = {}
        if waiting:
            wait_s = {
                pid: s
                for pid, s in conn.execute(_LOCK_WAITS, (waiting,)).fetchall()
                if s is not None
            }
        max_conn, reserved = conn.execute(_SETTINGS).fetchone()
        backends = []
        for pid, app, state, wtype, wevent, xact_age, state_age, blocked, query in rows:
            lock_wait = None
            if wtype == "Lock":  # waitstart can lag the wait briefly: fall back to state age
                lock_wait = wait_s.get(pid, state_age)
            backends.append(
                Backend(
                    pid=pid,
                    application_name=app,
                    state=state,
                    wait_event_type=wtype,
                    wait_event=wevent,
                    xact_age_s=xact_age,
                    state_age_s=state_age,
                    blocked_by=tuple(blocked or ()),
                    lock_wait_s=lock_wait,
                    query=sqltext.shown(query, self.query_text_limit)
                    if self.show_query_text
                    else None,
                )
            )
        return backends, max_conn, reserved
