"""OpenTelemetry tracing, read from the application's context: which span a checkout ran
under, and the opt-in span around a wait for a connection.

Nothing here imports OpenTelemetry unless it is installed, and nothing costs a checkout
more than one context-variable read when it is: `span_reader()` returns a function that
reads the current span straight from the API's context variable (~40 ns, against
~400 ns through `trace.get_current_span()`), checked once against the public API so a
different runtime context (`OTEL_PYTHON_CONTEXT`) falls back to the public call.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, NamedTuple

#: The pool-wait span's name and the attributes it carries (semantic-convention names
#: where one exists: the pool name is the `db.client.connection.*` metrics' attribute).
WAIT_SPAN_NAME = "pool.wait"
POOL_NAME_ATTRIBUTE = "db.client.connection.pool.name"
WAIT_TIME_ATTRIBUTE = "db.client.connection.wait_time"
TRACER_NAME = "pool-monitor"


class TraceIds(NamedTuple):
    """A span's ids as OpenTelemetry writes them: lowercase hex, 32 and 16 digits."""

    trace_id: str
    span_id: str
    sampled: bool


def trace_ids(span_context: Any) -> TraceIds | None:
    """The ids of a span context, or None if it is not a valid one (no trace)."""
    try:
        if span_context is None or not span_context.is_valid:
            return None
        return TraceIds(
            format(span_context.trace_id, "032x"),
            format(span_context.span_id, "016x"),
            bool(span_context.trace_flags.sampled),
        )
    except Exception:  # not a SpanContext: whatever it is, it names no trace
        return None


def span_reader() -> Callable[[], Any] | None:
    """A function returning the application's current span (None if there is none), or
    None when OpenTelemetry's API is not installed: then a checkout pays nothing."""
    try:
        from opentelemetry import context, trace
    except Exception:  # not installed, or broken: tracing is not the application's to lose
        return None
    public = trace.get_current_span
    invalid = trace.INVALID_SPAN

    def read_public() -> Any:
        span = public()
        return None if span is invalid else span

    runtime = getattr(context, "_RUNTIME_CONTEXT", None)
    var = getattr(runtime, "_current_context", None)
    key = getattr(getattr(trace, "propagation", None), "_SPAN_KEY", None)
    if not isinstance(var, ContextVar) or not isinstance(key, str):
        return read_public
    get_context = var.get

    def read_fast() -> Any:
        return get_context().get(key)

    # The private path must agree with the public one, or it is not used.
    try:
        probe = trace.NonRecordingSpan(trace.SpanContext(1, 1, False))
        with trace.use_span(probe):
            agrees = read_fast() is probe is read_public()
    except Exception:
        return None
    return read_fast if agrees else read_public


class WaitSpans:
    """Emits a `pool.wait` span for a checkout made under a sampled, recording span: a
    child of that span, from the start of the wait to the connection in hand (or the
    error), so a trace shows the time lost to the pool. Made after the fact with explicit
    start and end times: nothing is made current, so the connect itself (and whatever
    instrumentation traces it) is not reparented."""

    def __init__(self, pool_name: str, tracer_provider: Any = None) -> None:
        from opentelemetry import trace

        self._trace = trace
        self._provider = tracer_provider
        self._tracer: Any = None
        self.pool_name = pool_name

    @property
    def tracer(self) -> Any:
        """Resolved on first use: the global provider may be set after `instrument()`."""
        if self._tracer is None:
            provider = self._provider or self._trace.get_tracer_provider()
            self._tracer = provider.get_tracer(TRACER_NAME)
        return self._tracer

    def parent(self, span: Any) -> Any:
        """`span` if a wait span would be kept under it (sampled and recording), else None."""
        if span is None or not span.is_recording():
            return None
        return span if span.get_span_context().trace_flags.sampled else None

    def emit(
        self, parent: Any, start_ns: int, waited: float, error: BaseException | None = None
    ) -> None:
        trace = self._trace
        end_ns = start_ns + int(waited * 1e9)  # the wait, not the wait plus our bookkeeping
        span = self.tracer.start_span(
            WAIT_SPAN_NAME,
            context=trace.set_span_in_context(parent),
            kind=trace.SpanKind.INTERNAL,
            start_time=start_ns,
            attributes={POOL_NAME_ATTRIBUTE: self.pool_name, WAIT_TIME_ATTRIBUTE: waited},
        )
        if error is not None:
            span.set_attribute("error.type", _error_type(error))
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)[:200]))
        span.end(end_time=end_ns)


def _error_type(error: BaseException) -> str:
    kind = type(error)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
