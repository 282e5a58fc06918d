"""The snapshot and live documents' schema: what the sidecar accepts from a worker's file.

Any process in the pod can write the snapshot directory, so a file is untrusted input.
Everything the merge, the API and the page read is declared here, with its type and its
bounds, and checked by pydantic (its JSON parser and validator are Rust: a 22 KiB document
validates in well under a millisecond, and nesting deeper than its recursion limit is an
error, not a `RecursionError`). A document either validates whole or is rejected with
the first problem's path; keys this version does not know are dropped, so nothing
unchecked reaches the merge.

Bounds (`MAX_*`) are part of the contract with the writers, documented in the sidecar
README: numbers are finite, non-negative where they count or measure, and at most
`MAX_NUMBER` (2**53, exact as a float, far beyond any real counter); strings, lists and
maps have a length limit each. Site-labelled counters may name up to `MAX_LABELS_IN`
sites on input; the aggregator then keeps `--max-sites` of them per pool and folds the
rest into `other` (`files.fold_sites`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError
from typing_extensions import NotRequired, TypedDict

#: Largest number accepted anywhere: exact as a float, and a sum of 10,000 of them is
#: still finite.
MAX_NUMBER = float(2**53)
#: Pools in one process's document (engines instrumented in one process).
MAX_POOLS = 8
#: Live holds per pool in one document (the writer's `MAX_HOLDS_PER_POOL`).
MAX_HOLDS_PER_POOL = 1000
#: Live holds kept per process, all pools together (the oldest; the rest are counted in
#: `holds_dropped`): 64 workers at this bound stay within the chart's memory limit.
MAX_HOLDS_PER_PROCESS = 200
#: Label values (code sites) one labelled counter may carry on input (the writers'
#: `max_sites` upper bound), before the sidecar's own per-pool limit folds the rest.
MAX_LABELS_IN = 10_001
#: Named metrics per section (counters, gauges, histograms, internal).
MAX_METRICS = 64
#: Locks per lock metric (the application's named locks).
MAX_LOCKS = 1000
MAX_NAME = 200  # pool names, metric names
MAX_TEXT = 400  # code sites, thread and task names, and other free text
MAX_BUCKETS = 64

#: Strict: no "1" for 1, no true for 1.0 (a JSON integer is still a number).
_Strict = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)

Name = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME)]
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT)]
Count = Annotated[float, Field(ge=0, le=MAX_NUMBER, allow_inf_nan=False)]
Finite = Annotated[float, Field(ge=-MAX_NUMBER, le=MAX_NUMBER, allow_inf_nan=False)]
Seconds = Annotated[float, Field(ge=0, le=MAX_NUMBER, allow_inf_nan=False)]
Pid = Annotated[int, Field(ge=0, lt=2**31)]
Serial = Annotated[int, Field(ge=0, lt=2**53)]
Labelled = Annotated[dict[Text, Count], Field(max_length=MAX_LABELS_IN)]
Value = Count | Labelled


#: OpenTelemetry ids as trace backends and exemplars write them: lowercase hex.
TraceId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
SpanId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]


class Exemplar(TypedDict):
    """A traced observation of one bucket (see `monitor.ledger.Exemplars`)."""

    __pydantic_config__ = _Strict  # type: ignore[misc]

    value: Seconds
    timestamp: Annotated[float, Field(gt=0, le=MAX_NUMBER, allow_inf_nan=False)]
    trace_id: TraceId
    span_id: SpanId


class Histogram(TypedDict):
    __pydantic_config__ = _Strict  # type: ignore[misc]

    bounds: Annotated[list[Finite], Field(max_length=MAX_BUCKETS)]
    counts: Annotated[list[Count], Field(max_length=MAX_BUCKETS + 1)]
    sum: Count
    count: NotRequired[Count]
    exemplars: NotRequired[Annotated[list[Exemplar | None], Field(max_length=MAX_BUCKETS + 1)]]


class Hold(TypedDict, total=False):
    __pydantic_config__ = _Strict  # type: ignore[misc]

    age_s: Seconds
    started_at: Finite
    site: Text | None
    thread: Text | None
    thread_id: Annotated[int, Field(ge=0, lt=2**64)] | None
    task: Text | None
    backend_pid: Pid | None
    sql_time_s: Seconds
    executing: bool
    long_held: bool
    board_slot: Annotated[int, Field(ge=0, lt=2**20)]
    trace_id: TraceId
    span_id: SpanId
    started_mono: Annotated[float, Field(gt=0, le=MAX_NUMBER, allow_inf_nan=False)]


class Process(TypedDict):
    __pydantic_config__ = _Strict  # type: ignore[misc]

    hostname: NotRequired[Text]
    pid: Pid
    start_time: NotRequired[Finite]
    argv0: NotRequired[Text]
    start_token: NotRequired[Annotated[str, StringConstraints(max_length=64)]]
    boot_id: NotRequired[Annotated[str, StringConstraints(max_length=64)]]
    pid_ns: NotRequired[Annotated[str, StringConstraints(max_length=64)]]


class PoolSettings(TypedDict, total=False):
    __pydantic_config__ = _Strict  # type: ignore[misc]

    long_held_threshold: Seconds | None
    max_sites: Annotated[int, Field(ge=1, le=MAX_LABELS_IN)]


Holds = Annotated[list[Hold], Field(max_length=MAX_HOLDS_PER_POOL)]


class Pool(TypedDict):
    __pydantic_config__ = _Strict  # type: ignore[misc]

    version: NotRequired[int]
    pool: Name
    monitor_id: NotRequired[Serial]
    pool_class: NotRequired[Text | None]
    settings: NotRequired[PoolSettings]
    gauges: NotRequired[Annotated[dict[Name, Value], Field(max_length=MAX_METRICS)]]
    counters: NotRequired[Annotated[dict[Name, Value], Field(max_length=MAX_METRICS)]]
    histograms: NotRequired[Annotated[dict[Name, Histogram], Field(max_length=MAX_METRICS)]]
    holds: NotRequired[Holds]
    holds_dropped: NotRequired[Serial]
    internal: NotRequired[Annotated[dict[Name, Count], Field(max_length=MAX_METRICS)]]


class Snapshot(TypedDict):
    """A process's full document (`monitor.exporters.snapshot.process_snapshot`)."""

    __pydantic_config__ = _Strict  # type: ignore[misc]

    version: Literal[1]
    process: Process
    written_at: Annotated[float, Field(gt=0, le=MAX_NUMBER, allow_inf_nan=False)]
    interval: Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False)]
    exited: NotRequired[bool]
    serving: NotRequired[bool]
    writer: NotRequired[Annotated[dict[Name, Count], Field(max_length=MAX_METRICS)]]
    pools: Annotated[list[Pool], Field(max_length=MAX_POOLS)]
    locks: NotRequired[
        Annotated[
            dict[Name, Annotated[dict[Text, Histogram], Field(max_length=MAX_LOCKS)]],
            Field(max_length=MAX_METRICS),
        ]
    ]


class LivePool(TypedDict):
    __pydantic_config__ = _Strict  # type: ignore[misc]

    pool: Name
    monitor_id: NotRequired[Serial]
    long_held_threshold: NotRequired[Seconds | None]
    holds: Holds
    holds_dropped: NotRequired[Serial]


class Live(TypedDict):
    """A process's live document (`monitor.exporters.snapshot.live_document`)."""

    __pydantic_config__ = _Strict  # type: ignore[misc]

    version: Literal[1]
    kind: Literal["live"]
    process: Process
    written_at: Annotated[float, Field(gt=0, le=MAX_NUMBER, allow_inf_nan=False)]
    check_interval: NotRequired[Seconds]
    pools: Annotated[list[LivePool], Field(max_length=MAX_POOLS)]


SNAPSHOT: TypeAdapter[Snapshot] = TypeAdapter(Snapshot)
LIVE: TypeAdapter[Live] = TypeAdapter(Live)


class SchemaError(ValueError):
    """A document that does not validate: `reason` as in `files.REASONS`, `detail` names
    the first problem and where it is (never the offending value in full)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def parse(raw: bytes, adapter: TypeAdapter[Any]) -> dict[str, Any]:
    """Parse and validate `raw` JSON with `adapter`; raise `SchemaError`."""
    try:
        return adapter.validate_json(raw)  # type: ignore[no-any-return]
    except ValidationError as exc:
        raise SchemaError(*_describe(exc)) from None


def _union_tag(part: Any) -> bool:
    return isinstance(part, str) and (
        part.startswith(("constrained-", "dict[", "list[", "function-")) or part in ("float", "int")
    )


def _describe(exc: ValidationError) -> tuple[str, str]:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0] if errors else {"loc": (), "msg": str(exc), "type": ""}
    # (pydantic names the member of a union it tried, e.g. "constrained-float": not a key)
    loc = tuple(p for p in first.get("loc", ()) if not _union_tag(p))
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    kind = str(first.get("type", ""))
    if kind.startswith("json_"):
        reason = "truncated" if "EOF" in str(first.get("msg", "")) else "corrupt"
        return reason, f"not JSON: {first.get('msg')}"
    if loc[:1] == ("version",) or loc[:1] == ("kind",):
        return "unknown_version", f"{where or 'document'}: {first.get('msg')}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return "invalid", f"{where or 'document'}: {first.get('msg')}{more}"
