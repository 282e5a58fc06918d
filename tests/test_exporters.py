"""The Prometheus exposition (exact values), the ASGI app, and the OpenTelemetry bridge
exposing the same metric names and label keys as ours (issue 2, item 5)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

import monitor
from monitor.catalogue import METRICS, SECONDS_BUCKETS
from monitor.exporters.prometheus import MonitorCollector
from monitor.locks import lock_snapshot
from tests.helpers import Engines

pytestmark = pytest.mark.core

POOL = "db_client_connection_pool_name"


@pytest.fixture
def engines(database_url: str) -> Iterator[Engines]:
    made = Engines(database_url)
    yield made
    made.close()


def _samples(exposition: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


def _value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples[(name, frozenset(labels.items()))]


def test_prometheus_exposition_has_exact_values(engines: Engines) -> None:
    engine = engines.sync(pool_size=3, max_overflow=2)
    pm = monitor.instrument(engine, pool_name="orders")
    with engine.connect() as conn:
        conn.execute(text("select 1"))
        time.sleep(0.03)
    held = [engine.connect() for _ in range(4)]
    registry = CollectorRegistry()
    registry.register(MonitorCollector(lambda: [pm.snapshot()], lock_snapshot))
    samples = _samples(generate_latest(registry).decode())
    assert (
        _value(
            samples,
            "db_client_connection_count",
            **{POOL: "orders", "db_client_connection_state": "used"},
        )
        == 4
    )
    assert (
        _value(
            samples,
            "db_client_connection_count",
            **{POOL: "orders", "db_client_connection_state": "idle"},
        )
        == 0
    )
    assert _value(samples, "db_client_connection_max", **{POOL: "orders"}) == 5
    assert _value(samples, "db_client_connection_idle_max", **{POOL: "orders"}) == 3
    assert _value(samples, "sqlalchemy_pool_overflow", **{POOL: "orders"}) == 1
    assert _value(samples, "db_client_connection_pending_requests", **{POOL: "orders"}) == 0
    assert _value(samples, "sqlalchemy_pool_checkouts_total", **{POOL: "orders"}) == 5
    assert _value(samples, "db_client_connection_timeouts_total", **{POOL: "orders"}) == 0
    assert _value(samples, "pool_monitor_errors_total", **{POOL: "orders"}) == 0
    # One returned hold of ~30 ms: the 0.05 bucket and above hold it, 0.025 and below not.
    use = "db_client_connection_use_time_seconds"
    assert _value(samples, f"{use}_count", **{POOL: "orders"}) == 1
    assert _value(samples, f"{use}_bucket", **{POOL: "orders", "le": "0.025"}) == 0
    assert _value(samples, f"{use}_bucket", **{POOL: "orders", "le": "0.05"}) == 1
    assert _value(samples, f"{use}_bucket", **{POOL: "orders", "le": "+Inf"}) == 1
    assert 0.03 <= _value(samples, f"{use}_sum", **{POOL: "orders"}) < 0.05
    buckets = {dict(labels)["le"] for (name, labels) in samples if name == f"{use}_bucket"}
    assert buckets == {repr(b) for b in SECONDS_BUCKETS} | {"+Inf"}
    wait_count = _value(samples, "db_client_connection_wait_time_seconds_count", **{POOL: "orders"})
    assert wait_count == 5  # live holds' waits count at once
    assert (
        _value(samples, "db_client_connection_create_time_seconds_count", **{POOL: "orders"}) == 4
    )
    for conn in held:
        conn.close()


def test_default_registry_and_metrics_app(engines: Engines) -> None:
    engine = engines.sync(pool_size=2)
    monitor.instrument(engine, pool_name="default-registry")
    with engine.connect():
        pass
    assert 'db_client_connection_pool_name="default-registry"' in generate_latest(REGISTRY).decode()

    async def scrape() -> httpx.Response:
        transport = httpx.ASGITransport(app=monitor.metrics_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return await client.get("/")

    import asyncio

    response = asyncio.run(scrape())
    assert response.status_code == 200
    samples = _samples(response.text)
    assert _value(samples, "sqlalchemy_pool_checkouts_total", **{POOL: "default-registry"}) == 1
    assert "python_info" in response.text, "the app's own metrics are served alongside"


def _names_and_label_keys(exposition: str) -> set[tuple[str, frozenset[str]]]:
    ignored = {"target_info"}
    out = set()
    for family in text_string_to_metric_families(exposition):
        if family.name in ignored:
            continue
        for sample in family.samples:
            keys = frozenset(k for k in sample.labels if not k.startswith("otel_scope_"))
            out.add((sample.name, keys))
    return out


def test_otel_exposition_matches_ours(engines: Engines) -> None:
    """Through OpenTelemetry's Prometheus exporter the user sees the same series names and
    label keys as from our collector (ignoring otel_scope_* labels and target_info)."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider

    otel_registry = CollectorRegistry()
    reader = PrometheusMetricReader(registry=otel_registry)
    provider = MeterProvider(metric_readers=[reader])
    monitor.instrument_otel(meter_provider=provider)
    engine = engines.sync(pool_size=2, max_overflow=1, pool_timeout=0.1)
    pm = monitor.instrument(engine, pool_name="otel-pool")
    with engine.connect() as conn:
        conn.execute(text("select 1"))
    with monitor.lock("otel-lock"):
        pass
    ours_registry = CollectorRegistry()
    ours_registry.register(
        MonitorCollector(
            lambda: [pm.snapshot()],
            lambda: {m: {"otel-lock": h["otel-lock"]} for m, h in lock_snapshot().items()},
        )
    )
    ours = _names_and_label_keys(generate_latest(ours_registry).decode())
    theirs = _names_and_label_keys(generate_latest(otel_registry).decode())
    # Restrict OTel's side to our pool/lock (other tests' pools may also be instrumented).
    assert ours == {item for item in theirs if item in ours or item[0] in {s[0] for s in ours}}
    assert {name for name, _ in theirs} >= {name for name, _ in ours}
    exposed = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in text_string_to_metric_families(generate_latest(ours_registry).decode())
    }
    assert exposed == {m.prometheus_name for m in METRICS}  # every catalogue metric
    # And the values agree: OTel histograms get exactly the observations we made.
    otel_samples = _samples(generate_latest(otel_registry).decode())
    count = [
        v
        for (n, labels), v in otel_samples.items()
        if n == "db_client_connection_use_time_seconds_count"
        and dict(labels).get(POOL) == "otel-pool"
    ]
    assert count == [1.0]
    provider.shutdown()
