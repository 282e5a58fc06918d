"""The seven scenarios, each an anti-pattern from a seed document next to its fix.

Every module holds the scenario's logic only (no HTTP), so it can be called from the
service's routes, from tests, or from a notebook. The function that checks out or holds a
connection in each variant is named `<variant>_<what>`: the monitor labels hold time by
code site (`file:line:function`), so the dashboards tell the variants apart by that name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScenarioInfo:
    """A scenario's variants, anti-pattern first, and where it comes from."""

    name: str
    variants: tuple[str, ...]
    seed: str
    summary: str

    @property
    def anti(self) -> str:
        return self.variants[0]

    @property
    def fixes(self) -> tuple[str, ...]:
        return self.variants[1:]


SCENARIOS: dict[str, ScenarioInfo] = {
    s.name: s
    for s in (
        ScenarioInfo(
            "external_call",
            ("anti", "three_stage"),
            "002",
            "session held across a slow external call vs the 3-stage pattern",
        ),
        ScenarioInfo(
            "pool_isolation",
            ("shared", "split"),
            "002",
            "long background jobs on the API's pool vs on their own pool",
        ),
        ScenarioInfo(
            "duplicate_rows",
            ("unsafe", "safe"),
            "002",
            "scalar_one_or_none() over duplicate task_ids vs order_by().limit(1)",
        ),
        ScenarioInfo(
            "idempotent_payment",
            ("naive", "idempotent"),
            "002",
            "retried payments without protection vs an Idempotency-Key with ON CONFLICT",
        ),
        ScenarioInfo(
            "lost_update",
            ("naive", "pessimistic", "optimistic"),
            "003",
            "read-modify-write from 2 threads vs with_for_update() vs version_id_col + retry",
        ),
        ScenarioInfo(
            "shared_session",
            ("shared", "factory"),
            "000",
            "one Session shared with a heartbeat thread vs a session factory per thread",
        ),
        ScenarioInfo(
            "session_store",
            ("unlocked", "locked"),
            "001",
            "in-memory session store with check-then-set vs per-key locks (monitor.lock)",
        ),
    )
}
