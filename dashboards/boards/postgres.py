"""PostgreSQL: what the server sees of each application's connections.

Series come from the sidecar's collector (`pg_app_*` per `application_name`). Several
sidecars watching one server report the same numbers, so panels take `max` across
collectors rather than `sum`, which would double-count.
"""

from __future__ import annotations

from typing import Any

from dashboards import ruleset as r
from dashboards import series as s
from dashboards.boards.common import TAGS, lbl, target_filter, target_variables
from dashboards.panels import (
    GREEN,
    ORANGE,
    RED,
    Board,
    Q,
    query_variable,
    stat_panel,
    timeseries_panel,
)
from dashboards.thresholds import THRESHOLD_BY_NAME

UID = "pool-monitor-postgresql"
A = s.APPLICATION


def build() -> dict[str, Any]:
    t = target_filter()
    app = f'{t}, {A}=~"$application"'
    usage_limit = THRESHOLD_BY_NAME["pg_connections_usage_ratio"].default
    variables = [
        *target_variables("pg_up"),
        query_variable(
            "application",
            "Application",
            f"label_values(pg_app_backends{{{t}}}, {A})",
            "PostgreSQL application_name; set it per pool (connect_args) so the pool "
            "and the server views split the same way.",
        ),
    ]
    board = Board(
        UID,
        "Pool monitor / PostgreSQL",
        "The server's side of the pools: backends per application and state against "
        "max_connections, idle-in-transaction and transaction age, blocking.",
        variables,
    ).link("pool-monitor dashboards", TAGS)

    board.row("Server capacity").add(
        stat_panel(
            "Collector",
            "Whether the sidecar's PostgreSQL collector can query the server (pg_up). DOWN, "
            "or no value, means everything below is stale: check the sidecar's log, its "
            "database URL and that its role has pg_monitor.",
            "none",
            [Q(f"min(pg_up{{{t}}})", "pg_up")],
            steps=((None, RED), (1, GREEN)),
            mappings={"0": ("DOWN", RED), "1": ("UP", GREEN)},
        ),
        stat_panel(
            "Connections used (worst collector)",
            "Client backends / (max_connections - reserved connections): how close the "
            "server is to refusing new connections to ordinary roles. Red at the "
            "PostgresConnectionsNearLimit threshold. Remember that every replica's pool may "
            "open up to pool_size + max_overflow.",
            "percentunit",
            [Q(f"max({r.PG_USAGE}{{{t}}})", "used")],
            steps=((None, GREEN), (usage_limit * 0.8, ORANGE), (usage_limit, RED)),
        ),
        stat_panel(
            "Usable connections",
            "max_connections minus superuser_reserved_connections and reserved_connections: "
            "the most client connections ordinary roles can open. The sum over all services "
            "of (pool_size + max_overflow) x replicas should stay below it.",
            "short",
            [Q(f"max(pg_max_connections{{{t}}} - pg_reserved_connections{{{t}}})", "usable")],
            steps=((None, "text"),),
        ),
        stat_panel(
            "Blocked backends now",
            "Backends of the selected applications waiting on a lock held by another "
            "backend. Non-zero for long: see 'Longest lock wait' and look for a transaction "
            "left open (idle in transaction) by the blocker.",
            "short",
            [Q(f"sum(max by ({A}) (pg_app_blocked_backends{{{app}}}))", "blocked")],
            steps=((None, GREEN), (1, RED)),
        ),
    )

    board.row("Backends").add(
        timeseries_panel(
            "Backends by application and state vs max_connections",
            "Client backends per application_name, stacked by state (active, idle, idle in "
            "transaction, ...). Dashed lines: the usable limit (max_connections - reserved) "
            "and max_connections. 'idle in transaction' is a connection holding a "
            "transaction open while the application does something else.",
            "short",
            [
                Q(f"max by ({A}, {s.PG_STATE}) (pg_app_backends{{{app}}})", lbl(A, s.PG_STATE)),
                Q(
                    f"max(pg_max_connections{{{t}}}) - max(pg_reserved_connections{{{t}}})",
                    "usable limit",
                ),
                Q(f"max(pg_max_connections{{{t}}})", "max_connections"),
            ],
            stack=True,
            unstacked=("usable limit", "max_connections"),
            w=24,
        ),
    )

    board.row("Transactions").add(
        timeseries_panel(
            "Longest idle in transaction",
            "Age of the oldest backend per application that is inside a transaction but "
            "not running a statement. It keeps its locks and its pool slot and holds back "
            "vacuum. Above the dashed line fires PostgresIdleInTransactionTooLong: usually a "
            "session held across an external call.",
            "s",
            [Q(f"max by ({A}) (pg_app_idle_in_transaction_max_seconds{{{app}}})", lbl(A))],
            threshold=THRESHOLD_BY_NAME["pg_idle_in_transaction_seconds"].default,
        ),
        timeseries_panel(
            "Longest open transaction",
            "Age of the oldest open transaction per application, running or idle. Long "
            "transactions hold locks and row versions; compare with the pool's hold time "
            "p99 on the overview.",
            "s",
            [Q(f"max by ({A}) (pg_app_transaction_max_seconds{{{app}}})", lbl(A))],
        ),
    )

    board.row("Locks").add(
        timeseries_panel(
            "Blocked backends",
            "Backends per application waiting for a lock another backend holds (from "
            "pg_blocking_pids). Expected briefly with SELECT ... FOR UPDATE; sustained "
            "blocking makes the pool's hold time and wait time climb together.",
            "short",
            [Q(f"max by ({A}) (pg_app_blocked_backends{{{app}}})", lbl(A))],
        ),
        timeseries_panel(
            "Longest lock wait",
            "How long the longest-waiting backend of each application has waited for a "
            "lock. Find the blocker: the application with a long 'idle in transaction' is "
            "the usual culprit.",
            "s",
            [Q(f"max by ({A}) (pg_app_lock_wait_max_seconds{{{app}}})", lbl(A))],
        ),
    )

    board.row("Pool view vs server view").add(
        timeseries_panel(
            "Open connections: pools vs server",
            "Connections each pool says it has open (pool side, summed over processes) "
            "next to the backends PostgreSQL reports per application_name (server side). "
            "With application_name set per pool the pairs should match; more on the server "
            "means connections opened outside the instrumented pools, or leaked ones.",
            "short",
            [
                Q(
                    f"sum by ({s.POOL}) ({s.m('db.client.connection.count')}{{{t}}})",
                    f"pool {lbl(s.POOL)}",
                ),
                Q(
                    f"sum by ({A}) (max by ({A}, {s.PG_STATE}) (pg_app_backends{{{app}}}))",
                    f"server {lbl(A)}",
                ),
            ],
            w=24,
        ),
    )
    return board.to_dict()
