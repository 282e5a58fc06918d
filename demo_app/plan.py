"""How hard and how long the runner pushes each scenario: `--quick` or the full run.

Load is sized against the pools (see `demo_app.settings`), not in absolute terms: the
external-call users outnumber the API pool's connections over both workers (6) by 20×,
which is what lets the 3-stage pattern show ≥ 10× the throughput of the anti-pattern
(whose throughput is capped at connections / latency); background jobs arrive exactly as
fast as the shared pool can serve them, so that pool is always full.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    name: str
    # external_call: closed-loop users, per variant
    external_users: int
    external_duration_s: float
    # pool_isolation: API users (closed loop) while jobs keep the job pool full
    isolation_api_users: int
    isolation_api_think_s: float
    isolation_duration_s: float
    # duplicate_rows
    duplicate_tasks: int
    duplicate_every: int  # every n-th task is created twice (a client retry)
    duplicate_requests: int
    duplicate_users: int
    # idempotent_payment
    payment_keys: int
    payment_retries: int  # concurrent attempts per key
    # lost_update (the seed's numbers)
    lost_update_threads: int = 2
    lost_update_increments: int = 25
    # shared_session
    shared_session_runs: int = 3
    # session_store
    store_threads: int = 8
    store_sessions: int = 4
    store_writes: int = 400
    # sizing: seconds per load level of the Erlang C check (demo_app.sizing)
    sizing_duration_s: float = 5.0


QUICK = Plan(
    name="quick",
    external_users=120,
    external_duration_s=10.0,
    isolation_api_users=20,
    isolation_api_think_s=0.05,
    isolation_duration_s=10.0,
    duplicate_tasks=20,
    duplicate_every=4,
    duplicate_requests=200,
    duplicate_users=10,
    payment_keys=20,
    payment_retries=3,
)

FULL = Plan(
    name="full",
    external_users=120,
    external_duration_s=30.0,
    isolation_api_users=20,
    isolation_api_think_s=0.05,
    isolation_duration_s=30.0,
    duplicate_tasks=40,
    duplicate_every=4,
    duplicate_requests=800,
    duplicate_users=20,
    payment_keys=50,
    payment_retries=3,
    shared_session_runs=5,
    store_writes=2000,
    sizing_duration_s=8.0,
)
