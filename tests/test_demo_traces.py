"""The demo service's OpenTelemetry traces, and the slowest hold's trace id in the report.

Unit tests first (no database, no network, no global tracer provider: the SDK spans come
from a provider of the test's own): span files written and read back, the SERVER span the
ASGI middleware opens, pairing long-held warnings with their returns, choosing the slowest
hold from the warnings and the exemplars, and the report's table. Then the real stack
(`DemoStack`: the fake external API and the service's two uvicorn workers, on 127.0.0.1):
requests carrying a known `traceparent` produce the monitor's findings with that exact
trace id, and the span files hold the server span, its `pool.wait` span, and the failed
waits of the requests an exhausted pool refused.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from rich.console import Console
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from demo_app import events, findings, runner, traces
from demo_app.drivers import Measured
from demo_app.sampler import MonitorSampler, WorkerSample, exemplars_of
from demo_app.schema import create_schema
from demo_app.servers import serve_in_thread
from demo_app.snapshots import USE_TIME, WAIT_TIME
from demo_app.stack import TRACE_URL_OPTION, DemoStack, sidecar_takes

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SERVER_SPAN = "00f067aa0ba902b7"
JOB_SPAN = "1111111111111111"
WAIT_SPAN = "2222222222222222"
OTHER_TRACE = "0af7651916cd43dd8448eb211c80319c"
FIX_TRACE = "0123456789abcdef0123456789abcdef"  # in no span file
SITE = "demo_app/scenarios/external_call.py:38:anti_process_image"
T0 = 1_800_000_000.0  # unix time of the window's start


def _local_provider(path: Path) -> tuple[TracerProvider, traces.SpanFile]:
    """An SDK provider of the test's own (the process's global one is left alone)."""
    exporter = traces.SpanFile(path)
    provider = TracerProvider(resource=Resource.create({"service.name": traces.SERVICE_NAME}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


# --- span files -----------------------------------------------------------------------------


def test_span_file_round_trip_keeps_ids_parent_times_and_attributes(tmp_path: Path) -> None:
    path = traces.span_file(tmp_path, pid=42)
    assert path == tmp_path / "spans-42.jsonl"
    provider, exporter = _local_provider(path)
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("POST /x", kind=SpanKind.SERVER) as server:
        server.set_attribute("http.response.status_code", 503)
        with tracer.start_as_current_span(
            traces.POOL_WAIT,
            attributes={traces.POOL_ATTRIBUTE: "api", traces.WAIT_ATTRIBUTE: 0.5},
        ) as wait:
            wait.set_status(Status(StatusCode.ERROR, "pool timeout"))
            wait.set_attribute("error.type", "sqlalchemy.exc.TimeoutError")
    exporter.shutdown()
    assert exporter.export([]).name == "FAILURE"  # closed: nothing more is written

    lines = path.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)  # one span a line
    path.write_text(path.read_text() + "not json\n{}\n")  # skipped, not fatal
    trace_id = format(server.get_span_context().trace_id, "032x")
    server_id = format(server.get_span_context().span_id, "016x")
    wait_id = format(wait.get_span_context().span_id, "016x")

    spans = traces.read(tmp_path)
    assert [s["name"] for s in spans] == ["POST /x", traces.POOL_WAIT]  # by start time
    root, child = spans
    assert (root["trace_id"], root["span_id"], root["parent_id"]) == (trace_id, server_id, None)
    assert (child["trace_id"], child["span_id"], child["parent_id"]) == (
        trace_id,
        wait_id,
        server_id,
    )
    assert root["kind"] == "SERVER" and child["kind"] == "INTERNAL"
    assert child["status"] == "ERROR" and root["status"] == "UNSET"
    assert child["attributes"] == {
        traces.POOL_ATTRIBUTE: "api",
        traces.WAIT_ATTRIBUTE: 0.5,
        "error.type": "sqlalchemy.exc.TimeoutError",
    }
    assert root["start"] <= child["start"] <= child["end"] <= root["end"]
    assert abs(root["start"] - time.time()) < 60  # unix seconds
    assert traces.read(tmp_path, trace_id=trace_id) == spans
    assert traces.read(tmp_path, trace_id=OTHER_TRACE) == []
    assert traces.read(None) == [] and traces.read(tmp_path / "missing") == []


def test_the_middleware_opens_a_server_span_named_by_route_under_the_callers_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "http")
    provider, exporter = _local_provider(tmp_path / "spans-1.jsonl")

    async def item(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok", status_code=201)

    async def health(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    routes = [Route("/items/{variant}/x", item, methods=["POST"]), Route("/healthz", health)]
    tracing = traces.Tracing(provider, exporter)
    app = Starlette(routes=routes, middleware=[traces.middleware(routes, tracing)])
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as client:
        traceparent = f"00-{TRACE}-{SERVER_SPAN}-01"
        assert client.post("/items/anti/x", headers={"traceparent": traceparent}).status_code == 201
        assert client.get("/items/anti/x").status_code == 405  # the route, not the method
        assert client.get("/nowhere").status_code == 404
        assert client.get("/healthz").status_code == 200  # untraced
    spans = traces.read(tmp_path)
    assert [(s["name"], s["kind"]) for s in spans] == [
        ("POST /items/{variant}/x", "SERVER"),
        ("GET /items/{variant}/x", "SERVER"),
        ("GET", "SERVER"),
    ]
    first = spans[0]
    assert first["trace_id"] == TRACE and first["parent_id"] == SERVER_SPAN
    assert {
        "http.request.method": "POST",
        "url.path": "/items/anti/x",
        "http.route": "/items/{variant}/x",
        "http.response.status_code": 201,
    }.items() <= first["attributes"].items()
    assert spans[1]["trace_id"] != TRACE and spans[1]["parent_id"] is None  # a new trace
    assert spans[1]["attributes"]["http.response.status_code"] == 405
    assert "http.route" not in spans[2]["attributes"]


# --- the slowest hold: pairing, sources, spans ------------------------------------------


def _warning(t: float, age: float, **extra: Any) -> dict[str, Any]:
    return {
        "time": t,
        "pid": 7,
        "logger": events.LONG_HELD,
        "level": "WARNING",
        "pool": "api",
        "age_s": age,
        "site": SITE,
        "thread_name": "MainThread",
        "task_name": "Task-1",
        "backend_pid": 100,
        "trace_id": TRACE,
        "span_id": SERVER_SPAN,
        **extra,
    }


def _returned(t: float, held: float, **extra: Any) -> dict[str, Any]:
    return {
        "time": t,
        "pid": 7,
        "logger": events.LONG_HELD,
        "level": "INFO",
        "pool": "api",
        "site": SITE,
        "held_s": held,
        "thread_name": "MainThread",
        "task_name": "Task-1",
        "backend_pid": 100,
        **extra,
    }


def test_each_long_held_warning_is_paired_with_its_own_holds_return() -> None:
    records = [
        _warning(T0 + 1.0, 1.0),
        _warning(T0 + 1.01, 1.0, task_name="Task-2", backend_pid=101, trace_id=OTHER_TRACE),
        # Task-2's connection came back first; a record of another process in between.
        _returned(T0 + 1.5, 1.49, task_name="Task-2", backend_pid=101),
        _returned(T0 + 1.6, 9.9, pid=8),
        _returned(T0 + 2.0, 2.0),
        # The holder returned between the watchdog marking the hold and logging it.
        _returned(T0 + 4.95, 1.2, backend_pid=102, task_name="Task-3"),
        _warning(T0 + 5.0, 1.25, backend_pid=102, task_name="Task-3"),
        _warning(T0 + 9.0, 1.0, backend_pid=103, task_name="Task-4"),  # still held
    ]
    paired = findings.pair_returns(list(reversed(records)))
    warnings = [r for r in paired if r["level"] == "WARNING"]
    assert [(r["task_name"], r["returned_held_s"]) for r in warnings] == [
        ("Task-1", 2.0),
        ("Task-2", 1.49),
        ("Task-3", 1.2),
        ("Task-4", None),
    ]
    assert "returned_held_s" not in records[0]  # the input is left as it was


def _exemplar(pool: str, value: float, at: float, trace_id: str, span_id: str) -> dict[str, Any]:
    return {
        "pool": pool,
        "histogram": USE_TIME,
        "pid": 7,
        "value": value,
        "timestamp": at,
        "trace_id": trace_id,
        "span_id": span_id,
    }


def _span(
    name: str,
    span_id: str,
    parent: str | None,
    start: float,
    end: float,
    kind: str = "INTERNAL",
    trace_id: str = TRACE,
    status: str = "UNSET",
    **attributes: Any,
) -> dict[str, Any]:
    return {
        "trace_id": trace_id,
        "span_id": span_id,
        "parent_id": parent,
        "name": name,
        "kind": kind,
        "start": start,
        "end": end,
        "status": status,
        "attributes": attributes,
    }


def _wait(span_id: str, parent: str, start: float, waited: float, **kw: Any) -> dict[str, Any]:
    attributes = {traces.POOL_ATTRIBUTE: "api", traces.WAIT_ATTRIBUTE: waited}
    return _span(traces.POOL_WAIT, span_id, parent, start, start + waited, **kw, **attributes)


SPANS = traces.SpanIndex.of(
    [
        _span(
            "POST /external_call/{variant}/images",
            SERVER_SPAN,
            "aaaaaaaaaaaaaaaa",
            T0 + 0.9,
            T0 + 3.1,
            kind="SERVER",
            **{"http.response.status_code": 200},
        ),
        _wait(WAIT_SPAN, SERVER_SPAN, T0 + 0.95, 0.05),  # ends at T0 + 1.0: the checkout
        _wait("3333333333333333", SERVER_SPAN, T0 + 2.9, 0.001),  # a later checkout
        _wait(
            "4444444444444444",
            "5555555555555555",
            T0 + 1.5,
            0.5,
            trace_id=OTHER_TRACE,
            status="ERROR",
            **{"error.type": "sqlalchemy.exc.TimeoutError"},
        ),
    ]
)


def test_the_slowest_hold_comes_from_the_long_held_warnings_with_its_trace() -> None:
    records = findings.pair_returns(
        [
            _warning(T0 + 2.0, 1.0),  # checked out at T0 + 1.0
            _returned(T0 + 3.05, 2.05),
            _warning(T0 + 2.5, 1.0, task_name="Task-2", backend_pid=101, trace_id=OTHER_TRACE),
            _returned(T0 + 2.9, 1.4, task_name="Task-2", backend_pid=101),
        ]
    )
    exemplars = [
        _exemplar("api", 2.05, T0 + 3.05, TRACE, SERVER_SPAN),  # the same hold
        _exemplar("api", 0.004, T0 + 5.0, OTHER_TRACE, "6666666666666666"),
        _exemplar("api", 9.0, T0 + 30.0, OTHER_TRACE, "7777777777777777"),  # after the window
        _exemplar("worker", 9.0, T0 + 5.0, OTHER_TRACE, "8888888888888888"),  # another pool
        {
            **_exemplar("api", 9.0, T0 + 5.0, OTHER_TRACE, "9999999999999999"),
            "histogram": WAIT_TIME,
        },
    ]
    hold = findings.slowest_hold(records, exemplars, ["api"], T0, T0 + 10.0, SPANS)
    assert hold == {
        "pool": "api",
        "site": SITE,
        "held_s": 2.05,
        "returned": True,
        "trace_id": TRACE,
        "span_id": SERVER_SPAN,
        "checked_out_at": T0 + 1.0,
        "pid": 7,
        "sources": ["exemplar", "long_held"],
        "slowest_bucket_s": None,
        "trace": {
            "in_span_file": True,
            "spans": 3,
            "server_span": {
                "name": "POST /external_call/{variant}/images",
                "span_id": SERVER_SPAN,
                "kind": "SERVER",
                "status_code": 200,
            },
            "holder_span": {
                "name": "POST /external_call/{variant}/images",
                "span_id": SERVER_SPAN,
                "kind": "SERVER",
                "status_code": 200,
            },
            "pool_wait": {
                "trace_id": TRACE,
                "span_id": WAIT_SPAN,
                "pool": "api",
                "wait_s": 0.05,
                "error": None,
            },
        },
    }
    assert SPANS.pool_waits(T0, T0 + 10.0, ["api"]) == {
        "count": 3,
        "errors": 1,
        "longest": {
            "trace_id": OTHER_TRACE,
            "span_id": "4444444444444444",
            "pool": "api",
            "wait_s": 0.5,
            "error": "sqlalchemy.exc.TimeoutError",
        },
    }
    assert SPANS.pool_waits(T0, T0 + 10.0, ["worker"]) == {
        "count": 0,
        "errors": 0,
        "longest": None,
    }


def test_without_long_held_alerts_the_exemplars_give_the_slowest_traced_hold() -> None:
    exemplars = [
        _exemplar("api", 0.0031, T0 + 4.0, OTHER_TRACE, "6666666666666666"),
        _exemplar("api", 0.0042, T0 + 5.0, TRACE, SERVER_SPAN),
        _exemplar("api", 0.0007, T0 + 6.0, OTHER_TRACE, "7777777777777777"),
    ]
    hold = findings.slowest_hold([], exemplars, ["api"], T0, T0 + 10.0, traces.SpanIndex())
    assert hold == {
        "pool": "api",
        "site": None,
        "held_s": 0.0042,
        "returned": True,
        "trace_id": TRACE,
        "span_id": SERVER_SPAN,
        "checked_out_at": T0 + 5.0 - 0.0042,
        "pid": 7,
        "sources": ["exemplar"],
        "slowest_bucket_s": None,
        "trace": {"in_span_file": False},
    }
    assert findings.slowest_hold([], exemplars, ["worker"], T0, T0 + 10.0) is None


def test_a_window_whose_slowest_hold_left_no_exemplar_says_so() -> None:
    """lost_update/pessimistic after naive: naive's 9.8 ms hold still owned the (5, 10] ms
    bucket's exemplar, so pessimistic's 5–10 ms holds left none; the slowest traced hold
    seen is a 0.8 ms one, and the table says the slowest was 5–10 ms."""
    bounds = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025]
    use_time = {
        "worker": {"bounds": bounds, "counts": [0, 2, 0, 43, 8, 0, 0], "sum": 0.2, "count": 53},
        "api": {"bounds": bounds, "counts": [0] * 7, "sum": 0.0, "count": 0},
    }
    assert findings.top_bucket(use_time) == (0.005, 0.01)
    assert findings.top_bucket({"a": None}) is None
    over = {"bounds": bounds, "counts": [0, 0, 0, 0, 0, 0, 1], "sum": 9.0, "count": 1}
    assert findings.top_bucket({"worker": over}) == (0.025, None)
    exemplars = [
        _exemplar("worker", 0.0098, T0 - 0.3, OTHER_TRACE, "6666666666666666"),  # naive's
        _exemplar("worker", 0.0008, T0 + 0.1, TRACE, SERVER_SPAN),
    ]
    hold = findings.slowest_hold([], exemplars, ["worker"], T0, T0 + 0.2, None, use_time)
    assert hold is not None
    assert (hold["trace_id"], hold["held_s"], hold["slowest_bucket_s"]) == (
        TRACE,
        0.0008,
        [0.005, 0.01],
    )
    section = findings._slowest_section([("pessimistic", {"pools": {}, "slowest_hold": hold})])
    assert section is not None
    assert findings.markdown_section(section).endswith(
        f"| pessimistic | 0.8 ms | `{TRACE}` | (exemplar: no code site)<br>→<br>span files "
        "not read<br>(the slowest traced hold seen: the slowest, 5 ms–10 ms, left no exemplar "
        "of this window: untraced, or its bucket kept an earlier, slower one) |"
    )
    # In the top bucket, it is the window's slowest: nothing to add.
    exemplars.append(_exemplar("worker", 0.0071, T0 + 0.15, FIX_TRACE, "7777777777777777"))
    hold = findings.slowest_hold([], exemplars, ["worker"], T0, T0 + 0.2, None, use_time)
    assert hold is not None
    assert (hold["trace_id"], hold["slowest_bucket_s"]) == (FIX_TRACE, None)


def test_an_untraced_long_hold_stays_the_slowest_and_a_still_open_one_counts_its_age() -> None:
    records = findings.pair_returns(
        [_warning(T0 + 2.0, 1.5, trace_id=None, span_id=None, thread_name="heartbeat")]
    )
    exemplars = [_exemplar("api", 0.2, T0 + 5.0, TRACE, SERVER_SPAN)]
    hold = findings.slowest_hold(records, exemplars, ["api"], T0, T0 + 10.0, SPANS)
    assert hold is not None
    assert (hold["held_s"], hold["returned"], hold["trace_id"], hold["sources"]) == (
        1.5,
        False,
        None,
        ["long_held"],
    )
    assert hold["trace"] is None


def test_the_report_shows_the_slowest_hold_with_its_trace_id(tmp_path: Path) -> None:
    records = [_warning(T0 + 2.0, 1.0), _returned(T0 + 3.05, 2.05)]
    exemplars = [
        _exemplar("api", 0.0042, T0 + 15.0, FIX_TRACE, "6666666666666666"),
    ]
    windows = {
        "external_call/anti": Measured({"api": {}}, T0, T0 + 10.0, True),
        "external_call/three_stage": Measured({"api": {}}, T0 + 11.0, T0 + 20.0, True),
    }
    results: dict[str, Any] = {"external_call": {"anti": {}, "three_stage": {}}}
    findings.collect(results, windows, records, exemplars, SPANS)
    anti = results["external_call"]["anti"]["findings"]
    assert anti["slowest_hold"]["trace_id"] == TRACE and anti["slowest_hold"]["held_s"] == 2.05
    assert anti["pool_wait_spans"]["count"] == 3
    fixed = results["external_call"]["three_stage"]["findings"]
    assert fixed["slowest_hold"]["trace_id"] == FIX_TRACE
    assert fixed["slowest_hold"]["trace"] == {"in_span_file": False}
    assert fixed["pool_wait_spans"] == {"count": 0, "errors": 0, "longest": None}

    (section,) = [
        s for s in findings.sections(results["external_call"]) if "slowest hold" in s.title
    ]
    markdown = findings.markdown_section(section)
    assert (
        f"| anti | 2.05 s | `{TRACE}` | `{SITE}`<br>→<br>"
        "`POST /external_call/{variant}/images → 200`<br>pool.wait 50 ms |"
    ) in markdown
    assert (
        f"| three_stage | 4.2 ms | `{FIX_TRACE}` | (exemplar: no code site)<br>→<br>"
        "not in the span files |"
    ) in markdown
    console = Console(width=120, record=True, color_system=None)
    doc = {"scenarios": results, "settings": {"long_held_threshold_s": 1.0}, "notes": {}}
    runner.print_scenario(console, "external_call", results["external_call"], doc)
    text = console.export_text()
    assert "pool-monitor: slowest hold and its trace" in text
    assert TRACE in text and FIX_TRACE in text  # whole, never folded


def test_windows_a_moment_apart_each_get_their_own_exemplars_and_waits() -> None:
    """lost_update's variants run a fraction of a second apart: the grace after a window
    must not take in the next one's holds and waits."""
    windows = {
        "lost_update/naive": Measured({"worker": {}}, T0, T0 + 0.2, True),
        "lost_update/pessimistic": Measured({"worker": {}}, T0 + 0.5, T0 + 0.7, True),
    }
    exemplars = [
        _exemplar("worker", 0.004, T0 + 0.1, TRACE, SERVER_SPAN),
        _exemplar("worker", 0.055, T0 + 0.6, OTHER_TRACE, "6666666666666666"),
        _exemplar("worker", 0.009, T0 + 0.3, FIX_TRACE, "7777777777777777"),  # naive's grace
    ]
    worker = {traces.POOL_ATTRIBUTE: "worker", traces.WAIT_ATTRIBUTE: 0.001}
    spans = traces.SpanIndex.of(
        [
            _span(traces.POOL_WAIT, "1" * 16, SERVER_SPAN, T0 + 0.1, T0 + 0.101, **worker),
            _span(traces.POOL_WAIT, "2" * 16, SERVER_SPAN, T0 + 0.4, T0 + 0.401, **worker),
            _span(traces.POOL_WAIT, "3" * 16, SERVER_SPAN, T0 + 0.55, T0 + 0.551, **worker),
            _span(traces.POOL_WAIT, "4" * 16, SERVER_SPAN, T0 + 0.8, T0 + 0.801, **worker),
        ]
    )
    results: dict[str, Any] = {"lost_update": {"naive": {}, "pessimistic": {}}}
    findings.collect(results, windows, [], exemplars, spans)
    naive, pessimistic = (results["lost_update"][v]["findings"] for v in ("naive", "pessimistic"))
    assert (naive["slowest_hold"]["trace_id"], naive["slowest_hold"]["held_s"]) == (
        FIX_TRACE,
        0.009,
    )
    assert (pessimistic["slowest_hold"]["trace_id"], pessimistic["slowest_hold"]["held_s"]) == (
        OTHER_TRACE,
        0.055,
    )
    assert naive["pool_wait_spans"]["count"] == 2  # T0 + 0.1 and T0 + 0.4 (grace)
    assert pessimistic["pool_wait_spans"]["count"] == 2  # T0 + 0.55 and T0 + 0.8 (grace)


def test_the_sampler_keeps_every_distinct_exemplar_of_every_worker() -> None:
    exemplar = {"value": 0.5, "timestamp": T0, "trace_id": TRACE, "span_id": SERVER_SPAN}
    hist = {"bounds": [1.0], "counts": [1, 0], "sum": 0.5, "count": 1}
    pools = {
        "api": {"histograms": {USE_TIME: {**hist, "exemplars": [exemplar, None]}}},
        "worker": {"histograms": {USE_TIME: hist, WAIT_TIME: {**hist, "exemplars": [None]}}},
    }
    sample = WorkerSample(7, T0, pools, {})
    assert exemplars_of(sample) == [{"pool": "api", "histogram": USE_TIME, "pid": 7, **exemplar}]
    sampler = MonitorSampler("http://127.0.0.1:1", 2)
    try:
        sampler.keep_exemplars(sample)
        sampler.keep_exemplars(sample)  # polled again: the same exemplar, kept once
        sampler.keep_exemplars(WorkerSample(8, T0, pools, {}))  # another worker's
    finally:
        asyncio.run(sampler.close())
    assert [(e["pid"], e["trace_id"]) for e in sampler.exemplars] == [(7, TRACE), (8, TRACE)]


# --- the real stack ---------------------------------------------------------------------

LATENCY_S = 0.3  # the long-held threshold is half of it: 0.15 s


@pytest.fixture(scope="module")
def stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoStack]:
    create_schema(database_url)
    logs = tmp_path_factory.mktemp("demo-traces") / "logs"
    with DemoStack(database_url, latency_s=LATENCY_S, log_dir=logs, base_port=None) as running:
        yield running


def _traceparent(trace_id: str, parent: str = SERVER_SPAN) -> dict[str, str]:
    return {"traceparent": f"00-{trace_id}-{parent}-01"}


def _wait_for(predicate: Any, what: str, timeout_s: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _request_spans(stack: DemoStack, trace_id: str) -> list[dict[str, Any]]:
    """The trace's spans once its SERVER span is in a file: a worker ends (and writes) it
    just after sending the response, so the client may be a moment ahead."""

    def ready() -> list[dict[str, Any]] | None:
        spans = traces.read(stack.traces_dir, trace_id)
        return spans if any(s["kind"] == "SERVER" for s in spans) else None

    return _wait_for(ready, f"the server span of trace {trace_id}")


def _long_held(stack: DemoStack, trace_id: str) -> list[dict[str, Any]]:
    return [
        r
        for r in findings.pair_returns(events.read(stack.events_path))
        if r.get("level") == "WARNING" and r.get("trace_id") == trace_id
    ]


def test_a_traced_request_holding_past_the_threshold_gives_a_finding_with_its_trace_id(
    stack: DemoStack,
) -> None:
    trace_id = "5ce0e9a56015fec5aadfa328ae398115"
    sampler = MonitorSampler(stack.service_url, stack.workers)

    async def run() -> tuple[httpx.Response, Measured]:
        try:
            assert await sampler.fresh(timeout_s=30)
            started = time.time()
            async with httpx.AsyncClient(base_url=stack.service_url, timeout=30) as client:
                response = await client.post(
                    "/external_call/anti/images", headers=_traceparent(trace_id)
                )
            ended = time.time()
            assert await sampler.fresh(after=ended, timeout_s=30)  # every worker, after it
            return response, Measured({"api": {}}, started, ended, True)
        finally:
            await sampler.close()

    response, window = asyncio.run(run())
    assert response.status_code == 200

    # The monitor's warning names the request's trace, and its span: the server span.
    (warning,) = _wait_for(
        lambda: [r for r in _long_held(stack, trace_id) if r["returned_held_s"]],
        "the long-held warning and its return",
    )
    assert warning["pool"] == "api" and warning["site"].endswith(":anti_process_image")
    assert warning["returned_held_s"] >= LATENCY_S
    spans = _request_spans(stack, trace_id)
    (server,) = [s for s in spans if s["kind"] == "SERVER"]
    assert server["parent_id"] == SERVER_SPAN  # the caller's span, from `traceparent`
    assert server["span_id"] == warning["span_id"]
    assert server["name"] == "POST /external_call/{variant}/images"
    assert {
        "http.request.method": "POST",
        "url.path": "/external_call/anti/images",
        "http.route": "/external_call/{variant}/images",
        "http.response.status_code": 200,
    }.items() <= server["attributes"].items()
    (wait,) = [s for s in spans if s["name"] == traces.POOL_WAIT]
    assert wait["parent_id"] == server["span_id"]
    assert wait["attributes"][traces.POOL_ATTRIBUTE] == "api"
    # The same hold is the use-time histogram's exemplar, with the same ids and duration.
    # The same hold is an exemplar of the use-time histogram (and its wait, of the
    # wait-time one), with the same ids and durations.
    mine = {e["histogram"]: e for e in sampler.exemplars if e["trace_id"] == trace_id}
    assert set(mine) == {USE_TIME, WAIT_TIME}
    assert {(e["pool"], e["span_id"]) for e in mine.values()} == {("api", server["span_id"])}
    assert mine[USE_TIME]["value"] == pytest.approx(warning["returned_held_s"], abs=1e-6)
    assert mine[WAIT_TIME]["value"] == pytest.approx(
        wait["attributes"][traces.WAIT_ATTRIBUTE], abs=1e-3
    )

    # The report's finding for that window: this trace, confirmed in the span files.
    results: dict[str, Any] = {"external_call": {"anti": {}}}
    index = traces.SpanIndex.of(traces.read(stack.traces_dir))
    findings.collect(
        results,
        {"external_call/anti": window},
        events.read(stack.events_path),
        sampler.exemplars,
        index,
    )
    hold = results["external_call"]["anti"]["findings"]["slowest_hold"]
    assert hold["trace_id"] == trace_id and hold["span_id"] == server["span_id"]
    assert hold["sources"] == ["exemplar", "long_held"] and hold["site"] == warning["site"]
    assert hold["held_s"] == pytest.approx(warning["returned_held_s"])
    assert hold["trace"]["in_span_file"] is True
    assert hold["trace"]["server_span"]["name"] == "POST /external_call/{variant}/images"
    assert hold["trace"]["pool_wait"]["span_id"] == wait["span_id"]

    # The trace's spans, served by whichever worker answers (both read every file).
    with httpx.Client(base_url=stack.service_url, timeout=10) as client:
        served = client.get(f"/demo/traces/{trace_id}").json()
        assert {s["span_id"] for s in served["spans"]} == {server["span_id"], wait["span_id"]}
        assert client.get(f"/demo/traces/{OTHER_TRACE}").status_code == 404
        assert client.get("/demo/traces/nope").status_code == 400


def test_requests_an_exhausted_pool_refuses_show_a_failed_pool_wait_span(
    stack: DemoStack,
) -> None:
    ids = [f"{i:02d}" + "c" * 30 for i in range(12)]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=stack.service_url, timeout=30) as client:
            return await asyncio.gather(
                *(client.post("/external_call/anti/images", headers=_traceparent(i)) for i in ids)
            )

    statuses = dict(zip(ids, [r.status_code for r in asyncio.run(burst())], strict=True))
    refused = [i for i, status in statuses.items() if status == 503]
    assert refused and set(statuses.values()) <= {200, 503}
    for trace_id in ids:
        spans = _request_spans(stack, trace_id)
        (server,) = [s for s in spans if s["kind"] == "SERVER"]
        assert server["attributes"]["http.response.status_code"] == statuses[trace_id]
        (wait,) = [s for s in spans if s["name"] == traces.POOL_WAIT]
        assert wait["parent_id"] == server["span_id"]
        if trace_id in refused:  # waited the pool timeout, then failed
            assert wait["status"] == "ERROR"
            assert wait["attributes"]["error.type"] == "sqlalchemy.exc.TimeoutError"
            assert wait["attributes"][traces.WAIT_ATTRIBUTE] >= LATENCY_S / 2 * 0.9
        else:
            assert wait["status"] == "UNSET"


def test_a_background_job_and_request_threads_stay_in_the_requests_trace(
    stack: DemoStack,
) -> None:
    job_trace, threads_trace = "6" * 32, "7" * 32
    with httpx.Client(base_url=stack.service_url, timeout=30) as client:
        queued = client.post("/pool_isolation/shared/jobs", headers=_traceparent(job_trace))
        assert queued.status_code == 202
        run = client.post("/lost_update/naive/run", json={}, headers=_traceparent(threads_trace))
        assert run.status_code == 200

    # The job (a 0.3 s render holding a `shared` connection) runs after the 202, in a span
    # of its own under the request's: its long-held warning names that span.
    (warning,) = _wait_for(lambda: _long_held(stack, job_trace), "the job's long-held warning")

    def job_spans() -> list[dict[str, Any]] | None:
        spans = traces.read(stack.traces_dir, job_trace)
        return spans if "job pool_isolation/shared" in {s["name"] for s in spans} else None

    spans = _wait_for(job_spans, "the job's span, ended")
    by_name = {s["name"]: s for s in spans}
    server = by_name["POST /pool_isolation/{variant}/jobs"]
    job = by_name["job pool_isolation/shared"]
    assert job["parent_id"] == server["span_id"] and warning["span_id"] == job["span_id"]
    assert warning["pool"] == "shared"
    (wait,) = [s for s in spans if s["name"] == traces.POOL_WAIT]
    assert wait["parent_id"] == job["span_id"]
    assert wait["attributes"][traces.POOL_ATTRIBUTE] == "shared"

    # lost_update's increment threads run in a copy of the request's context: their
    # checkouts on the `worker` pool are in its trace.
    waits = [
        s
        for s in _request_spans(stack, threads_trace)
        if s["name"] == traces.POOL_WAIT and s["attributes"][traces.POOL_ATTRIBUTE] == "worker"
    ]
    # 2 threads × 25 increments: a session returns its connection at each commit, so each
    # increment checks out again (without the context, only the request thread's 2 would).
    assert len(waits) >= 2 * 25


def test_the_sidecars_live_holds_link_to_the_trace_the_service_serves(stack: DemoStack) -> None:
    if not stack.sidecar_url:
        pytest.skip(stack.sidecar_note)
    if not sidecar_takes(TRACE_URL_OPTION):
        pytest.skip(f"the installed sidecar has no {TRACE_URL_OPTION}")
    trace_id = "8" * 32
    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(1) as pool:
        # One request holding its connection for 3 s, long enough to watch it live.
        client.post(f"{stack.external_url}/admin/latency", json={"latency_s": 3.0})
        try:
            pending = pool.submit(
                client.post,
                f"{stack.service_url}/external_call/anti/images",
                headers=_traceparent(trace_id),
            )

            def live_row() -> dict[str, Any] | None:
                rows = client.get(f"{stack.sidecar_url}/api/checkouts").json()
                return next((r for r in rows if r.get("trace_id") == trace_id), None)

            row = _wait_for(live_row, "the hold on the sidecar's /api/checkouts", 2.5)
            assert pending.result().status_code == 200
        finally:
            client.post(f"{stack.external_url}/admin/latency", json={"latency_s": LATENCY_S})
        assert row["trace_url"] == f"{stack.service_url}/demo/traces/{trace_id}"
        (server,) = [s for s in _request_spans(stack, trace_id) if s["kind"] == "SERVER"]
        assert row["span_id"] == server["span_id"]
        served = client.get(row["trace_url"])
        assert served.status_code == 200
        assert server["span_id"] in {s["span_id"] for s in served.json()["spans"]}
