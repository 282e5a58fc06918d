"""Settings of the demo service, shared by the runner and the uvicorn worker processes.

The runner starts the service in separate processes (uvicorn `--workers 2`), so the settings
travel through one environment variable holding JSON. Every timeout is derived from the fake
external service's latency: the seed's problem is "hold time ≫ pool timeout", and that
ratio, not the absolute seconds, is what the demo must preserve when it is time-scaled
(2 s in the demo, 0.3 s in the tests).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

ENV_VAR = "POOL_MONITOR_DEMO_SETTINGS"
DEFAULT_LATENCY_S = 2.0


@dataclass(frozen=True)
class PoolSpec:
    """One engine's pool: the seed tunes these per workload (fast-failing API, patient jobs)."""

    name: str
    size: int
    max_overflow: int
    timeout_s: float

    @property
    def max_connections(self) -> int:
        return self.size + self.max_overflow


@dataclass(frozen=True)
class DemoSettings:
    """Everything a demo service process needs to know."""

    database_url: str
    external_url: str = "http://127.0.0.1:8701"
    external_latency_s: float = DEFAULT_LATENCY_S
    api_pool: PoolSpec = field(default_factory=lambda: _api_pool(DEFAULT_LATENCY_S))
    background_pool: PoolSpec = field(default_factory=lambda: _background_pool(DEFAULT_LATENCY_S))
    shared_pool: PoolSpec = field(default_factory=lambda: _shared_pool(DEFAULT_LATENCY_S))
    worker_pool: PoolSpec = field(default_factory=lambda: PoolSpec("worker", 5, 5, 10.0))
    long_held_threshold_s: float = DEFAULT_LATENCY_S / 2
    #: Where each worker writes its finished spans (`spans-<pid>.jsonl`, see
    #: `demo_app.traces`); None: no tracer, no span (`DemoStack` sets its log directory).
    traces_dir: str | None = None

    @classmethod
    def scaled(cls, database_url: str, external_url: str, latency_s: float) -> DemoSettings:
        """Settings whose pool timeouts keep the seed's proportions for a given latency.

        API pools fail fast (timeout = latency / 2, like the seed's 30 s against 30–60 s
        external calls); the background pool waits patiently (5 × latency, the seed's 60 s).
        """
        return cls(
            database_url=database_url,
            external_url=external_url,
            external_latency_s=latency_s,
            api_pool=_api_pool(latency_s),
            background_pool=_background_pool(latency_s),
            shared_pool=_shared_pool(latency_s),
            long_held_threshold_s=latency_s / 2,
        )

    def with_database(self, database_url: str) -> DemoSettings:
        return replace(self, database_url=database_url)

    def to_env(self) -> dict[str, str]:
        """Environment entries that make `from_env()` rebuild these settings in a worker."""
        return {ENV_VAR: json.dumps(asdict(self))}

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> DemoSettings:
        """Settings from `POOL_MONITOR_DEMO_SETTINGS` (set by the runner) or plain variables.

        Without the JSON variable, `DATABASE_URL`, `DEMO_EXTERNAL_URL` and
        `DEMO_EXTERNAL_LATENCY_S` are enough to run the service by hand under uvicorn
        (`DEMO_TRACES_DIR` to trace it).
        """
        env = os.environ if environ is None else environ
        raw = env.get(ENV_VAR)
        if raw:
            return _from_dict(json.loads(raw))
        database_url = env.get("DATABASE_URL")
        if not database_url:
            raise RuntimeError(f"set {ENV_VAR} (the runner does) or DATABASE_URL")
        from demo_app.embedded_pg import as_psycopg_url

        scaled = cls.scaled(
            as_psycopg_url(database_url),
            env.get("DEMO_EXTERNAL_URL", "http://127.0.0.1:8701"),
            float(env.get("DEMO_EXTERNAL_LATENCY_S", DEFAULT_LATENCY_S)),
        )
        return replace(scaled, traces_dir=env.get("DEMO_TRACES_DIR") or None)


def _api_pool(latency_s: float) -> PoolSpec:
    # Small on purpose (the seed's 20 + 20, scaled down with the load): a few connections
    # serve hundreds of requests per second when nobody holds one across a slow call.
    return PoolSpec("api", size=2, max_overflow=1, timeout_s=latency_s / 2)


def _shared_pool(latency_s: float) -> PoolSpec:
    # Same size and timeout as the API pool: the anti-pattern is *one* pool for both workloads.
    return PoolSpec("shared", size=2, max_overflow=1, timeout_s=latency_s / 2)


def _background_pool(latency_s: float) -> PoolSpec:
    return PoolSpec("background", size=2, max_overflow=2, timeout_s=latency_s * 5)


def _from_dict(data: dict[str, Any]) -> DemoSettings:
    pools = {k: PoolSpec(**v) for k, v in data.items() if k.endswith("_pool")}
    rest = {k: v for k, v in data.items() if not k.endswith("_pool")}
    return DemoSettings(**rest, **pools)
