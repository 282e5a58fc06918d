"""Pool overview: is a pool running dry, since when, and is it waiting, holding or connecting?

The first dashboard an on-call engineer opens for "requests are slow / timing out".
"""

from __future__ import annotations

from typing import Any

from dashboards import ruleset as r
from dashboards import series as s
from dashboards.boards.common import (
    TAGS,
    exemplar_quantile,
    lbl,
    pool_filter,
    pool_variables,
    target_filter,
)
from dashboards.panels import (
    GREEN,
    ORANGE,
    RED,
    Board,
    Q,
    heatmap_panel,
    joined_table_panel,
    stat_panel,
    timeseries_panel,
)
from dashboards.thresholds import THRESHOLD_BY_NAME
from monitor.sizing import Target

UID = "pool-monitor-overview"
P = s.POOL


def build() -> dict[str, Any]:
    f = pool_filter()
    saturation_limit = THRESHOLD_BY_NAME["pool_saturation_ratio"].default
    wait_limit = THRESHOLD_BY_NAME["wait_time_p95_seconds"].default
    rate = "[$__rate_interval]"
    dots = (
        "Dots are exemplars: a recent traced checkout per histogram bucket, at its own "
        "duration; hover for its trace_id, click it to open the trace. They come with the "
        "'p99 (short window)' line, the p99 over Grafana's rate interval read from the raw "
        "histogram (recording rules keep no exemplars)."
    )
    short_p99 = f"{lbl(P)} p99 (short window)"
    board = Board(
        UID,
        "Pool monitor / Pool overview",
        "Is a SQLAlchemy pool running dry, and is the time going to waiting for a connection, "
        "holding one, or opening new ones?",
        pool_variables(),
    ).link("pool-monitor dashboards", TAGS)

    board.row("Is the pool running dry?").add(
        stat_panel(
            "Saturation now (worst process)",
            "Connections in use / the pool's maximum (pool_size + max_overflow), for the "
            "busiest process of each pool. Red at the PoolSaturated alert threshold: the next "
            "burst of requests will queue. Check the 'Sessions and code sites' dashboard for "
            "what holds connections before raising pool_size.",
            "percentunit",
            [Q(f"max by ({P}) ({r.SATURATION}{{{f}}})", lbl(P))],
            steps=((None, GREEN), (0.7, ORANGE), (saturation_limit, RED)),
        ),
        stat_panel(
            "Callers waiting now",
            "Callers blocked in pool.connect() waiting for a connection, summed over "
            "processes. Anything above zero for long means every connection is checked out; "
            "see the wait-time panels below.",
            "short",
            [Q(f"sum by ({P}) ({s.m('db.client.connection.pending_requests')}{{{f}}})", lbl(P))],
            steps=((None, GREEN), (1, RED)),
        ),
        stat_panel(
            "Checkout timeouts in range",
            "Checkouts that gave up after pool_timeout (the caller got "
            "sqlalchemy.exc.TimeoutError) in the dashboard's time range. Any is a failed "
            "request: see the PoolCheckoutTimeouts runbook.",
            "short",
            [
                Q(
                    f"sum by ({P}) (increase({s.m('db.client.connection.timeouts')}{{{f}}}"
                    "[$__range]))",
                    lbl(P),
                    instant=True,
                )
            ],
            steps=((None, GREEN), (1, RED)),
        ),
        stat_panel(
            "pool-monitor errors in range",
            "Exceptions swallowed by pool-monitor itself: in the application's hooks, and in "
            "the sidecar while reading worker snapshots. Must be 0; otherwise the numbers on "
            "these dashboards may be wrong. The application/sidecar log has the traceback.",
            "short",
            [
                Q(
                    f"sum(increase({s.m('pool_monitor.errors')}{{{f}}}[$__range])) or vector(0)",
                    "hooks",
                    instant=True,
                ),
                Q(
                    f"sum(increase({s.SNAPSHOT_ERRORS}{{{target_filter()}}}[$__range])) "
                    "or vector(0)",
                    "snapshots",
                    instant=True,
                ),
            ],
            steps=((None, GREEN), (1, RED)),
        ),
    )

    board.row("Connections").add(
        timeseries_panel(
            "Connections by state vs max: $pool",
            "Open connections of this pool summed over processes, stacked by state: 'used' "
            "are checked out by the application, 'idle' wait in the pool. Dashed lines: "
            "pool_size (idle connections kept) and max (pool_size + max_overflow). Above "
            "pool_size the pool runs on overflow connections; when 'used' reaches max, new "
            "checkouts wait. Idle at zero with used at max: pool too small or held too long.",
            "short",
            [
                Q(
                    f"sum by ({s.STATE_LABEL}) ({s.m('db.client.connection.count')}{{{f}}})",
                    lbl(s.STATE_LABEL),
                ),
                Q(f"sum({s.m('db.client.connection.max')}{{{f}}})", "max"),
                Q(f"sum({s.m('db.client.connection.idle.max')}{{{f}}})", "pool_size"),
            ],
            stack=True,
            unstacked=("max", "pool_size"),
            colors={"^pool_size$": ORANGE},
            repeat="pool",
        ),
        timeseries_panel(
            "Saturation by process",
            "used / max for each pool in each process (a pool lives in one process, so one "
            "saturated replica can hide in a sum). The dashed line is the PoolSaturated "
            "threshold. One replica high and others low: uneven load balancing or a stuck "
            "request there; all high: look at hold time and code sites.",
            "percentunit",
            [Q(f"{r.SATURATION}{{{f}}}", lbl(P, "instance"))],
            max_=1,
            threshold=saturation_limit,
        ),
        timeseries_panel(
            "Overflow connections",
            "Connections open beyond pool_size (up to max_overflow). They are closed when "
            "returned, so a pool living in overflow pays connect time on most checkouts "
            "(see 'Connect time'). Persistent overflow: pool_size is too small for the load.",
            "short",
            [Q(f"{s.m('sqlalchemy.pool.overflow')}{{{f}}}", lbl(P, "instance"))],
        ),
        timeseries_panel(
            "Callers waiting (pending requests)",
            "Callers waiting for a connection, per process. Sustained non-zero fires "
            "PoolPendingRequestsSustained. Every waiting caller adds the wait time below to "
            "its request.",
            "short",
            [Q(f"{s.m('db.client.connection.pending_requests')}{{{f}}}", lbl(P, "instance"))],
        ),
    )

    board.row("Waiting for a connection").add(
        timeseries_panel(
            "Wait time p50 / p95 / p99",
            "How long pool.connect() took, from asking the pool to getting a connection "
            "(includes opening a new one and pre-ping), per service over 5 minutes. A healthy "
            "pool answers in well under a millisecond. The dashed line is the "
            f"PoolWaitTimeP95High threshold. {dots}",
            "s",
            [
                Q(f"{r.quantile_name(r.WAIT)}{{{f}}}", f"{lbl(P)} p{lbl('quantile')}"),
                exemplar_quantile(r.WAIT, "0.99", f, short_p99),
            ],
            threshold=wait_limit,
        ),
        heatmap_panel(
            "Wait-time distribution",
            "Checkouts per second by how long they waited (histogram buckets over Grafana's "
            "rate interval). A second band appearing at pool_timeout or at a round number of "
            "seconds means callers queue behind connections held for that long. Dots are "
            "exemplars: traced checkouts in their bucket; click one for its trace.",
            "s",
            Q(
                f"sum by (le) (rate({s.bucket(r.WAIT)}{{{f}}}{rate}))",
                "{{le}}",
                heatmap=True,
                exemplar=True,
            ),
        ),
        timeseries_panel(
            "Checkout timeouts",
            "Checkouts per second that failed with TimeoutError after pool_timeout. Each is a "
            "failed request. Fires PoolCheckoutTimeouts.",
            "ops",
            [
                Q(
                    f"sum by ({P}) (rate({s.m('db.client.connection.timeouts')}{{{f}}}{rate}))",
                    lbl(P),
                )
            ],
        ),
        timeseries_panel(
            "Checkouts per second",
            "Connections checked out per second: the load on the pool. Compare with wait and "
            "hold time: more checkouts with the same hold time needs proportionally more "
            "connections (Little's law: connections in use = checkouts/s x hold time).",
            "ops",
            [Q(f"sum by ({P}) (rate({s.m('sqlalchemy.pool.checkouts')}{{{f}}}{rate}))", lbl(P))],
        ),
    )

    board.row("Holding and opening connections").add(
        timeseries_panel(
            "Hold (use) time p50 / p99",
            "How long connections stay checked out, checkout to return, per service over 5 "
            "minutes. Hold time is what sizes the pool. A p99 of seconds usually means a "
            "session held across an external call: the 'Sessions and code sites' dashboard "
            f"names the code, the trace of a slow hold's dot shows the request. {dots}",
            "s",
            [
                Q(f"{r.quantile_name(r.USE)}{{{f}}}", f"{lbl(P)} p{lbl('quantile')}"),
                exemplar_quantile(r.USE, "0.99", f, short_p99),
            ],
        ),
        timeseries_panel(
            "Connect time p50 / p99",
            "Time to open a new DBAPI connection (TCP, TLS, authentication). Rises with "
            "database load or network trouble; frequent connects (see overflow, "
            "invalidations) multiply its cost.",
            "s",
            [Q(f"{r.quantile_name(r.CREATE)}{{{f}}}", f"{lbl(P)} p{lbl('quantile')}")],
        ),
        timeseries_panel(
            "Invalidations by kind",
            "Connections thrown away per second. 'hard': closed at once (usually a "
            "disconnect error: database restart, failover, idle timeout on a proxy). 'soft': "
            "replaced at next checkout (pool_recycle or pool-wide invalidation).",
            "ops",
            [
                Q(
                    f"sum by ({P}, {s.KIND_LABEL}) "
                    f"(rate({s.m('sqlalchemy.pool.invalidations')}{{{f}}}{rate}))",
                    lbl(P, s.KIND_LABEL),
                )
            ],
        ),
        timeseries_panel(
            "Connect errors",
            "Failed attempts to open a DBAPI connection per second: database down, "
            "max_connections reached, bad credentials or network. Compare with the "
            "PostgreSQL dashboard's backends vs max_connections.",
            "ops",
            [
                Q(
                    f"sum by ({P}) (rate({s.m('sqlalchemy.pool.connect_errors')}{{{f}}}{rate}))",
                    lbl(P),
                )
            ],
        ),
    )

    sizing_row(board, f)

    # Every sidecar watching the server sees the same lock waits: max over them, not sum.
    by_root = f"max by ({s.SITE}, {P})"
    board.row("Blocking: whose transactions hold the locks others wait for").add(
        timeseries_panel(
            "Sessions blocked, by root blocker's code site",
            "Database sessions waiting on a lock behind a root blocker (a session that "
            "blocks others and waits on nobody), directly or behind other waiters, by the "
            "code site and pool that checked the root's connection out; (unknown) is a "
            "session no instrumented pool holds (psql, a migration, a cron job) or one held "
            "in another pod. The dashed line is the PoolCodeSiteBlockingSessions threshold. "
            "The sidecar's /api/blocking and live page show the tree and what the root is "
            "doing.",
            "short",
            [
                Q(
                    f'{by_root} ({s.BLOCKED_BACKENDS}{{{f}, kind="transitive"}})',
                    f"{lbl(s.SITE)} {lbl(P)}",
                )
            ],
            w=8,
            threshold=THRESHOLD_BY_NAME["blocking_sessions"].default,
        ),
        timeseries_panel(
            "Longest lock wait, by root blocker's code site",
            "The longest current lock wait among the sessions each root blocker's code site "
            "and pool block. A wait that grows without reset is a transaction left open: "
            "usually idle in transaction while the code does something else (an external "
            "call inside a session).",
            "s",
            [Q(f"{by_root} ({s.BLOCKING_LOCK_WAIT}{{{f}}})", f"{lbl(s.SITE)} {lbl(P)}")],
            w=8,
        ),
        timeseries_panel(
            "Longest lock-wait chain",
            "Edges on the longest chain of lock waits under any root blocker: 1 means "
            "sessions wait on the root directly, 2 or more that waiters themselves hold "
            "locks others queue for (a pile-up growing behind one holder). 0: nothing blocks.",
            "short",
            [Q(f"max({s.BLOCKING_CHAIN}{{{target_filter()}}})", "longest chain")],
            w=8,
        ),
    )
    return board.to_dict()


#: Said by every Sizing panel: the unit the model works in.
PER_PROCESS = (
    "The model is per process: each worker process has its own pool, so the load, the size "
    "and the waits are one process's (sidecar gauges: the highest over pods)."
)


def sizing_row(board: Board, f: str) -> None:
    """The sidecar's sizing advice (Erlang C per process, `/api/advice`) next to what the
    pool measured: the advice gauges, and the recording rules' inputs of the same model."""
    target = Target()
    by_pool = f"max by ({P})"
    size = f"{s.m('db.client.connection.max')}{{{f}}} / {s.ADVICE_PROCESSES}{{{f}}}"
    board.row("Sizing: how big should the pool be? (advice per process, next to the wait)").add(
        timeseries_panel(
            "Offered load vs size, per process",
            "Connections in use on average in one process (offered load = arrival rate per "
            "process x mean hold, in Erlangs, over the sidecar's advice window) against one "
            "process's pool size, pool_size + max_overflow (dashed). Load well below the "
            "size: checkouts rarely wait. Close to it: they queue; at or above it the queue "
            f"grows without bound until checkouts time out. {PER_PROCESS}",
            "short",
            [
                Q(f"{by_pool} ({s.ADVICE_OFFERED_LOAD}{{{f}}})", f"{lbl(P)} offered load"),
                Q(f"{by_pool} ({size})", f"{lbl(P)} size"),
            ],
            w=8,
            dashed=(" size$",),
        ),
        timeseries_panel(
            "P(wait): predicted vs measured",
            "Share of checkouts that wait for a connection. 'predicted': Erlang C at the "
            "current size, from the measured arrival rate and hold. 'measured': the share "
            "that waited 1 ms or more, over the sidecar's window (per pod) and over 5 "
            "minutes from Prometheus ('5m', all pods of the service). The dashed line is the "
            f"default target ({target.p_wait:.0%}). Measured far above predicted: bursty "
            "arrivals or holds that grow with load; the model does not fit, trust the "
            f"measurement (see the warnings in the table). {PER_PROCESS}",
            "percentunit",
            [
                Q(f"{by_pool} ({s.ADVICE_PREDICTED_P_WAIT}{{{f}}})", f"{lbl(P)} predicted"),
                Q(f"{by_pool} ({s.ADVICE_MEASURED_P_WAIT}{{{f}}})", f"{lbl(P)} measured"),
                Q(f"{r.WAITED_RATIO}{{{f}}}", f"{lbl(P)} measured (5m)"),
            ],
            w=8,
            threshold=target.p_wait,
        ),
        timeseries_panel(
            "Mean wait per checkout: predicted vs measured",
            "Mean wait for a connection over all checkouts (those that did not wait count "
            "as 0). 'predicted': Erlang C at the current size (no line while the load "
            "reaches the size: the wait is unbounded). 'measured': from the wait-time "
            "histogram, over the sidecar's window and over 5 minutes ('5m', all pods). The "
            f"dashed line is the default target ({target.mean_wait_s * 1000:g} ms). "
            f"{PER_PROCESS}",
            "s",
            [
                Q(f"{by_pool} ({s.ADVICE_PREDICTED_WAIT}{{{f}}})", f"{lbl(P)} predicted"),
                Q(f"{by_pool} ({s.ADVICE_MEASURED_WAIT}{{{f}}})", f"{lbl(P)} measured"),
                Q(f"{r.WAIT_MEAN}{{{f}}}", f"{lbl(P)} measured (5m)"),
            ],
            w=8,
            threshold=target.mean_wait_s,
        ),
        joined_table_panel(
            "Pool size per process: current vs recommended",
            "Per pool: the worker processes serving it, one process's size now "
            "(pool_size + max_overflow), the smallest size Erlang C says meets the target "
            "(P(wait) and mean wait below the sidecar's --advice-target-*), and how many "
            "reasons the model may not fit now (too few checkouts, no size, load at or "
            "above the size, measured P(wait) far from predicted, bursty arrivals, hold "
            "time rising with load). The sidecar's /api/advice says those warnings in "
            "words; a non-zero count means read them before resizing. Set pool_size + "
            f"max_overflow per process to the recommendation. {PER_PROCESS}",
            "short",
            [
                ("processes", _instant(f"{by_pool} ({s.ADVICE_PROCESSES}{{{f}}})")),
                ("size now", _instant(f"{by_pool} ({size})")),
                ("recommended", _instant(f"{by_pool} ({s.ADVICE_RECOMMENDED}{{{f}}})")),
                ("model warnings", _instant(f"{by_pool} ({s.ADVICE_WARNINGS}{{{f}}})")),
            ],
            sort_by="model warnings",
            colored={"model warnings": ((None, GREEN), (1, ORANGE))},
            w=10,
        ),
        timeseries_panel(
            "Fleet connections: current vs recommended sizes vs the server",
            "Connections every pod, process and pool may open at their current sizes (sum "
            "of max), the same at the recommended sizes (recommended x processes, summed), "
            "and the connections the PostgreSQL server lets ordinary roles open "
            "(max_connections - reserved, dashed). Fleet-wide: the filters above do not "
            "apply, and one database server is assumed. Either sum above the dashed line: "
            "a burst can fail with 'remaining connection slots are reserved'.",
            "short",
            [
                Q(r.FLEET_MAX, "at current sizes"),
                Q(r.FLEET_RECOMMENDED, "at recommended sizes"),
                Q(
                    "max(pg_max_connections) - max(pg_reserved_connections)",
                    "server's usable connections",
                ),
            ],
            w=10,
            unstacked=("server's usable connections",),
        ),
        stat_panel(
            "Fleet budget used",
            "The fleet's maximum connections (every pod, process and pool at its current "
            "size) as a share of the server's usable connections (max_connections - "
            "reserved). Orange from the PostgresConnectionsNearLimit threshold, red above "
            "100%: the pools together may open more connections than the server accepts. "
            "Fleet-wide, one database server assumed.",
            "percentunit",
            [Q(r.FLEET_BUDGET, "fleet")],
            w=4,
            h=8,
            steps=(
                (None, GREEN),
                (THRESHOLD_BY_NAME["pg_connections_usage_ratio"].default, ORANGE),
                (1, RED),
            ),
        ),
    )


def _instant(expr: str) -> Q:
    return Q(expr, instant=True, table=True)
