"""Trace ids on holds, exemplars, the OpenTelemetry bridge's span context and the
`pool.wait` span (issue 14), with a real OpenTelemetry SDK and PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

import monitor
from monitor.catalogue import SECONDS_BUCKETS
from monitor.config import ConfigError
from monitor.exporters.prometheus import metrics_app
from monitor.ledger import Exemplars
from monitor.tracing import span_reader, trace_ids
from tests.helpers import Engines

pytestmark = pytest.mark.core

USE = "db.client.connection.use_time"
WAIT = "db.client.connection.wait_time"


@pytest.fixture
def engines(database_url: str) -> Iterator[Engines]:
    made = Engines(database_url)
    yield made
    made.close()


#: The process's global tracer provider, set once (OpenTelemetry allows one): `pool.wait`
#: spans come from the global provider, as in an application.
_EXPORTER = InMemorySpanExporter()


def _global_provider() -> TracerProvider:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    if not getattr(provider, "_pool_monitor_test_exporter", False):
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        provider._pool_monitor_test_exporter = True  # type: ignore[attr-defined]
    return provider


@pytest.fixture
def spans() -> InMemorySpanExporter:
    _EXPORTER.clear()
    return _EXPORTER


@pytest.fixture
def tracer(spans: InMemorySpanExporter) -> trace.Tracer:
    return _global_provider().get_tracer("test")


def ids(span: Any) -> tuple[str, str]:
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def bucket(value: float) -> int:
    return next((i for i, b in enumerate(SECONDS_BUCKETS) if value <= b), len(SECONDS_BUCKETS))


def hold_for(engine: sa.Engine, seconds: float) -> float:
    started = time.perf_counter()
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
        time.sleep(seconds)
    return time.perf_counter() - started


# -- trace ids on holds ----------------------------------------------------------------
def test_a_hold_names_the_span_it_was_checked_out_under(
    engines: Engines, tracer: trace.Tracer
) -> None:
    engine = engines.sync(pool_size=2)
    pm = monitor.instrument(engine, pool_name="traced-hold")
    with tracer.start_as_current_span("request") as request:
        conn = engine.connect()
    untraced = engine.connect()
    try:
        by_trace = sorted(pm.snapshot()["holds"], key=lambda h: "trace_id" in h)
        assert "trace_id" not in by_trace[0] and "span_id" not in by_trace[0]
        trace_id, span_id = ids(request)
        assert by_trace[1]["trace_id"] == trace_id and by_trace[1]["span_id"] == span_id
    finally:
        conn.close()
        untraced.close()


def test_asyncio_tasks_keep_their_own_span(database_url: str, tracer: trace.Tracer) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    url = database_url.replace("postgresql+psycopg2", "postgresql+psycopg")
    engine = create_async_engine(url, pool_size=4)
    pm = monitor.instrument(engine, pool_name="traced-async")
    seen: dict[str, str] = {}

    async def handler(name: str) -> None:
        with tracer.start_as_current_span(name) as span:
            async with engine.connect() as conn:
                await conn.execute(sa.text("SELECT pg_sleep(0.05)"))
                seen[ids(span)[0]] = name
                await asyncio.sleep(0.05)

    async def main() -> list[dict[str, Any]]:
        tasks = [asyncio.create_task(handler(f"task-{i}")) for i in range(3)]
        await asyncio.sleep(0.03)
        holds = pm.snapshot()["holds"]
        await asyncio.gather(*tasks)
        await engine.dispose()
        return holds

    try:
        holds = asyncio.run(main())
        assert sorted(seen[h["trace_id"]] for h in holds) == ["task-0", "task-1", "task-2"]
        assert all(h["task"] for h in holds)
    finally:
        monitor.uninstrument(engine)


def test_trace_context_off_records_nothing(engines: Engines, tracer: trace.Tracer) -> None:
    engine = engines.sync()
    pm = monitor.instrument(engine, pool_name="untraced", trace_context=False)
    with tracer.start_as_current_span("request"), engine.connect() as conn:
        assert "trace_id" not in pm.snapshot()["holds"][0]
        conn.execute(sa.text("SELECT 1"))
    assert "exemplars" not in pm.snapshot()["histograms"][USE]


def test_the_fast_span_reader_agrees_with_the_public_api(tracer: trace.Tracer) -> None:
    read = span_reader()
    assert read is not None
    assert read() is None
    with tracer.start_as_current_span("outer") as outer:
        assert read() is outer is trace.get_current_span()
        with tracer.start_as_current_span("inner") as inner:
            assert read() is inner
        assert read() is outer

    async def in_task() -> Any:
        with tracer.start_as_current_span("task") as span:
            await asyncio.sleep(0)
            return read() is span

    assert asyncio.run(in_task()) is True
    assert read() is None


def test_trace_ids_are_hex_and_only_for_valid_contexts() -> None:
    ctx = trace.SpanContext(0xABC, 0x12, False, trace.TraceFlags(1))
    assert trace_ids(ctx) == ("0" * 29 + "abc", "0" * 14 + "12", True)
    assert trace_ids(trace.INVALID_SPAN_CONTEXT) is None
    assert trace_ids(None) is None
    assert trace_ids("not a context") is None


# -- exemplars ---------------------------------------------------------------------------
def test_use_and_wait_exemplars_name_the_traced_holds(
    engines: Engines, tracer: trace.Tracer
) -> None:
    engine = engines.sync(pool_size=1, max_overflow=0)
    pm = monitor.instrument(engine, pool_name="exemplars")
    with tracer.start_as_current_span("slow") as slow:
        held = hold_for(engine, 0.3)
    hold_for(engine, 0.3)  # untraced: same bucket, slower or not, never an exemplar
    hist = pm.snapshot()["histograms"]
    use = hist[USE]["exemplars"]
    assert len(use) == len(SECONDS_BUCKETS) + 1
    [(index, exemplar)] = [(i, e) for i, e in enumerate(use) if e is not None]
    trace_id, span_id = ids(slow)
    assert index == bucket(exemplar["value"]) == bucket(held)
    assert exemplar["trace_id"] == trace_id and exemplar["span_id"] == span_id
    assert 0.3 <= exemplar["value"] <= held
    assert time.time() - 5 < exemplar["timestamp"] <= time.time()
    [wait] = [e for e in hist[WAIT]["exemplars"] if e is not None]
    assert wait["trace_id"] == trace_id and wait["value"] < 0.25


def test_a_bucket_keeps_its_slowest_exemplar_within_the_window(
    engines: Engines, tracer: trace.Tracer
) -> None:
    engine = engines.sync(pool_size=1, max_overflow=0)
    pm = monitor.instrument(engine, pool_name="slowest", exemplar_window=60)
    durations = {}
    for name, seconds in (("second", 0.15), ("first", 0.11), ("third", 0.13)):
        with tracer.start_as_current_span(name) as span:  # all in the 0.25 bucket
            durations[ids(span)[0]] = (name, hold_for(engine, seconds))
    [kept] = [e for e in pm.snapshot()["histograms"][USE]["exemplars"] if e is not None]
    assert durations[kept["trace_id"]][0] == "second"
    assert 0.15 <= kept["value"] <= durations[kept["trace_id"]][1]


def test_an_exemplar_older_than_the_window_gives_way() -> None:
    exemplars = Exemplars(SECONDS_BUCKETS, window=10.0)
    slow = trace.SpanContext(1, 1, False, trace.TraceFlags(1))
    fast = trace.SpanContext(2, 2, False, trace.TraceFlags(1))
    unsampled = trace.SpanContext(3, 3, False, trace.TraceFlags(0))
    exemplars.offer(0.2, 100.0, slow, 1000.0)
    exemplars.offer(0.15, 105.0, fast, 1000.0)  # faster, within the window: kept out
    assert exemplars.by_bucket[bucket(0.2)] == (0.2, 1100.0, 100.0, f"{1:032x}", f"{1:016x}")
    exemplars.offer(0.3, 200.0, unsampled, 1000.0)  # unsampled: never an exemplar
    assert exemplars.by_bucket[bucket(0.2)][3] == f"{1:032x}"
    exemplars.offer(0.15, 111.0, fast, 1000.0)  # the slow one is 11 s old: gives way
    assert exemplars.by_bucket[bucket(0.2)] == (0.15, 1111.0, 111.0, f"{2:032x}", f"{2:016x}")
    assert [i for i, e in enumerate(exemplars.to_list() or []) if e] == [bucket(0.2)]


def test_unsampled_traces_name_holds_but_make_no_exemplars(engines: Engines) -> None:
    tracer = TracerProvider(sampler=ALWAYS_OFF).get_tracer("test")
    engine = engines.sync()
    pm = monitor.instrument(engine, pool_name="unsampled")
    with tracer.start_as_current_span("request") as request, engine.connect() as conn:
        assert pm.snapshot()["holds"][0]["trace_id"] == ids(request)[0]
        conn.execute(sa.text("SELECT 1"))
    assert "exemplars" not in pm.snapshot()["histograms"][USE]


# -- the exposition -------------------------------------------------------------------------
def _get(app: Any, accept: str | None) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        headers = {"Accept": accept} if accept else {}
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return await client.get("/metrics", headers=headers)

    return asyncio.run(go())


def test_openmetrics_when_asked_carries_exemplars_plain_text_otherwise(
    engines: Engines, tracer: trace.Tracer
) -> None:
    engine = engines.sync()
    pm = monitor.instrument(engine, pool_name="negotiated")
    registry = CollectorRegistry()
    app = metrics_app(registry)
    with tracer.start_as_current_span("request") as request:
        held = hold_for(engine, 0.06)
    trace_id, span_id = ids(request)

    om = _get(app, "application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.endswith("# EOF\n")
    [use] = [
        f
        for f in openmetrics_families(om.text)
        if f.name == "db_client_connection_use_time_seconds"
    ]
    with_exemplar = [s for s in use.samples if s.exemplar is not None]
    assert len(with_exemplar) == 1
    sample = with_exemplar[0]
    assert sample.labels == {"db_client_connection_pool_name": "negotiated", "le": "0.1"}
    assert sample.exemplar.labels == {"trace_id": trace_id, "span_id": span_id}
    assert 0.06 <= sample.exemplar.value <= held

    text = _get(app, None)
    assert text.headers["content-type"].startswith("text/plain")
    assert "trace_id" not in text.text and "# EOF" not in text.text
    families = {f.name: f for f in text_string_to_metric_families(text.text)}
    buckets = {
        s.labels["le"]: s.value
        for s in families["db_client_connection_use_time_seconds"].samples
        if s.name.endswith("_bucket")
    }
    assert buckets["0.1"] == buckets["+Inf"] == 1.0
    assert pm.snapshot()["counters"]["sqlalchemy.pool.checkouts"] == 1

    hostile = _get(app, "application/openmetrics-text; version=abc")  # prometheus_client
    assert hostile.status_code == 200  # raises on it: the plain text format instead
    assert hostile.headers["content-type"].startswith("text/plain")
    assert "db_client_connection_use_time_seconds_bucket" in hostile.text


# -- trace ids in alerts and warnings ------------------------------------------------------
def test_long_held_alert_and_event_carry_the_trace(
    engines: Engines, tracer: trace.Tracer, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[monitor.LongHeldEvent] = []
    engine = engines.sync()
    monitor.instrument(
        engine, pool_name="long-traced", long_held_threshold=0.05, on_long_held=events.append
    )
    with (
        caplog.at_level(logging.INFO, logger="monitor.long_held"),
        tracer.start_as_current_span("slow request") as request,
        engine.connect(),
    ):
        deadline = time.monotonic() + 10
        while not events and time.monotonic() < deadline:
            time.sleep(0.01)
    trace_id, span_id = ids(request)
    [event] = events
    assert (event.trace_id, event.span_id) == (trace_id, span_id)
    alert, returned = [r for r in caplog.records if r.name == "monitor.long_held"]
    assert (alert.trace_id, alert.span_id) == (trace_id, span_id)  # type: ignore[attr-defined]
    assert f", trace {trace_id} span {span_id};" in alert.getMessage()
    assert "returned after" in returned.getMessage()
    assert (returned.trace_id, returned.span_id) == (trace_id, span_id)  # type: ignore[attr-defined]


def test_misuse_warning_names_the_checkout_trace(
    engines: Engines, tracer: trace.Tracer, caplog: pytest.LogCaptureFixture
) -> None:
    import threading

    engine = engines.sync()
    monitor.instrument(engine, pool_name="misuse-traced")
    with caplog.at_level(logging.WARNING, logger="monitor.misuse"):
        with tracer.start_as_current_span("request") as request:
            conn = engine.connect()
        conn.execute(sa.text("SELECT 1"))
        for _ in range(2):  # another thread, then this one again: taking turns

            def other() -> None:
                conn.execute(sa.text("SELECT 1"))

            thread = threading.Thread(target=other)
            thread.start()
            thread.join()
            conn.execute(sa.text("SELECT 1"))
        conn.close()
    trace_id, span_id = ids(request)
    records = [r for r in caplog.records if r.name == "monitor.misuse"]
    assert records  # one per site where the threads took turns
    for record in records:
        assert (record.trace_id, record.span_id) == (trace_id, span_id)  # type: ignore[attr-defined]
        assert f"; checked out under trace {trace_id} span {span_id} (logged once" in (
            record.getMessage()
        )


# -- pool.wait spans -------------------------------------------------------------------------
def test_pool_wait_span_is_a_child_with_the_wait_time(
    engines: Engines, tracer: trace.Tracer, spans: InMemorySpanExporter
) -> None:
    import threading

    engine = engines.sync(pool_size=1, max_overflow=0, pool_timeout=5)
    monitor.instrument(engine, pool_name="waited", trace_pool_wait=True)
    holder = engine.connect()
    threading.Timer(0.2, holder.close).start()
    with tracer.start_as_current_span("request") as request, engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    with engine.connect():  # no span current: no wait span
        pass
    [wait] = [s for s in spans.get_finished_spans() if s.name == "pool.wait"]
    assert wait.parent is not None and wait.parent.span_id == request.get_span_context().span_id
    assert wait.context.trace_id == request.get_span_context().trace_id
    assert wait.attributes["db.client.connection.pool.name"] == "waited"
    waited = wait.attributes["db.client.connection.wait_time"]
    assert 0.15 <= waited < 5
    assert (wait.end_time - wait.start_time) / 1e9 == pytest.approx(waited, abs=0.05)
    assert wait.status.is_ok


def test_pool_wait_span_records_a_timeout(
    engines: Engines, tracer: trace.Tracer, spans: InMemorySpanExporter
) -> None:
    engine = engines.sync(pool_size=1, max_overflow=0, pool_timeout=0.1)
    monitor.instrument(engine, pool_name="timed-out", trace_pool_wait=True)
    with (
        engine.connect(),
        tracer.start_as_current_span("request"),
        pytest.raises(sa.exc.TimeoutError),
    ):
        engine.connect()
    [wait] = [s for s in spans.get_finished_spans() if s.name == "pool.wait"]
    assert wait.status.status_code == trace.StatusCode.ERROR
    assert wait.attributes["error.type"] == "sqlalchemy.exc.TimeoutError"
    assert wait.attributes["db.client.connection.wait_time"] >= 0.1


def test_no_pool_wait_span_unless_asked_or_sampled(
    engines: Engines, tracer: trace.Tracer, spans: InMemorySpanExporter
) -> None:
    engine = engines.sync()
    monitor.instrument(engine, pool_name="no-wait-span")
    with tracer.start_as_current_span("request"), engine.connect():
        pass
    unsampled = TracerProvider(sampler=ALWAYS_OFF).get_tracer("test")
    other = engines.sync()
    monitor.instrument(other, pool_name="unsampled-wait", trace_pool_wait=True)
    with unsampled.start_as_current_span("request"), other.connect():
        pass
    assert [s.name for s in spans.get_finished_spans()] == ["request"]


def test_trace_pool_wait_without_opentelemetry_is_a_clear_error(
    engines: Engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "opentelemetry" else real(name, *a),
    )
    with pytest.raises(ConfigError, match=r"trace_pool_wait needs OpenTelemetry's API"):
        monitor.instrument(engines.sync(), pool_name="no-otel", trace_pool_wait=True)


def test_no_opentelemetry_means_no_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import raises ImportError
    assert span_reader() is None


# -- the OpenTelemetry bridge -----------------------------------------------------------------
def test_otel_bridge_records_with_the_span_context_so_the_sdk_keeps_exemplars(
    engines: Engines, tracer: trace.Tracer
) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    monitor.instrument_otel(provider)
    engine = engines.sync()
    monitor.instrument(engine, pool_name="otel-exemplars")
    with tracer.start_as_current_span("request") as request:
        hold_for(engine, 0.02)
    data = reader.get_metrics_data()
    points = [
        point
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == USE
        for point in metric.data.data_points
        if point.attributes.get("db.client.connection.pool.name") == "otel-exemplars"
    ]
    [point] = points
    [exemplar] = point.exemplars
    assert exemplar.trace_id == request.get_span_context().trace_id
    assert exemplar.span_id == request.get_span_context().span_id
    assert exemplar.value >= 0.02
    provider.shutdown()


def test_exporting_the_wait_span_is_not_counted_as_waiting(
    engines: Engines, tracer: trace.Tracer
) -> None:
    """A slow exporter (SimpleSpanProcessor exports on the checkout's thread) must not
    inflate the wait it reports, nor the pending count."""

    class Slow(InMemorySpanExporter):
        """Slow while `on` (the provider is the process's: it stays after this test)."""

        on = True

        def export(self, spans: Any) -> Any:
            if not self.on:
                return super().export([])
            if any(s.name == "pool.wait" for s in spans):
                time.sleep(0.05)
            return super().export(spans)

    slow = Slow()
    _global_provider().add_span_processor(SimpleSpanProcessor(slow))
    engine = engines.sync(pool_size=1, max_overflow=0)
    pm = monitor.instrument(engine, pool_name="slow-export", trace_pool_wait=True)
    with engine.connect():
        pass  # the connection is open: the checkouts below do not connect
    try:
        with tracer.start_as_current_span("request"):
            for _ in range(3):
                with engine.connect():
                    pass
    finally:
        Slow.on = False
    wait = pm.snapshot()["histograms"][WAIT]
    assert wait["count"] == 4 and wait["sum"] < 0.04  # 3 x 0.05 s of export not in it
    assert pm.snapshot()["gauges"]["db.client.connection.pending_requests"] == 0
    waits = [s for s in slow.get_finished_spans() if s.name == "pool.wait"]
    assert len(waits) == 3
    assert all((s.end_time - s.start_time) / 1e9 < 0.04 for s in waits)
