"""OpenTelemetry tracing in the demo service, and the span files read back by the runner.

Service side (`setup()`, called by `demo_app.service` when `DemoSettings.traces_dir` is
set, as `DemoStack` does): each worker process gets an SDK `TracerProvider` (resource
`service.name` = `SERVICE_NAME`) whose finished spans go, one JSON object a line
(`ReadableSpan.to_json()`, compact), to `<traces_dir>/spans-<pid>.jsonl`; and
opentelemetry-instrumentation-asgi's middleware opens one SERVER span per request, named
`METHOD route` (`POST /external_call/{variant}/images`), with the stable HTTP semantic
conventions (`http.request.method`, `url.path`, `http.route`,
`http.response.status_code`), continuing an incoming `traceparent` (the global
propagator's `extract`). The engines are instrumented with `trace_pool_wait=True`
(`demo_app.db`), so every checkout under a sampled trace adds a `pool.wait` child span:
the requests the exhausted pools make wait, or time out, show it in their trace.

Runner side (`read()`, `SpanIndex`): the span files parsed back, so the report can confirm
that the trace id the monitor attached to a hold is a real trace, and say what is in it.

Spans are exported synchronously (`SimpleSpanProcessor`, one `os.write` per span on an
`O_APPEND` descriptor): a span is in its file as soon as it ends, so the runner never
reads a file that is still missing the spans of the last requests.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

SERVICE_NAME = "pool-monitor-demo"
#: Where the span files go when the service runs outside `DemoStack` (uvicorn by hand).
ENV_VAR = "DEMO_TRACES_DIR"
SPAN_FILE_GLOB = "spans-*.jsonl"
#: Requests that are not the demo's workload: polled by the runner many times a second,
#: scraped, or reading the spans themselves. No span for them.
UNTRACED_PATHS = ("/demo/monitor", "/demo/traces", "/healthz", "/metrics")
#: The name `monitor.tracing` gives the span around a wait for a connection.
POOL_WAIT = "pool.wait"
POOL_ATTRIBUTE = "db.client.connection.pool.name"
WAIT_ATTRIBUTE = "db.client.connection.wait_time"

_HEX = re.compile(r"^[0-9a-f]+$")


def span_file(directory: str | Path, pid: int | None = None) -> Path:
    return Path(directory) / f"spans-{os.getpid() if pid is None else pid}.jsonl"


# --- service side -------------------------------------------------------------------------


class SpanFile(SpanExporter):
    """A `SpanExporter` appending each finished span as one compact JSON line."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(path)
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        fd = self._fd
        if fd is None:
            return SpanExportResult.FAILURE
        data = "".join(span.to_json(indent=None) + "\n" for span in spans).encode()
        try:
            os.write(fd, data)  # one write: the two workers' lines never interleave
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


@dataclass
class Tracing:
    """This process's tracer provider and the span file it writes; `close()` at shutdown."""

    provider: Any
    exporter: SpanFile

    @property
    def path(self) -> Path:
        return self.exporter.path

    def close(self) -> None:
        self.provider.force_flush()
        self.exporter.shutdown()


#: The provider `setup()` made global in this process (OpenTelemetry allows one).
_provider: Any = None


def setup(directory: str | Path, service_name: str = SERVICE_NAME) -> Tracing:
    """Trace this process: an SDK `TracerProvider` (made the global one, which the
    monitor's `pool.wait` spans use) writing to `spans-<pid>.jsonl` in `directory`.

    Called again in the same process (a second app), it adds a new file to the same
    provider. If something else already set an SDK provider, our file is added to that one.
    """
    global _provider
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    if _provider is None:
        resource = Resource.create({"service.name": service_name, "process.pid": os.getpid()})
        mine = TracerProvider(resource=resource)
        trace.set_tracer_provider(mine)  # refused (with a warning) if one is set already
        current = trace.get_tracer_provider()
        _provider = current if hasattr(current, "add_span_processor") else mine
    exporter = SpanFile(span_file(directory))
    _provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(_provider, exporter)


def route_of(routes: Iterable[Any], scope: Mapping[str, Any]) -> str | None:
    """The path template of the Starlette route that will serve `scope`, if any (a route
    matching the path but not the method counts: it answers 405)."""
    from starlette.routing import Match

    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return route.path
        if match == Match.PARTIAL and partial is None:
            partial = route.path
    return partial


def middleware(routes: Sequence[Any], tracing: Tracing) -> Any:
    """opentelemetry-instrumentation-asgi's middleware for the demo's routes: one SERVER
    span per request named `METHOD route`, with `http.route`; no span for
    `UNTRACED_PATHS`, and no per-message `send`/`receive` child spans."""
    # The stable HTTP conventions (http.request.method, url.path,
    # http.response.status_code); read once per process, when the middleware is built.
    os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http")
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from starlette.middleware import Middleware

    def span_details(scope: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
        method = str(scope.get("method") or "HTTP").upper()
        route = route_of(routes, scope) if scope.get("type") == "http" else None
        if route is None:  # unknown route: the method alone (no path: unbounded names)
            return method, {}
        return f"{method} {route}", {"http.route": route}

    return Middleware(
        OpenTelemetryMiddleware,
        excluded_urls=",".join(UNTRACED_PATHS),
        default_span_details=span_details,
        tracer_provider=tracing.provider,
        exclude_spans=["receive", "send"],
    )


# --- runner side: the span files ----------------------------------------------------------


def _hex(value: Any) -> str | None:
    """`0x4bf9…` (to_json) or `4bf9…` → lowercase hex without prefix; None otherwise."""
    if not isinstance(value, str):
        return None
    text = value.lower().removeprefix("0x")
    return text if text and _HEX.match(text) else None


def _unix(value: Any) -> float | None:
    """An ISO 8601 UTC time as `to_json` writes it (`…Z`) → unix seconds."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def parse_span(data: Mapping[str, Any]) -> dict[str, Any] | None:
    """One span of a span file as the report uses it, or None if it is not one."""
    context = data.get("context")
    if not isinstance(context, Mapping):
        return None
    trace_id, span_id = _hex(context.get("trace_id")), _hex(context.get("span_id"))
    start, end = _unix(data.get("start_time")), _unix(data.get("end_time"))
    if trace_id is None or span_id is None or start is None or end is None:
        return None
    status = data.get("status") if isinstance(data.get("status"), Mapping) else {}
    attributes = data.get("attributes") if isinstance(data.get("attributes"), Mapping) else {}
    return {
        "trace_id": trace_id,
        "span_id": span_id,
        "parent_id": _hex(data.get("parent_id")),
        "name": str(data.get("name", "")),
        "kind": str(data.get("kind", "")).removeprefix("SpanKind."),
        "start": start,
        "end": end,
        "status": str(status.get("status_code", "UNSET")),
        "attributes": dict(attributes),
    }


def read_file(path: str | Path, trace_id: str | None = None) -> list[dict[str, Any]]:
    """The spans of one file (only those of `trace_id` if given); bad lines are skipped."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    needle = f"0x{trace_id}" if trace_id else None
    out = []
    for line in text.splitlines():
        if needle is not None and needle not in line:
            continue
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            span = parse_span(data) if isinstance(data, dict) else None
            if span is not None and (trace_id is None or span["trace_id"] == trace_id):
                out.append(span)
    return out


def read(directory: str | Path | None, trace_id: str | None = None) -> list[dict[str, Any]]:
    """Every worker's spans in `directory`, by start time."""
    if not directory:
        return []
    spans = [
        span
        for path in sorted(Path(directory).glob(SPAN_FILE_GLOB))
        for span in read_file(path, trace_id)
    ]
    spans.sort(key=lambda s: s["start"])
    return spans


@dataclass
class SpanIndex:
    """Spans by trace id, and what the report says about one trace."""

    spans: list[dict[str, Any]] = field(default_factory=list)
    by_trace: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @classmethod
    def of(cls, spans: Iterable[dict[str, Any]]) -> SpanIndex:
        index = cls()
        for span in spans:
            index.spans.append(span)
            index.by_trace.setdefault(span["trace_id"], []).append(span)
        return index

    def __bool__(self) -> bool:
        return bool(self.spans)

    def describe(
        self,
        trace_id: str,
        span_id: str | None = None,
        pool: str | None = None,
        checked_out_at: float | None = None,
    ) -> dict[str, Any]:
        """What the span files hold of `trace_id`: its SERVER span, the span the hold was
        checked out under (`span_id`) and the `pool.wait` span of that checkout: the one
        under that span, on `pool`, that ended nearest `checked_out_at` (unix time)."""
        spans = self.by_trace.get(trace_id, [])
        if not spans:
            return {"in_span_file": False}
        by_id = {s["span_id"]: s for s in spans}
        server = next((s for s in spans if s["kind"] == "SERVER"), None)
        holder = by_id.get(span_id) if span_id else None
        waits = [
            s
            for s in spans
            if s["name"] == POOL_WAIT
            and (span_id is None or s["parent_id"] == span_id)
            and (pool is None or s["attributes"].get(POOL_ATTRIBUTE) == pool)
        ]
        wait = None
        if waits:
            if checked_out_at is not None:
                wait = min(waits, key=lambda s: abs(s["end"] - checked_out_at))
            else:
                wait = max(waits, key=lambda s: s["end"] - s["start"])
        return {
            "in_span_file": True,
            "spans": len(spans),
            "server_span": _brief(server) if server else None,
            "holder_span": _brief(holder) if holder else None,
            "pool_wait": _wait_brief(wait) if wait else None,
        }

    def pool_waits(self, start: float, end: float, pools: Iterable[str]) -> dict[str, Any]:
        """`pool.wait` spans on `pools` that started in [start, end): how many, how many
        failed (a pool timeout), and the longest, with its trace id."""
        names = set(pools)
        waits = [
            s
            for s in self.spans
            if s["name"] == POOL_WAIT
            and start <= s["start"] < end
            and s["attributes"].get(POOL_ATTRIBUTE) in names
        ]
        longest = max(waits, key=lambda s: s["end"] - s["start"], default=None)
        return {
            "count": len(waits),
            "errors": sum(s["status"] == "ERROR" for s in waits),
            "longest": None if longest is None else _wait_brief(longest),
        }


def _brief(span: Mapping[str, Any]) -> dict[str, Any]:
    attributes = span["attributes"]
    out = {"name": span["name"], "span_id": span["span_id"], "kind": span["kind"]}
    status = attributes.get("http.response.status_code")
    if status is not None:
        out["status_code"] = status
    return out


def _wait_brief(span: Mapping[str, Any]) -> dict[str, Any]:
    attributes = span["attributes"]
    waited = attributes.get(WAIT_ATTRIBUTE)
    if not isinstance(waited, (int, float)):
        waited = span["end"] - span["start"]
    return {
        "trace_id": span["trace_id"],
        "span_id": span["span_id"],
        "pool": attributes.get(POOL_ATTRIBUTE),
        "wait_s": float(waited),
        "error": attributes.get("error.type") if span["status"] == "ERROR" else None,
    }
