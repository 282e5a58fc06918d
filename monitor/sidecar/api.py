"""The JSON API: pools, and live checkouts joined with the server's view of their backend.

`/api/checkouts` is the question "which code holds which connection, and what is the
server doing with it": the application side (pool, age, code site, thread, task) comes
from the worker snapshots; the server side (state, transaction age, wait event, who
blocks it) from the cached PostgreSQL poll, joined on the backend pid. `blocked_by`
names the blocking backends and, when one of our workers holds that backend, the hold —
so "the checkout at orders.py:88 is blocked by the one at payments.py:40" is one row.
"""

from __future__ import annotations

import time
from typing import Any

from monitor.sidecar.aggregate import View
from monitor.sidecar.postgres import Backend, PgView


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


def pools(view: View, pg: PgView) -> dict[str, Any]:
    """`/api/pools`: per pool the live figures, plus processes and PostgreSQL status."""
    return {
        "scanned_at": view.scanned_at,
        "pools": [
            {
                "pool": p["pool"],
                "pool_class": p["pool_class"],
                "processes": p["processes"],
                "holds": len(p["holds"]),
                **_gauges(p),
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


def _hold_age(hold: dict[str, Any], scanned_at: float, now: float) -> float:
    started = hold.get("started_at")
    if isinstance(started, (int, float)):
        return max(0.0, now - started)
    return float(hold["age_s"]) + max(0.0, now - scanned_at)


def _hold_ref(hold: dict[str, Any]) -> dict[str, Any]:
    return {
        "pool": hold["pool"],
        "age_s": hold["age_s"],
        "site": hold.get("site"),
        "thread": hold.get("thread"),
        "task": hold.get("task"),
        "process": hold.get("process"),
    }


def _blocker(
    pid: int, pg: PgView, by_pid: dict[int, list[dict[str, Any]]], now: float
) -> dict[str, Any]:
    server: Backend | None = pg.backends.get(pid)
    return {
        "pid": pid,
        "application_name": server.application_name if server else None,
        "server_state": server.state if server else None,
        "server_xact_age_s": _aged(server.xact_age_s, pg.polled_at, now) if server else None,
        "holds": [_hold_ref(h) for h in by_pid.get(pid, [])],
    }


def _aged(value: float | None, since: float | None, now: float) -> float | None:
    return None if value is None or since is None else value + max(0.0, now - since)


def checkouts(
    view: View, pg: PgView, show_query_text: bool = False, now: float | None = None
) -> list[dict[str, Any]]:
    """`/api/checkouts`: one object per live hold, oldest first.

    Ages are as of `now` (the request), not as of the last scan or poll, so the
    application's and the server's ages of one connection compare directly."""
    now = time.time() if now is None else now
    holds = sorted(
        ({**h, "age_s": _hold_age(h, view.scanned_at, now)} for h in view.holds),
        key=lambda h: h["age_s"],
        reverse=True,
    )
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for hold in holds:
        if isinstance(hold.get("backend_pid"), int):
            by_pid.setdefault(hold["backend_pid"], []).append(hold)
    out = []
    for hold in holds:
        pid = hold.get("backend_pid")
        server = pg.backends.get(pid) if pg.up and isinstance(pid, int) else None
        row = {
            "pool": hold["pool"],
            "age_s": hold["age_s"],
            "site": hold.get("site"),
            "thread": hold.get("thread"),
            "task": hold.get("task"),
            "backend_pid": pid,
            "server_state": server.state if server else None,
            "server_xact_age_s": _aged(server.xact_age_s, pg.polled_at, now) if server else None,
            "wait_event": server.wait_event if server else None,
            "wait_event_type": server.wait_event_type if server else None,
            "application_name": server.application_name if server else None,
            "lock_wait_s": _aged(server.lock_wait_s, pg.polled_at, now) if server else None,
            "blocked_by": [_blocker(b, pg, by_pid, now) for b in server.blocked_by]
            if server
            else [],
            "executing": hold.get("executing"),
            "sql_time_s": hold.get("sql_time_s"),
            "long_held": hold.get("long_held"),
            "process": hold.get("process"),
        }
        if show_query_text:
            row["query"] = server.query if server else None
        out.append(row)
    return out
