"""PostgreSQL's own view of the applications' connections, polled on its own schedule.

What the pool metrics cannot see: a connection the application holds "idle in
transaction" (it keeps locks and snapshot while the code calls an external API), how old
each open transaction is, and who blocks whom. One autocommit connection (application
name `pool-monitor-sidecar`) reads `pg_stat_activity` every `interval` seconds; the result
is cached, so /metrics scrapes never reach the database. `/api/checkouts` (and the live
page) asks `refresh()` for a view at most `FRESH_S` old: one poll on demand, shared by
every concurrent request and started at most once per `MIN_REFRESH_S` (see `refresh`).

Every row carries the server's own clock: `sampled_at` (`now()` of the very statement that
read `pg_stat_activity`, so the row describes the backend at or after that moment),
`xact_start` and `state_change` as epoch seconds. The API uses them to attach a row only
to the hold it describes (`api.checkouts`).

Cheap and safe by construction:

- `statement_timeout` and `lock_timeout` on the session: a sick server cannot stall us.
- `pg_blocking_pids()` takes the lock manager's locks briefly, so it is called only for
  rows that are waiting on a lock (`wait_event_type = 'Lock'`), and `pg_locks` (for when
  each wait began) is read only when such rows exist.
- Query text is selected only with `--show-query-text`, then masked and truncated
  (`sqltext`); parameter values never leave the server through us.
- When the server is down or the DSN is bad: `pg_up 0`, one readable log line per streak,
  reconnects with exponential backoff (1 s doubling up to 30 s). Nothing of the raw DSN is
  ever logged or served: a DSN that does not parse says only that (`parse_dsn`), a
  description shows host, port, dbname and user (`describe_dsn`), and libpq's errors lose
  the DSN and its password (`safe_error`).

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
       extract(epoch FROM xact_start)::float8 AS xact_start,
       extract(epoch FROM state_change)::float8 AS state_change,
       extract(epoch FROM now())::float8 AS sampled_at,
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
       + coalesce(nullif(current_setting('reserved_connections', true), ''), '0')::int,
       extract(epoch FROM now())::float8
"""
#: `refresh()` serves the cached view while it is at most this old (sidecar clock, from
#: the start of its poll); /api/checkouts then shows nothing older than `api.MAX_SAMPLE_AGE_S`.
FRESH_S = 0.4
#: On-demand polls start at least this far apart (after any poll, periodic or not): with
#: any number of clients, at most 2 on-demand polls a second reach the server.
MIN_REFRESH_S = 0.5
#: How long a request waits for a poll in flight (or for the rate limit) before it is
#: served the older view (whose rows the API then shows as unknown).
REFRESH_WAIT_S = 1.0


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
    #: epoch seconds, server clock; None when the session is hidden (no `pg_monitor`) or,
    #: for `xact_start`, when no transaction is open
    xact_start: float | None
    state_change: float | None
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
    """The cached result of the last poll.

    Three clocks, on purpose: `poll_started_at` (sidecar wall clock, before the query:
    a row is never older than `now - poll_started_at`, so freshness is judged by it),
    `polled_at` (sidecar wall clock, after the query: server ages are aged from it, which
    can only understate them, never make a transaction look older than its hold), and
    `sampled_at` (the server's `now()` for that query: compared with the server's own
    `xact_start`/`state_change` and, within a tolerance, with a hold's start)."""

    configured: bool
    up: bool = False
    error: str | None = None
    polled_at: float | None = None
    poll_started_at: float | None = None
    sampled_at: float | None = None
    poll_s: float = 0.0
    max_connections: int | None = None
    reserved_connections: int | None = None
    backends: dict[int, Backend] = field(default_factory=dict)
    apps: dict[str, AppStats] = field(default_factory=dict)


class DsnError(ValueError):
    """A DSN that cannot be used. Its message never holds any part of the DSN: psycopg's
    own parse errors quote the text they choke on (`missing "=" after "pw@h"`), which is
    how a mistyped DSN's password would reach the logs."""


_URI_SCHEMES = ("postgresql://", "postgres://")
#: One entry of `host`: a name or address (IPv6 without brackets, as libpq gives it back),
#: a Unix socket directory, or an abstract socket (`@name`).
_HOST = re.compile(r"[A-Za-z0-9._:%-]*|/[\w./-]*|@[\w./-]+")
_PORT = re.compile(r"\d{0,5}")
#: What `describe_dsn` shows, in this order; nothing else of a DSN is ever logged or served.
DESCRIBED = ("host", "port", "dbname", "user")
#: Longest value `describe_dsn` shows (a hostile DSN must not flood the log).
_MAX_SHOWN = 120


def _uri_shape_ok(dsn: str) -> bool:
    """Whether a URI has no `@` after the one ending its user info. libpq takes the user
    info up to the first `@` before any `/`, so a password with an unescaped `@` or `/`
    becomes part of the host, port, database or a query value
    (`postgresql://u:p/ss@h/db` is host `u`, port `p`, database `ss@h/db`)."""
    after = dsn.split("://", 1)[1]
    end = next((i for i, c in enumerate(after) if c in "@/"), len(after))
    rest = after[end + 1 :] if after[end : end + 1] == "@" else after
    return "@" not in rest


def parse_dsn(dsn: str) -> dict[str, str]:
    """The DSN's parameters, by psycopg's (libpq's) own parser: URI and `key=value` forms.

    `DsnError` when it does not parse, or parses into a host or port no server has (the
    mark of a mistyped DSN whose password libpq read as a host, port or database). The
    error names the problem, never the text. `ImportError` without psycopg."""
    from psycopg.conninfo import conninfo_to_dict

    if "\x00" in dsn:  # libpq would silently read only the text before it
        raise DsnError("does not parse: it holds a NUL character")
    try:
        params = {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}
    except Exception:
        raise DsnError("does not parse") from None
    if dsn.lstrip().lower().startswith(_URI_SCHEMES) and not _uri_shape_ok(dsn.strip()):
        raise DsnError(
            "does not parse: in a URI, '@' and '/' in the password and any '@' after the "
            "host must be %-encoded (%40, %2F)"
        )
    if not all(_HOST.fullmatch(h) for h in params.get("host", "").split(",")):
        raise DsnError("does not parse: a host is neither a name, an address nor a directory")
    if not all(_PORT.fullmatch(p) for p in params.get("port", "").split(",")):
        raise DsnError("does not parse: a port is not a number")
    return params


def _secrets(params: dict[str, str]) -> list[str]:
    """The DSN's secret values (`password`, `sslpassword`), as given and %-encoded."""
    from urllib.parse import quote

    values = [v for k, v in params.items() if "password" in k and v]
    values += [quote(v, safe="") for v in values] + [" ".join(v.split()) for v in values]
    return sorted({v for v in values if v}, key=len, reverse=True)


def _shown_value(value: str, secrets: list[str]) -> str:
    """One described value: hidden if it holds a secret, quoted if it has spaces, cut."""
    if any(secret in value for secret in secrets):
        return "(hidden)"
    value = value[:_MAX_SHOWN]
    if not value or any(c.isspace() or c in "'\\" for c in value):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return value


def describe_dsn(dsn: str | None) -> str:
    """`host=db port=5432 dbname=app user=monitor`: what a log line or the API may say
    about a DSN. Only these four parameters, only from a DSN that parses; anything else
    of the raw string (a mistyped one can hold its password anywhere) is never shown."""
    if dsn is None:
        return "no DSN"
    try:
        params = parse_dsn(dsn)
    except DsnError as exc:
        return f"a DSN that {exc}"
    except ImportError:
        return "a DSN (psycopg is not installed)"
    secrets = _secrets(params)
    described = [f"{k}={_shown_value(params[k], secrets)}" for k in DESCRIBED if k in params]
    return " ".join(described) or "libpq defaults"


def _scrubbed(message: str, secrets: list[str]) -> str:
    """`message` with every secret replaced by `***`, before and after its whitespace is
    collapsed (a password with spaces may appear either way)."""
    for secret in secrets:
        message = message.replace(secret, "***")
    message = " ".join(message.split())
    for secret in secrets:
        collapsed = " ".join(secret.split())
        if collapsed:
            message = message.replace(collapsed, "***")
    return message


def safe_error(exc: BaseException, dsn: str | None) -> str:
    """`ExceptionClass: message` for logs and the API, with the raw DSN and every secret
    in it replaced by `***` (libpq quotes hosts, users and, in some versions, fragments
    of the conninfo string in its messages)."""
    params: dict[str, str] = {}
    if dsn:
        try:
            params = parse_dsn(dsn)
        except (DsnError, ImportError):
            params = {}
    secrets = _secrets(params)
    if dsn and dsn.strip():
        secrets = sorted({dsn, dsn.strip(), *secrets}, key=len, reverse=True)
    message = _scrubbed(str(exc), secrets)
    name = type(exc).__name__
    return f"{name}: {message}" if message else name


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
        self.min_refresh_s = MIN_REFRESH_S
        #: polls started early because a request wanted a fresh view
        self.on_demand_polls = 0
        #: requests inside `refresh` waiting for a fresher view
        self._waiting = 0
        self._cond = threading.Condition()
        self._polling = False
        self._last_poll_mono: float | None = None
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
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.connect_timeout + 2)
        self._close()

    def _run(self) -> None:
        """All polls of a started collector happen here, periodic and on demand: one
        connection, one thread, and a server that is down keeps its backoff however many
        clients ask (on-demand requests only shorten the wait while polls succeed)."""
        backoff = 1.0
        while not self._stop.is_set():
            if self.poll():
                backoff = 1.0
                self._sleep(self.interval, on_demand=True)
            else:
                self._sleep(min(backoff, self.backoff_max), on_demand=False)
                backoff *= 2

    def _sleep(self, delay: float, on_demand: bool) -> None:
        """Wait `delay`, or less when a request wants a fresh view, but never closer than
        `min_refresh_s` to the start of the previous poll (the rate limit)."""
        until = time.monotonic() + delay
        with self._cond:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= until:
                    return
                if on_demand and self._waiting:
                    allowed = (self._last_poll_mono or 0.0) + self.min_refresh_s
                    if now >= allowed:
                        self.on_demand_polls += 1
                        return
                    self._cond.wait(min(until, allowed) - now)
                else:
                    self._cond.wait(until - now)

    # -- on demand --------------------------------------------------------------------------
    def _fresh(self, max_age: float, since: float | None) -> bool:
        started = self.view.poll_started_at
        if not self.view.up or started is None:
            return False
        now = time.time()
        return now - started <= max_age and (since is None or started >= min(since, now))

    def refresh(
        self, max_age: float = FRESH_S, since: float | None = None, wait: float = REFRESH_WAIT_S
    ) -> PgView:
        """A view at most `max_age` old, and polled after `since` (wall clock: the newest
        hold's start, so it has a row of its own), if the polling thread can get one within
        `wait` seconds; else the latest one (the caller checks its age). Blocks up to
        `wait`: call it off the event loop.

        Why this shape: /api/checkouts must not show a server row from another moment, yet
        the database must not see a query per request. A request only *asks* the polling
        thread for an early poll; requests arriving meanwhile wait for that same poll;
        polls start at least `min_refresh_s` apart. So whatever the number of clients, the
        server sees at most 1/`min_refresh_s` on-demand polls a second besides the periodic
        one, and none while nobody looks. /metrics never calls this."""
        view = self.view
        if self.dsn is None or self._thread is None or (view.polled_at and not view.up):
            return view  # down: the periodic poll's backoff decides when to try again
        deadline = time.monotonic() + wait
        with self._cond:
            self._waiting += 1  # the polling thread polls early only while someone waits
            try:
                while not self._fresh(max_age, since) and not self._stop.is_set():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.notify_all()
                    self._cond.wait(remaining)
            finally:
                self._waiting -= 1
            return self.view

    # -- one poll ---------------------------------------------------------------------------
    def poll(self) -> bool:
        """Poll once (connecting if needed); update `view`; True on success. Never raises.
        Polls never overlap (one connection): a second caller waits for the first."""
        if self.dsn is None:
            return False
        with self._cond:
            while self._polling:
                self._cond.wait()
            self._polling = True
            self._last_poll_mono = time.monotonic()
        try:
            return self._poll()
        finally:
            with self._cond:
                self._polling = False
                self._cond.notify_all()

    def _poll(self) -> bool:
        """The poll itself; the caller holds the `_polling` flag."""
        started = time.perf_counter()
        started_at = time.time()
        self.polls += 1
        try:
            conn = self._connect()
            backends, max_conn, reserved, sampled_at = self._read(conn)
        except Exception as exc:
            self._close()
            self.errors += 1
            message = (
                f"invalid DSN: {exc}" if isinstance(exc, DsnError) else safe_error(exc, self.dsn)
            )
            self.view = PgView(
                configured=True,
                up=False,
                error=message,
                polled_at=time.time(),
                poll_started_at=started_at,
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
            poll_started_at=started_at,
            sampled_at=sampled_at,
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
        parse_dsn(self.dsn or "")  # DsnError before libpq can echo a mistyped DSN
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

    def _read(self, conn: Any) -> tuple[list[Backend], int, int, float]:
        rows = conn.execute(self._activity_sql).fetchall()
        waiting = [r[0] for r in rows if r[3] == "Lock"]
        wait_s: dict[int, float] = {}
        if waiting:
            wait_s = {
                pid: s
                for pid, s in conn.execute(_LOCK_WAITS, (waiting,)).fetchall()
                if s is not None
            }
        max_conn, reserved, settings_now = conn.execute(_SETTINGS).fetchone()
        # the activity statement's own now(); with no rows, the later settings statement's
        sampled_at = rows[0][9] if rows else settings_now
        backends = []
        for row in rows:
            pid, app, state, wtype, wevent, xact_age, state_age, xact_start, state_change = row[:9]
            blocked, query = row[10], row[11]
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
                    xact_start=xact_start,
                    state_change=state_change,
                    blocked_by=tuple(blocked or ()),
                    lock_wait_s=lock_wait,
                    query=sqltext.shown(query, self.query_text_limit)
                    if self.show_query_text
                    else None,
                )
            )
        return backends, max_conn, reserved, sampled_at
