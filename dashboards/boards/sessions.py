"""Sessions and code sites: *which code* holds connections, how long, and doing what.

The dashboard to open after the overview says "hold time is the problem": it names code
sites (`path.py:LINE:function` of the first frame outside SQLAlchemy and the monitor).
"""

from __future__ import annotations

from typing import Any

from dashboards import ruleset as r
from dashboards import series as s
from dashboards.boards.common import TAGS, lbl, pool_filter, pool_variables, target_filter
from dashboards.panels import Board, Q, query_variable, table_panel, timeseries_panel
from dashboards.thresholds import THRESHOLD_BY_NAME

UID = "pool-monitor-sessions"
P = s.POOL


def build() -> dict[str, Any]:
    f = pool_filter()
    locks = f'{target_filter()}, {s.LOCK}=~"$lock"'
    rate = "[$__rate_interval]"
    lock_anchor = s.m("app.lock.hold_time") + "_count"
    variables = [
        *pool_variables(),
        query_variable(
            "lock",
            "Lock",
            f"label_values({lock_anchor}{{{target_filter()}}}, {s.LOCK})",
            "Application lock, as named by monitor.lock(name).",
        ),
    ]
    board = Board(
        UID,
        "Pool monitor / Sessions and code sites",
        "Which code holds connections, for how long, and whether it runs SQL meanwhile; "
        "connections shared between threads; application lock contention.",
        variables,
    ).link("pool-monitor dashboards", TAGS)

    board.row("Long-held connections").add(
        timeseries_panel(
            "Oldest checkout age",
            "Age of the longest live checkout in each process. A saw-tooth that resets is "
            "normal work; a line climbing steadily is a connection that is not being "
            "returned (a leaked session, or one held across a slow call). The application "
            "logs the holder's stack once the long-held threshold passes.",
            "s",
            [Q(f"{s.m('sqlalchemy.pool.oldest_checkout_age')}{{{f}}}", lbl(P, "instance"))],
        ),
        timeseries_panel(
            "Long-held connections now",
            "Live checkouts older than the application's long-held threshold "
            "(monitor.instrument(..., long_held_threshold=)). Non-zero for a while fires "
            "PoolLongHeldConnections; the WARNING log line for each names the borrowing "
            "code site and shows what the holder is doing.",
            "short",
            [Q(f"{s.m('sqlalchemy.pool.long_held')}{{{f}}}", lbl(P, "instance"))],
        ),
        table_panel(
            "Long-held events by code site",
            "How many times each code site held a connection past the long-held threshold "
            "in the dashboard's time range. Start with the top row: open that file and line, "
            "and look for network calls, sleeps or heavy computation inside the session.",
            "short",
            [
                Q(
                    f"sort_desc(sum by ({P}, {s.SITE}) "
                    f"(increase({s.m('sqlalchemy.pool.long_held_events')}{{{f}}}[$__range])) > 0)",
                    instant=True,
                    table=True,
                )
            ],
            value_name="events",
            w=24,
        ),
    )

    board.row("Where connection time goes").add(
        timeseries_panel(
            "Connections held on average, by code site (top 10)",
            "Connection-seconds held per second by each code site = how many connections "
            "that code keeps busy on average. The sum over sites is the pool's average "
            "'used'; the top sites are where shortening hold time frees the most capacity.",
            "short",
            [Q(f"topk(10, {r.SITE_USE_RATE}{{{f}}})", lbl(P, s.SITE))],
        ),
        timeseries_panel(
            "SQL vs idle share of hold time",
            "Of the time connections were checked out, the share spent inside DBAPI "
            "execute ('SQL') and the rest ('idle': held but not executing). Idle above the "
            "dashed line (PoolHoldTimeMostlyIdle threshold) means code holds sessions across "
            "external calls, sleeps or CPU work: see the idle-in-use table below.",
            "percentunit",
            [
                Q(f"{r.IDLE_SHARE}{{{f}}}", f"{lbl(P)} idle"),
                Q(f"1 - {r.IDLE_SHARE}{{{f}}}", f"{lbl(P)} SQL"),
            ],
            max_=1,
            threshold=THRESHOLD_BY_NAME["idle_in_use_share"].default,
        ),
        table_panel(
            "Top code sites by connection-seconds held",
            "Total time connections were held by each code site over the dashboard's time "
            "range (top 20; sites beyond the exporter's top-K are summed under 'other'). "
            "Divide by the range to get connections kept busy on average.",
            "s",
            [
                Q(
                    f"topk(20, sum by ({P}, {s.SITE}) "
                    f"(increase({s.m('sqlalchemy.pool.site_use_time')}{{{f}}}[$__range])))",
                    instant=True,
                    table=True,
                )
            ],
            value_name="held",
        ),
        table_panel(
            "Top code sites by idle-in-use seconds",
            "Time each code site held a connection without executing SQL, over the "
            "dashboard's time range (top 20). The top rows are the sessions held across "
            "external API calls or slow work: read the data, release the session, do the "
            "slow work, then open a new session to write (the three-stage pattern).",
            "s",
            [
                Q(
                    f"topk(20, sum by ({P}, {s.SITE}) "
                    f"(increase({s.m('sqlalchemy.pool.site_idle_in_use_time')}{{{f}}}[$__range])))",
                    instant=True,
                    table=True,
                )
            ],
            value_name="held idle",
        ),
        timeseries_panel(
            "Idle connections held, by code site (top 10)",
            "Connections held but not executing SQL, on average, by code site. The same "
            "sites as the table above, over time: a step up after a deploy points at the "
            "change that added a slow call inside a session.",
            "short",
            [Q(f"topk(10, {r.SITE_IDLE_RATE}{{{f}}})", lbl(P, s.SITE))],
        ),
        timeseries_panel(
            "Checkouts by code site (top 10)",
            "Checkouts per second by code site. A site with many checkouts and short holds "
            "is cheap; one with few checkouts and long holds is the usual pool killer. A "
            "sudden multiplication points at a loop that opens a session per item.",
            "ops",
            [
                Q(
                    f"topk(10, sum by ({P}, {s.SITE}) "
                    f"(rate({s.m('sqlalchemy.pool.site_checkouts')}{{{f}}}{rate})))",
                    lbl(P, s.SITE),
                )
            ],
        ),
    )

    board.row("Connections shared between threads").add(
        timeseries_panel(
            "Cross-thread uses by code site",
            "Statements per second run on a connection from a thread other than the one "
            "that checked it out: a Session or Connection passed to another thread (e.g. a "
            "heartbeat thread). Should be 0; fires PoolCrossThreadConnectionUse. Fix: give "
            "the thread a session factory (sessionmaker), not a session.",
            "ops",
            [
                Q(
                    f"sum by ({P}, {s.SITE}) "
                    f"(rate({s.m('sqlalchemy.pool.cross_thread_uses')}{{{f}}}{rate}))",
                    lbl(P, s.SITE),
                )
            ],
        ),
        timeseries_panel(
            "Concurrent uses by code site",
            "Statements per second that started while another statement was running on the "
            "same connection: two threads or tasks using one session at once. Should be 0; "
            "it corrupts transactions and results. Same fix as cross-thread use.",
            "ops",
            [
                Q(
                    f"sum by ({P}, {s.SITE}) "
                    f"(rate({s.m('sqlalchemy.pool.concurrent_uses')}{{{f}}}{rate}))",
                    lbl(P, s.SITE),
                )
            ],
        ),
    )

    wait_count = s.m("app.lock.wait_time") + "_count"
    wait_sum = s.m("app.lock.wait_time") + "_sum"
    board.row("Application locks (monitor.lock)").add(
        timeseries_panel(
            "Lock wait p50 / p95 / p99",
            "Time to acquire each instrumented application lock, per service over 5 "
            "minutes. High waits mean the lock is contended: hold it for less time (no I/O "
            "inside), or split it per key.",
            "s",
            [Q(f"{r.quantile_name(r.LOCK_WAIT)}{{{locks}}}", f"{lbl(s.LOCK)} p{lbl('quantile')}")],
        ),
        timeseries_panel(
            "Lock hold p50 / p95 / p99",
            "How long each lock is held once acquired. Long holds cause the waits on the "
            "left; look for database or network calls made while holding the lock (a lock "
            "held across a checkout also holds a pool connection).",
            "s",
            [Q(f"{r.quantile_name(r.LOCK_HOLD)}{{{locks}}}", f"{lbl(s.LOCK)} p{lbl('quantile')}")],
        ),
        timeseries_panel(
            "Lock acquisitions per second",
            "How often each lock is taken. Together with hold time it gives the lock's "
            "utilisation; close to 1 second held per second, every caller queues.",
            "ops",
            [Q(f"sum by ({s.LOCK}) (rate({wait_count}{{{locks}}}{rate}))", lbl(s.LOCK))],
        ),
        timeseries_panel(
            "Callers waiting for a lock (average)",
            "Seconds spent waiting per second = callers blocked on the lock on average. "
            "Above 1 means more than one thread is always queued on that lock.",
            "short",
            [Q(f"sum by ({s.LOCK}) (rate({wait_sum}{{{locks}}}{rate}))", lbl(s.LOCK))],
        ),
    )
    return board.to_dict()
