"""Demo: each anti-pattern next to its fix(es), scenario by scenario, in the same panels.

Convention shared with `demo_app/` (see `demo_app/scenarios/__init__.py`): a scenario's
code lives in `demo_app/scenarios/<scenario>.py`, and the function holding the connection
is named `<variant>_...`, so the code-site label (`path.py:LINE:function`) tells the
variants apart: `demo_app/scenarios/external_call.py:30:anti_process_image` vs
`...:50:three_stage_process_image`. Pool isolation compares the pools themselves (`shared`
vs `api` + `background`); the session store compares lock metrics (`session-store`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dashboards import ruleset as r
from dashboards import series as s
from dashboards.boards.common import TAGS, exemplar_quantile, lbl, target_filter, target_variables
from dashboards.panels import BLUE, GREEN, RED, Board, Q, timeseries_panel

UID = "pool-monitor-demo"
ANTI_COLOR = RED
FIX_COLORS = (GREEN, BLUE, "purple")
#: The lock of the session-store scenario (`monitor.lock("session-store", key=...)`).
SESSION_STORE_LOCK = "session-store"
SHARED_POOL, SPLIT_POOLS = "shared", ("api", "background")


def site_regex(scenario: str, variant: str) -> str:
    """code_site regex of one variant's functions in a scenario's module."""
    return f"demo_app/scenarios/{scenario}.py:[0-9]+:{variant}_.*"


@dataclass(frozen=True)
class Measure:
    """One thing to compare between variants, as a function of a code_site matcher."""

    title: str
    unit: str
    what: str
    expr: Callable[[str], str]
    #: Counts and rates read 0 when a variant produced no series at all (a fix that never
    #: uses a connection across threads has no such counter): a flat line at 0 says more
    #: than "No data". Not for ratios, where 0 would be a claim.
    absent_is_zero: bool = True


def _rate(metric: str, sites: str) -> str:
    return f"sum(rate({metric}{{{sites}}}[$__rate_interval]))"


HELD = Measure(
    "Connections held (average)",
    "short",
    "connection-seconds held per second by the variant's code = connections it keeps busy",
    lambda m: _rate(s.m("sqlalchemy.pool.site_use_time"), m),
)
IDLE_SHARE = Measure(
    "Share of hold time without SQL",
    "percentunit",
    "of the time the variant's code held a connection, the share it ran no SQL",
    lambda m: (
        f"{_rate(s.m('sqlalchemy.pool.site_idle_in_use_time'), m)} / "
        f"{_rate(s.m('sqlalchemy.pool.site_use_time'), m)}"
    ),
    absent_is_zero=False,
)
CHECKOUTS = Measure(
    "Checkouts per second",
    "ops",
    "connections checked out per second by the variant's code",
    lambda m: _rate(s.m("sqlalchemy.pool.site_checkouts"), m),
)
LONG_HELD = Measure(
    "Long-held events per second",
    "ops",
    "checkouts that passed the long-held threshold (each also logs the holder's stack)",
    lambda m: _rate(s.m("sqlalchemy.pool.long_held_events"), m),
)
CROSS_THREAD = Measure(
    "Cross-thread uses per second",
    "ops",
    "statements run from a thread other than the one that checked the connection out",
    lambda m: _rate(s.m("sqlalchemy.pool.cross_thread_uses"), m),
)
CONCURRENT = Measure(
    "Concurrent uses per second",
    "ops",
    "statements overlapping another statement on the same connection",
    lambda m: _rate(s.m("sqlalchemy.pool.concurrent_uses"), m),
)


@dataclass(frozen=True)
class Scenario:
    """A demo scenario: its variants (anti-pattern first) and what to compare.

    Scenarios with `measures` compare code sites; the others have their own row builder.
    """

    key: str
    title: str
    story: str
    variants: tuple[str, ...]
    measures: Sequence[Measure] = ()

    @property
    def anti(self) -> str:
        return self.variants[0]

    @property
    def fixes(self) -> tuple[str, ...]:
        return self.variants[1:]


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "external_call",
        "session held across an external API call",
        "The anti-pattern keeps its session (and connection) open while it calls a slow "
        "external API; the three-stage fix reads, releases the connection, calls the API, "
        "then opens a new short session to write. Expect the fix to hold a fraction of the "
        "connections, with almost no idle share and no long-held events.",
        ("anti", "three_stage"),
        (HELD, IDLE_SHARE, LONG_HELD),
    ),
    Scenario(
        "pool_isolation",
        "one pool for API requests and background jobs",
        "In the anti-pattern long background jobs and quick API reads share the pool "
        f"'{SHARED_POOL}', so the jobs starve the API; the fix runs jobs on "
        f"'{SPLIT_POOLS[1]}' and the API on '{SPLIT_POOLS[0]}'. Expect the API pool's wait "
        "and timeouts to stay flat under the same background load.",
        ("shared", "split"),
    ),
    Scenario(
        "duplicate_rows",
        "scalar_one_or_none() over duplicate rows",
        "Duplicate task_ids make scalar_one_or_none() raise MultipleResultsFound in the "
        "unsafe variant; the safe one orders and limits to one row. The correctness "
        "result is in the scenario runner's report; here: the connection cost of each.",
        ("unsafe", "safe"),
        (CHECKOUTS, HELD),
    ),
    Scenario(
        "idempotent_payment",
        "retried payments without an idempotency key",
        "Retried payment requests charge twice in the naive variant; the idempotent one "
        "records an Idempotency-Key with ON CONFLICT first. Double charges are in the "
        "scenario runner's report; here: hold time and idle share (the payment API call "
        "must not happen inside a session).",
        ("naive", "idempotent"),
        (HELD, IDLE_SHARE, CHECKOUTS),
    ),
    Scenario(
        "lost_update",
        "read-modify-write from two threads",
        "Two threads incrementing one row lose updates in the naive variant; the "
        "pessimistic fix locks the row (with_for_update), the optimistic one checks a "
        "version column and retries. Lost updates are in the runner's report; here: "
        "locking shows as longer holds (waiting on the row lock), retries as more checkouts.",
        ("naive", "pessimistic", "optimistic"),
        (CHECKOUTS, HELD),
    ),
    Scenario(
        "shared_session",
        "one Session shared with a heartbeat thread",
        "The anti-pattern hands the main thread's Session to a heartbeat thread; the fix "
        "passes a session factory so each thread opens its own. Expect cross-thread and "
        "concurrent uses only for the shared variant.",
        ("shared", "factory"),
        (CROSS_THREAD, CONCURRENT, HELD),
    ),
    Scenario(
        "session_store",
        "in-memory session store written by many threads",
        "The unlocked store (a dict with check-then-set) loses writes and takes no lock, so "
        "it shows nothing here: its lost writes are in the runner's report. The locked fix "
        f"(monitor.lock('{SESSION_STORE_LOCK}', key=session_id)) is correct, and these "
        "panels show what its lock costs.",
        ("unlocked", "locked"),
    ),
)


def _legend(role: str, name: str) -> str:
    return f"{role}: {name}"


def _colors(sc: Scenario) -> dict[str, str]:
    colors = {f"^anti-pattern: {sc.anti}.*": ANTI_COLOR}
    if len(sc.fixes) > len(FIX_COLORS):
        raise ValueError(f"{sc.key}: more fixes than fix colours")
    colors.update(
        {
            f"^fix: {fix}.*": color
            for fix, color in zip(sc.fixes, FIX_COLORS[: len(sc.fixes)], strict=True)
        }
    )
    return colors


def _site_panel(sc: Scenario, measure: Measure, w: int) -> Any:
    t = target_filter()

    def query(role: str, variant: str) -> Q:
        expr = measure.expr(f'{t}, {s.SITE}=~"{site_regex(sc.key, variant)}"')
        if measure.absent_is_zero:
            expr = f"{expr} or vector(0)"
        return Q(expr, _legend(role, f"{variant}_*"))

    queries = [query("anti-pattern", sc.anti), *(query("fix", fix) for fix in sc.fixes)]
    return timeseries_panel(
        measure.title,
        f"{measure.title}: {measure.what}. {sc.story}",
        measure.unit,
        queries,
        w=w,
        colors=_colors(sc),
        max_=1 if measure.unit == "percentunit" else None,
    )


def _pool_isolation_panels(sc: Scenario) -> list[Any]:
    t = target_filter()
    anti = f'{t}, {s.POOL}="{SHARED_POOL}"'
    fix = f'{t}, {s.POOL}=~"{"|".join(SPLIT_POOLS)}"'
    colors = {"^anti-pattern.*": ANTI_COLOR, "^fix.*": GREEN}
    pool = lbl(s.POOL)
    timeouts = s.m("db.client.connection.timeouts")
    return [
        timeseries_panel(
            "Wait time p95 by pool",
            f"95th percentile wait for a connection, per pool. Dots are exemplars: traced "
            f"checkouts, each linking to its trace. {sc.story}",
            "s",
            [
                exemplar_quantile(r.WAIT, "0.95", anti, _legend("anti-pattern", pool)),
                exemplar_quantile(r.WAIT, "0.95", fix, _legend("fix", pool)),
            ],
            w=8,
            colors=colors,
        ),
        timeseries_panel(
            "Saturation by pool",
            f"Connections used / max of each pool (busiest process). {sc.story}",
            "percentunit",
            [
                Q(f"max by ({s.POOL}) ({r.SATURATION}{{{anti}}})", _legend("anti-pattern", pool)),
                Q(f"max by ({s.POOL}) ({r.SATURATION}{{{fix}}})", _legend("fix", pool)),
            ],
            w=8,
            max_=1,
            colors=colors,
        ),
        timeseries_panel(
            "Checkout timeouts by pool",
            f"Checkouts per second that failed after pool_timeout, per pool. {sc.story}",
            "ops",
            [
                Q(
                    f"sum by ({s.POOL}) (rate({timeouts}{{{anti}}}[$__rate_interval]))",
                    _legend("anti-pattern", pool),
                ),
                Q(
                    f"sum by ({s.POOL}) (rate({timeouts}{{{fix}}}[$__rate_interval]))",
                    _legend("fix", pool),
                ),
            ],
            w=8,
            colors=colors,
        ),
    ]


def _session_store_panels(sc: Scenario) -> list[Any]:
    locks = f'{target_filter()}, {s.LOCK}="{SESSION_STORE_LOCK}"'
    fix = sc.fixes[0]
    colors = {"^fix.*": GREEN}
    return [
        timeseries_panel(
            "Session-store lock wait p50 / p95 / p99",
            f"Time to acquire the session-store lock. {sc.story}",
            "s",
            [
                Q(
                    f"{r.quantile_name(r.LOCK_WAIT)}{{{locks}}}",
                    _legend("fix", f"{fix} p{lbl('quantile')}"),
                )
            ],
            w=8,
            colors=colors,
        ),
        timeseries_panel(
            "Session-store lock hold p50 / p95 / p99",
            f"How long the session-store lock is held once acquired. {sc.story}",
            "s",
            [
                Q(
                    f"{r.quantile_name(r.LOCK_HOLD)}{{{locks}}}",
                    _legend("fix", f"{fix} p{lbl('quantile')}"),
                )
            ],
            w=8,
            colors=colors,
        ),
        timeseries_panel(
            "Callers waiting for the session-store lock",
            "Seconds spent waiting per second = callers blocked on the lock on average. "
            f"{sc.story}",
            "short",
            [
                Q(
                    f"sum(rate({s.m('app.lock.wait_time')}_sum{{{locks}}}[$__rate_interval]))",
                    _legend("fix", f"{fix} waiting"),
                )
            ],
            w=8,
            colors=colors,
        ),
    ]


_CUSTOM_ROWS: dict[str, Callable[[Scenario], list[Any]]] = {
    "pool_isolation": _pool_isolation_panels,
    "session_store": _session_store_panels,
}


def build() -> dict[str, Any]:
    board = Board(
        UID,
        "Pool monitor / Demo: anti-pattern vs fix",
        "The demo's scenarios side by side: each row runs one anti-pattern and its fix(es) "
        "from the seed documents; red series are the anti-pattern, green/blue the fixes.",
        target_variables(s.m("db.client.connection.count")),
    ).link("pool-monitor dashboards", TAGS)
    for sc in SCENARIOS:
        board.row(f"{sc.key}: {sc.title} ({' vs '.join(sc.variants)})")
        if sc.key in _CUSTOM_ROWS:
            board.add(*_CUSTOM_ROWS[sc.key](sc))
        else:
            w = 24 // len(sc.measures)
            board.add(*(_site_panel(sc, m, w) for m in sc.measures))
    return board.to_dict()
