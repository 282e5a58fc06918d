"""The claims the demo must demonstrate (issue 4, after the seeds), checked on real figures.

Each check reads a scenario's figures from the report and says whether the seed's claim
held in this run. The runner exits non-zero when one fails, so CI notices a demo that no
longer demonstrates anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

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


def _external_call(f: Figures) -> list[tuple[str, bool, str]]:
    anti, fixed = f["anti"], f["three_stage"]
    hold_ratio = _ratio(fixed["use_time_mean_s"], anti["use_time_mean_s"])
    cut = None if hold_ratio is None else 1 - hold_ratio
    speedup = _ratio(fixed["throughput_rps"], anti["throughput_rps"])
    return [
        (
            "3-stage cuts mean hold time by ≥ 99%",
            cut is not None and cut >= 0.99,
            f"{_fmt(anti['use_time_mean_s'], ' s')} → {_fmt(fixed['use_time_mean_s'], ' s')}"
            f" ({_fmt(None if cut is None else cut * 100, '%')} less)",
        ),
        (
            "3-stage serves ≥ 10× the throughput of anti",
            speedup is not None and speedup >= 10,
            f"{anti['throughput_rps']:.3g} → {fixed['throughput_rps']:.3g} req/s"
            f" ({_fmt(speedup, '×')})",
        ),
        (
            "3-stage has zero failures",
            fixed["requests_failed"] == 0,
            f"{fixed['requests_failed']} failed",
        ),
        (
            "anti exhausts the pool (pool timeouts)",
            anti["pool_timeouts"] > 0,
            f"{anti['pool_timeouts']:.0f} timeouts, {anti['requests_failed']} failed requests",
        ),
    ]


def _pool_isolation(f: Figures) -> list[tuple[str, bool, str]]:
    shared, split = f["shared"], f["split"]
    p99_shared, p99_split = shared["api_latency_p99_s"], split["api_latency_p99_s"]
    degraded = shared["api_requests_failed"] > 0 or (
        p99_shared is not None and p99_split is not None and p99_shared >= 10 * p99_split
    )
    return [
        (
            "split pools: zero API failures",
            split["api_requests_failed"] == 0,
            f"{split['api_requests_failed']} failed of "
            f"{split['api_requests_ok'] + split['api_requests_failed']}",
        ),
        (
            "split pools keep API p99 lower than the shared pool",
            p99_split is not None and p99_shared is not None and p99_split < p99_shared,
            f"p99 {_fmt(p99_shared, ' s')} shared vs {_fmt(p99_split, ' s')} split",
        ),
        (
            "shared pool degrades the API (failures or ≥ 10× p99)",
            degraded,
            f"{shared['api_requests_failed']} failed, p99 {_fmt(p99_shared, ' s')}",
        ),
    ]


def _lost_update(f: Figures) -> list[tuple[str, bool, str]]:
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
    naive, fixed = f["naive"], f["idempotent"]
    return [
        (
            "naive payments double-charge retried keys",
            naive["charges"] > naive["keys"],
            f"{naive['charges']} charges for {naive['keys']} keys",
        ),
        (
            "idempotent payments charge exactly once per key",
            fixed["charges"] == fixed["keys"] and fixed["max_charges_per_key"] == 1,
            f"{fixed['charges']} charges for {fixed['keys']} keys",
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
