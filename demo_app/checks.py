"""The claims the demo must demonstrate (issue 4, after the seeds), checked on real figures.

Each check reads a scenario's figures from the report and says whether the seed's claim
held in this run. The runner exits non-zero when one fails, so CI notices a demo that no
longer demonstrates anything.

Claims are stated on what each seed is about (pool timeouts, hold time, requests a pool
can serve, lost or duplicated writes, charges), with a margin, and never on a wall-clock
ratio that CPU contention can flip (throughput, latency percentiles): the quick demo must
pass on a busy 2-core machine. Each check's docstring argues why it still fails if the fix
were removed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from demo_app.tables import _seconds

Figures = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Check:
    scenario: str
    claim: str
    passed: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _fmt(value: float | None, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.4g}{unit}"


#: external_call: the share of the anti-pattern's mean hold time the fix must cut. The fix
#: holds a connection for milliseconds, the anti-pattern for the whole external call
#: (seconds): ≥ 99.5% in a quiet run, down to 98.5% on a 2-core machine saturated by four
#: busy loops, where event-loop delays stretch the fix's holds to ~30 ms. 90% (200 ms)
#: leaves a 6× margin and still means "no connection is held across the call" (that
#: alone would be ≥ the latency, ~0% cut).
HOLD_CUT = 0.90
#: external_call: how many times what the pool could serve, were each request to hold a
#: connection for the external call, the fix must complete.
POOL_CAP_FACTOR = 2.0
#: external_call: the fix's requests may time out waiting for a connection at most this
#: fraction as often as the anti-pattern's. The anti-pattern's share is fixed by physics,
#: whatever the CPU: N connections held for the latency L serve at most N·T/L requests in
#: T seconds, so 80–96% of its requests time out. The fix's is zero in a quiet run and
#: with two busy loops on 2 cores, up to 3.5% with four, and 28% once, when another
#: project's test suites and demo shared the 2 cores (its holds' p99 reached 1.2 s: the
#: event loop, not the pool pattern, was starved). An absolute threshold would depend on
#: the CPU; an unfixed variant has the anti-pattern's share (a ratio of ~1).
FIX_TIMEOUT_RATIO = 0.5


def _refused(statuses: dict[str, int] | None) -> int:
    """Requests the service refused for want of a connection: a pool timeout is a 503."""
    return int((statuses or {}).get("503", 0))


def _others(statuses: dict[str, int] | None) -> str:
    """Failures that are not about the pool (transport errors, 5xx other than 503)."""
    other = {k: n for k, n in (statuses or {}).items() if not k.startswith("2") and k != "503"}
    if not other:
        return ""
    listed = ", ".join(f"{n} {k}" for k, n in sorted(other.items()))
    return f"; other failures, not the pool's: {listed}"


def _external_call(f: Figures) -> list[tuple[str, bool, str]]:
    """Seed 002: a session held across a slow external call exhausts the pool.

    Every claim is on the monitor's hold times and counts, not on a wall-clock ratio that
    CPU contention can flip, and each fails if `three_stage` kept the session open across
    the call (i.e. were the anti-pattern):

    * hold time: the anti-pattern's holds last at least the external latency, so an
      unfixed variant would cut ~0%, far from `HOLD_CUT`;
    * requests served: N connections held for L seconds each serve at most N·T/L requests
      in T seconds (physics, whatever the CPU); an unfixed variant stays under that cap,
      the fix must complete `POOL_CAP_FACTOR`× more;
    * timeouts: the anti-pattern's users (20× the connections) wait for connections held
      2× longer than `pool_timeout`, so it *must* time out, on most of its requests; the
      fix, which holds milliseconds, must time out (503) at most `FIX_TIMEOUT_RATIO` as
      often (zero unless the CPU is starved): an unfixed variant would time out as often
      as the anti-pattern. A transport error between the load generator and the service
      on a saturated CPU is shown, not counted: it says nothing about the pool.
    """
    anti, fixed = f["anti"], f["three_stage"]

    def refused_share(r: dict[str, Any]) -> float | None:
        total = r["requests_ok"] + r["requests_failed"]
        refused = max(r["pool_timeouts"], _refused(r.get("statuses")))
        return refused / total if total else None

    fixed_refused, anti_refused = refused_share(fixed), refused_share(anti)
    hold_ratio = _ratio(fixed["use_time_mean_s"], anti["use_time_mean_s"])
    cut = None if hold_ratio is None else 1 - hold_ratio
    cap = _ratio(fixed["pool_connections"] * fixed["duration_s"], fixed["external_latency_s"])
    served = _ratio(fixed["requests_ok"], cap)
    return [
        (
            f"3-stage cuts mean hold time by ≥ {HOLD_CUT:.0%} (no connection held across "
            "the external call)",
            cut is not None and cut >= HOLD_CUT,
            f"{_seconds(anti['use_time_mean_s'])} → {_seconds(fixed['use_time_mean_s'])}"
            f" ({_fmt(None if cut is None else cut * 100, '%')} less)",
        ),
        (
            f"3-stage serves ≥ {POOL_CAP_FACTOR:g}× what the pool could if each request held "
            "a connection for the call",
            served is not None and served >= POOL_CAP_FACTOR,
            f"{fixed['requests_ok']} ok vs at most {_fmt(cap)} "
            f"({fixed['pool_connections']} connections × {fixed['duration_s']:.3g} s / "
            f"{fixed['external_latency_s']:g} s; anti: {anti['requests_ok']} ok)",
        ),
        (
            "3-stage: requests time out waiting for a connection at most "
            f"{FIX_TIMEOUT_RATIO:g}× as often as anti's",
            fixed_refused is not None
            and anti_refused is not None
            and fixed_refused <= FIX_TIMEOUT_RATIO * anti_refused,
            f"{fixed['pool_timeouts']:.0f} pool timeouts, {_refused(fixed.get('statuses'))} × "
            f"503 of {fixed['requests_ok'] + fixed['requests_failed']} requests "
            f"({_fmt(None if fixed_refused is None else fixed_refused * 100, '%')}; anti: "
            f"{_fmt(None if anti_refused is None else anti_refused * 100, '%')})"
            + _others(fixed.get("statuses")),
        ),
        (
            "anti exhausts the pool (pool timeouts)",
            anti["pool_timeouts"] > 0,
            f"{anti['pool_timeouts']:.0f} timeouts, {anti['requests_failed']} failed requests",
        ),
    ]


def _pool_isolation(f: Figures) -> list[tuple[str, bool, str]]:
    """Seed 002: long background jobs on the API's pool starve the API.

    Stated on the API pool's checkout timeouts (the monitor) and the API requests refused
    with 503 for want of a connection (the clients), never on latency percentiles: on a
    saturated CPU the split variant's p99 grows with event-loop delays (1.49 s seen) while
    the shared one's is capped by the 1 s `pool_timeout`, so p99 can flip without any
    pool problem. Transport errors are shown, not counted, as for external_call.

    Jobs arrive 1.25× faster than the shared pool can serve them and hold their connection
    for the whole render (2× `pool_timeout`), so on one shared pool API reads *must* time
    out; on split pools the API pool only serves millisecond reads, nothing holds its
    connections anywhere near `pool_timeout`. Without the fix (split == shared), the
    "split" API pool would be the one the jobs fill, and its timeouts would fail the
    first claim.
    """
    shared, split = f["shared"], f["split"]

    def seen(r: dict[str, Any]) -> str:
        total = r["api_requests_ok"] + r["api_requests_failed"]
        return (
            f"{r['api_pool_timeouts']:.0f} timeouts on `{r['api_pool']}`, "
            f"{_refused(r.get('api_statuses'))} × 503 of {total} API requests"
            + _others(r.get("api_statuses"))
        )

    return [
        (
            "split pools: zero API pool timeouts and no API request refused for want of a "
            "connection",
            split["api_pool_timeouts"] == 0 and _refused(split.get("api_statuses")) == 0,
            seen(split),
        ),
        (
            "shared pool: API reads time out behind the jobs (pool timeouts > 0)",
            shared["api_pool_timeouts"] > 0,
            seen(shared),
        ),
    ]


def _lost_update(f: Figures) -> list[tuple[str, bool, str]]:
    """Seed 003: two threads × 25 read-modify-write increments of one row.

    Counts from the database. Each thread sleeps between its read and its write, so the
    naive threads overlap whatever the CPU does (contention only widens the overlap), and
    lose increments; without a lock a "fixed" variant is the naive one and ends below 50,
    failing its "exactly 50".
    """
    out = [
        (
            "naive read-modify-write loses updates",
            f["naive"]["actual"] < f["naive"]["expected"],
            f"{f['naive']['actual']} of {f['naive']['expected']}",
        )
    ]
    for variant in ("pessimistic", "optimistic"):
        r = f[variant]
        out.append(
            (
                f"{variant} lock gives exactly {r['expected']}",
                r["actual"] == r["expected"],
                f"{r['actual']} of {r['expected']} ({r['retries']} retries)",
            )
        )
    return out


def _shared_session(f: Figures) -> list[tuple[str, bool, str]]:
    """Seed 000: a heartbeat thread sharing the worker thread's `Session`.

    Counts from the monitor (handoffs, cross-thread turns, overlapping statements). The
    heartbeat fires every 10 ms while the worker runs for ≥ 0.5 s, so a shared session's
    connection changes threads in every run; with the fix undone the factory variant
    would share too and show those counts, failing "none".
    """
    shared, factory = f["shared"], f["factory"]

    def seen(r: dict[str, Any]) -> str:
        return (
            f"{r.get('handoffs', 0):.0f} handoffs, {r['cross_thread_uses']:.0f} cross-thread "
            f"and {r.get('concurrent_uses', 0):.0f} overlapping uses, {r['errors']} errors"
        )

    def changed_threads(r: dict[str, Any]) -> float:
        return r.get("handoffs", 0) + r["cross_thread_uses"] + r.get("concurrent_uses", 0)

    return [
        (
            "a shared session shows its connections changing threads",
            changed_threads(shared) > 0,
            seen(shared),
        ),
        (
            "the session factory shows none, and no errors",
            changed_threads(factory) == 0 and factory["errors"] == 0,
            seen(factory),
        ),
    ]


def _duplicate_rows(f: Figures) -> list[tuple[str, bool, str]]:
    """Seed 002 §1.1: `scalar_one_or_none()` over a non-unique `task_id`.

    Counts: the database says which task ids are duplicated, so exactly how many lookups
    must fail; no timing involved. Undo the fix and `safe` raises on the same lookups.
    """
    unsafe, safe = f["unsafe"], f["safe"]
    return [
        (
            "unsafe lookup errors on every duplicated task id",
            unsafe["errors"] > 0 and unsafe["errors"] == unsafe["lookups_of_duplicated_tasks"],
            f"{unsafe['errors']} errors, {unsafe['lookups_of_duplicated_tasks']} lookups "
            "of duplicated ids",
        ),
        ("safe lookup never errors", safe["errors"] == 0, f"{safe['errors']} errors"),
    ]


def _session_store(f: Figures) -> list[tuple[str, bool, str]]:
    """Seed 001: an in-memory store with check-then-set from 8 threads.

    Counts of stored vs written messages. Each write sleeps between its read and its
    write, so unlocked writers to one session overlap and lose writes under any CPU
    load; without the per-key lock the locked store is the unlocked one and loses them.
    """
    return [
        (
            "the unlocked store loses writes",
            f["unlocked"]["lost_writes"] > 0,
            f"{f['unlocked']['lost_writes']} of {f['unlocked']['writes']} lost",
        ),
        (
            "the locked store loses none",
            f["locked"]["lost_writes"] == 0,
            f"{f['locked']['lost_writes']} of {f['locked']['writes']} lost",
        ),
    ]


def _idempotent_payment(f: Figures) -> list[tuple[str, bool, str]]:
    """Seed 002: payments retried concurrently, 3 attempts per key.

    Charges counted by the database and by the gateway. Every naive attempt charges, so
    charges = keys × attempts; undo the unique-key claim and the idempotent variant does
    the same, failing "never twice". The seed is about double charges, so the fixed
    variant's claim is: no key charged twice, the gateway agrees with the database, and
    at least 90% of keys charged. Not "every key charged": under full load an attempt
    that claimed its key can fail on a transient error (a pool timeout, the gateway),
    and the key then ends failed, as a real payment would (a full `make demo` of a
    fresh clone saw 49 of 50). No timing involved.
    """
    naive, fixed = f["naive"], f["idempotent"]
    keys = fixed["keys"]
    gateway = fixed.get("gateway_charges", fixed["charges"])  # (figures from before it)
    return [
        (
            "naive payments double-charge retried keys",
            naive["charges"] > naive["keys"],
            f"{naive['charges']} charges for {naive['keys']} keys",
        ),
        (
            "idempotent payments never charge a key twice (the gateway agrees)",
            fixed["max_charges_per_key"] <= 1
            and gateway == fixed["charges"]
            and 0.9 * keys <= fixed["charges"] <= keys,
            f"{fixed['charges']} charges for {keys} keys (gateway: {gateway}), at most "
            f"{fixed['max_charges_per_key']} per key",
        ),
    ]


CLAIMS: dict[str, Callable[[Figures], list[tuple[str, bool, str]]]] = {
    "external_call": _external_call,
    "pool_isolation": _pool_isolation,
    "lost_update": _lost_update,
    "shared_session": _shared_session,
    "duplicate_rows": _duplicate_rows,
    "session_store": _session_store,
    "idempotent_payment": _idempotent_payment,
}


def evaluate(scenarios: dict[str, Figures]) -> list[Check]:
    """Every claim of every scenario present; a scenario that crashed fails its claims."""
    checks: list[Check] = []
    for name, figures in scenarios.items():
        if "error" in figures:
            checks.append(Check(name, "scenario ran", False, str(figures["error"])))
            continue
        try:
            for claim, passed, detail in CLAIMS[name](figures):
                checks.append(Check(name, claim, bool(passed), detail))
        except (KeyError, TypeError) as exc:
            checks.append(Check(name, "figures complete", False, f"missing figure: {exc!r}"))
    return checks
