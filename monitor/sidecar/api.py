"""The JSON API: pools, and live checkouts joined with the server's view of their backend.

`/api/checkouts` is the question "which code holds which connection, and what is the
server doing with it": the application side (pool, age, code site, thread, task) comes
from the worker snapshots; the server side (state, transaction age, wait event, who
blocks it) from the cached PostgreSQL poll, joined on the backend pid. `blocked_by`
names the blocking backends and, when one of our workers holds that backend, the hold —
so "the checkout at orders.py:88 is blocked by the one at payments.py:40" is one row.

A server row is attached to a hold only when it describes that hold (`join`): sampled
after the hold began, no older than `MAX_SAMPLE_AGE_S`, and neither its transaction nor
its last state change older than the hold. Otherwise the server fields are null and
`server_unknown` says why: a poll from before the checkout, or a transaction of the
previous holder of the same backend, would otherwise be shown as this hold's.

Each hold carries the OpenTelemetry trace and span it was checked out under (`trace_id`,
`span_id`, null when the worker recorded none) and, with `--trace-url-template`, a link to
that trace in the tracing backend (`trace_url`).
"""

from __future__ import annotations

import time
from typing import Any

from monitor.sidecar import aggregate
from monitor.sidecar.aggregate import View
from monitor.sidecar.config import trace_url
from monitor.sidecar.postgres import Backend, PgView

#: /api/checkouts never shows a server row older than this (sidecar clock, from the start
#: of the poll that read it; `PostgresCollector.refresh` keeps the view younger).
MAX_SAMPLE_AGE_S = 0.5
#: Allowed disagreement between the workers' wall clock (a hold's `started_at`) and the
#: server's (`now()`, `xact_start`, `state_change`), e.g. NTP-synced hosts. A row is
#: refused only when it is *more* than this before the hold, so skew up to it cannot hide
#: a real row, and a row sampled up to this long before the checkout could be attached
#: only if it also has no transaction or state change from before the hold.
CLOCK_TOLERANCE_S = 0.05

#: `server_unknown` reasons (stable strings: the page shows them, alerts may match them)
NO_PID = "no backend pid recorded for this hold"
NOT_CONFIGURED = "PostgreSQL not configured"
DOWN = "PostgreSQL unreachable"
NOT_POLLED = "PostgreSQL not polled yet"
TOO_OLD = "server sample older than 0.5 s"
SAMPLED_BEFORE = "row sampled before this hold began"
NO_ROW = "no pg_stat_activity row for this backend pid"
HIDDEN = "session state hidden (grant pg_monitor)"
OLDER_XACT = "transaction began before this hold (a previous holder's)"
OLDER_STATE = "backend unchanged since before this hold (no statement yet)"


def _gauges(pool: dict[str, Any]) -> dict[str, Any]:
    g = pool["gauges"]
    count = g.get("db.client.connection.count") or {}
    timeouts = pool["counters"].get("db.client.connection.timeouts", 0)
    return {
        "used": count.get("used", 0),
        "idle": count.get("idle", 0),
        "max": g.get("db.client.connection.max"),
        "idle_max": g.get("db.client.connection.idle.max"),
        "pending": g.get("db.client.connection.pending_requests", 0),
        "overflow": g.get("sqlalchemy.pool.overflow"),
        "long_held": g.get("sqlalchemy.pool.long_held", 0),
        "oldest_checkout_age_s": g.get("sqlalchemy.pool.oldest_checkout_age", 0.0),
        "checkouts": pool["counters"].get("sqlalchemy.pool.checkouts", 0),
        "timeouts": timeouts,
    }


def pools(view: View, pg: PgView, now: float | None = None) -> dict[str, Any]:
    """`/api/pools`: per pool the live figures, plus processes and PostgreSQL status.
    `holds` and `long_held` count the live holds as `/api/checkouts` shows them (by this
    sidecar's clock), not the full documents' gauges, which are up to an interval old."""
    now = time.time() if now is None else now

    def long_held(p: dict[str, Any]) -> int:
        return sum(
            1 for h in p["holds"] if aggregate.long_held(h, hold_age(h, view.scanned_at, now))
        )

    return {
        "scanned_at": view.scanned_at,
        "holds_at": view.holds_at,
        "pools": [
            {
                "pool": p["pool"],
                "pool_class": p["pool_class"],
                "processes": p["processes"],
                "holds": len(p["holds"]),
                **_gauges(p),
                "long_held": long_held(p),
            }
            for p in view.pools
        ],
        "processes": view.processes,
        "snapshot_errors": view.errors,
        "snapshot_dir_error": view.dir_error,
        "postgres": {
            "configured": pg.configured,
            "up": pg.up,
            "error": pg.error,
            "polled_at": pg.polled_at,
            "max_connections": pg.max_connections,
            "reserved_connections": pg.reserved_connections,
            "applications": {
                app: {
                    "backends": s.backends,
                    "idle_in_transaction_max_s": s.idle_in_transaction_max_s,
                    "transaction_max_s": s.transaction_max_s,
                    "blocked": s.blocked,
                    "lock_wait_max_s": s.lock_wait_max_s,
                }
                for app, s in sorted(pg.apps.items())
            },
        },
    }


def hold_age(hold: dict[str, Any], scanned_at: float, now: float) -> float:
    if "as_of" not in hold:  # (a hold not from the aggregator: as of the scan)
        hold = {**hold, "as_of": scanned_at}
    return aggregate.hold_age(hold, now)


def _stale(hold: dict[str, Any], now: float) -> bool:
    """The hold's worker has not vouched for it for `STALE_AFTER_S`: it may have ended
    since (the page says "as of" its `as_of`)."""
    as_of = hold.get("as_of")
    return not isinstance(as_of, (int, float)) or now - as_of > aggregate.STALE_AFTER_S


def trace_fields(hold: dict[str, Any], template: str | None) -> dict[str, str | None]:
    """`trace_id`, `span_id` (None when unknown: no span was current at the checkout, an
    older library, or a hold whose details are pending) and `trace_url` (None unless the
    template is set and the hold has a trace id). The schema let through only lowercase
    hex ids; anything else here (a hold not from a validated document) counts as none."""
    trace_id, span_id = hold.get("trace_id"), hold.get("span_id")
    trace_id = trace_id if isinstance(trace_id, str) else None
    span_id = span_id if isinstance(span_id, str) else None
    return {
        "trace_id": trace_id,
        "span_id": span_id,
        "trace_url": trace_url(template, trace_id, span_id) if template and trace_id else None,
    }


def _hold_ref(hold: dict[str, Any], template: str | None = None) -> dict[str, Any]:
    return {
        "pool": hold["pool"],
        "age_s": hold["age_s"],
        "site": hold.get("site"),
        "thread": hold.get("thread"),
        "task": hold.get("task"),
        "process": hold.get("process"),
        **trace_fields(hold, template),
    }


def hold_start(hold: dict[str, Any], scanned_at: float) -> float:
    """The hold's start, wall clock: `started_at` from the worker, else from its age."""
    started = hold.get("started_at")
    if isinstance(started, (int, float)):
        return float(started)
    return scanned_at - float(hold.get("age_s") or 0.0)


def newest_start(view: View) -> float | None:
    """When the newest hold with a backend pid began: a poll started after it has a row
    for every hold (`PostgresCollector.refresh(since=...)`)."""
    starts = [
        hold_start(h, view.scanned_at) for h in view.holds if isinstance(h.get("backend_pid"), int)
    ]
    return max(starts, default=None)


def sample_problem(pg: PgView, now: float, max_age: float = MAX_SAMPLE_AGE_S) -> str | None:
    """Why no row of this poll may be attached to any hold (one of the reasons above), or
    None: the sample is usable, row by row (`join`). `/api/blocking` says it once for
    the whole tree."""
    if not pg.configured:
        return NOT_CONFIGURED
    if pg.poll_started_at is None:
        return NOT_POLLED
    if not pg.up:
        return DOWN
    if pg.sampled_at is None or now - pg.poll_started_at > max_age:
        return TOO_OLD
    return None


def join(
    server: Backend | None,
    pg: PgView,
    started: float,
    now: float,
    tolerance: float = CLOCK_TOLERANCE_S,
    max_age: float = MAX_SAMPLE_AGE_S,
) -> str | None:
    """None when `server` (the row for the hold's backend pid) describes the hold that
    began at `started`; else why not, one of the reasons above.

    The tests, on the server's clock against the hold's start (less `tolerance`):
    sampled at or after it (else the row may be the previous holder's, or an idle
    backend the hold has since used); `xact_start`, if a transaction is open, not before
    it (that transaction belongs to whoever held the connection before); `state_change`
    not before it (nothing happened since the checkout: the state is the previous
    holder's, e.g. `idle` while this hold has not yet begun its transaction)."""
    problem = sample_problem(pg, now, max_age)
    if problem is not None:
        return problem
    earliest = started - tolerance
    if pg.sampled_at is None or pg.sampled_at < earliest:
        return SAMPLED_BEFORE
    if server is None:
        return NO_ROW
    if server.state_change is None:
        return HIDDEN
    if server.xact_start is not None and server.xact_start < earliest:
        return OLDER_XACT
    if server.state_change < earliest:
        return OLDER_STATE
    return None


def _blocker(
    pid: int,
    pg: PgView,
    by_pid: dict[int, list[dict[str, Any]]],
    now: float,
    scanned_at: float,
    template: str | None = None,
) -> dict[str, Any]:
    """A blocking backend, and only those holds on it that its row describes."""
    server: Backend | None = pg.backends.get(pid)
    return {
        "pid": pid,
        "application_name": server.application_name if server else None,
        "server_state": server.state if server else None,
        "server_xact_age_s": aged(server.xact_age_s, pg.polled_at, now) if server else None,
        "holds": [
            _hold_ref(h, template)
            for h in by_pid.get(pid, [])
            if join(server, pg, hold_start(h, scanned_at), now, max_age=float("inf")) is None
        ],
    }


def aged(value: float | None, since: float | None, now: float) -> float | None:
    return None if value is None or since is None else value + max(0.0, now - since)


#: `/api/checkouts?limit=`: its default and largest value.
CHECKOUTS_LIMIT = 500
CHECKOUTS_MAX_LIMIT = 5000


def checkouts_limit(raw: str | None) -> int:
    """The `limit` query parameter: a whole number from 1 to `CHECKOUTS_MAX_LIMIT`."""
    if raw is None:
        return CHECKOUTS_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= CHECKOUTS_MAX_LIMIT:
        raise ValueError(f"limit must be a whole number from 1 to {CHECKOUTS_MAX_LIMIT}")
    return limit


def checkouts(
    view: View,
    pg: PgView,
    show_query_text: bool = False,
    now: float | None = None,
    max_sample_age: float = MAX_SAMPLE_AGE_S,
    limit: int | None = None,
    trace_url_template: str | None = None,
) -> list[dict[str, Any]]:
    """`/api/checkouts`: one object per live hold, oldest first, at most `limit` of them
    (sorted and cut here: the answer's size is bounded however many holds there are).

    Ages are as of `now` (the request), not as of the last scan or poll, so the
    application's and the server's ages of one connection compare directly. Server
    ages are aged from the end of the poll, so they can only be understated (by the
    poll's duration), never make a transaction look older than its hold. The server
    fields are null, and `server_unknown` says why, unless `join` accepts the row;
    `server_as_of` is the server's `now()` for the sample, `server_sample_age_s` its
    age at `now` (from the start of the poll). `trace_id`, `span_id` and `trace_url`
    (with `trace_url_template`, `--trace-url-template`): see `trace_fields`; the holds in
    `blocked_by` carry them too."""
    now = time.time() if now is None else now
    holds = sorted(
        ({**h, "age_s": hold_age(h, view.scanned_at, now)} for h in view.holds),
        key=lambda h: h["age_s"],
        reverse=True,
    )
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for hold in holds:
        if isinstance(hold.get("backend_pid"), int):
            by_pid.setdefault(hold["backend_pid"], []).append(hold)
    out = []
    for hold in holds[:limit]:
        pid = hold.get("backend_pid")
        candidate = pg.backends.get(pid) if isinstance(pid, int) else None
        unknown = (
            join(candidate, pg, hold_start(hold, view.scanned_at), now, max_age=max_sample_age)
            if isinstance(pid, int)
            else NO_PID
        )
        server = candidate if unknown is None else None
        row = {
            "pool": hold["pool"],
            "age_s": hold["age_s"],
            "site": hold.get("site"),
            "thread": hold.get("thread"),
            "task": hold.get("task"),
            "backend_pid": pid,
            "server_state": server.state if server else None,
            "server_xact_age_s": aged(server.xact_age_s, pg.polled_at, now) if server else None,
            "wait_event": server.wait_event if server else None,
            "wait_event_type": server.wait_event_type if server else None,
            "application_name": server.application_name if server else None,
            "lock_wait_s": aged(server.lock_wait_s, pg.polled_at, now) if server else None,
            "blocked_by": [
                _blocker(b, pg, by_pid, now, view.scanned_at, trace_url_template)
                for b in server.blocked_by
            ]
            if server
            else [],
            "server_unknown": unknown,
            "server_as_of": pg.sampled_at if pg.up else None,
            "server_sample_age_s": max(0.0, now - pg.poll_started_at)
            if pg.up and pg.poll_started_at is not None
            else None,
            "executing": hold.get("executing"),
            "sql_time_s": hold.get("sql_time_s"),
            "long_held": aggregate.long_held(hold, hold["age_s"]),
            "started_at": hold_start(hold, view.scanned_at),
            "as_of": hold.get("as_of"),
            "stale": _stale(hold, now),
            # On the worker's board, newer than its last live document: out, and aged
            # exactly, but where and by whom arrives with the next document.
            "pending": bool(hold.get("pending")),
            "process": hold.get("process"),
            **trace_fields(hold, trace_url_template),
        }
        if show_query_text:
            row["query"] = server.query if server else None
        out.append(row)
    return out
