"""What pool-monitor saw in each variant: the findings the demo shows first.

Per variant, over its window (`drivers.measure`: every worker's `PoolMonitor.snapshot()`,
merged as the sidecar merges them, after minus before; log records by their time):

* **code sites by hold time**: `sqlalchemy.pool.site_use_time` by `code.site`, with the
  share of that time no SQL ran (`site_idle_in_use_time`: the connection sat in a session
  while the code did something else, e.g. an external call) and the site's long-held
  alerts (`sqlalchemy.pool.long_held_events`);
* **long-held alerts** as the monitor logged them (`monitor.long_held`, from the service's
  JSON lines, `demo_app.events`): where the connection was checked out, how long it was
  held, and the holder's stack when the alert fired, innermost frame last: that is where
  an external call inside a session shows;
* **misuse**: `monitor.misuse` warnings and the `cross_thread_uses` / `concurrent_uses`
  counters (a connection used from two threads, seed 000);
* **lock contention**: `monitor.lock`'s `app.lock.wait_time` / `hold_time` histograms
  (seed 001's session store);
* **the slowest hold and its trace**: the OpenTelemetry trace id the monitor recorded at
  the slowest checkout of the window, confirmed against the service's span files
  (`demo_app.traces`): the request's SERVER span and the `pool.wait` span of that checkout.
  `slowest_hold()` says where it comes from and why.

`collect()` adds them to each variant's figures (`figures["findings"]`, so report.json has
them); `sections()` turns a scenario's findings into tables that the terminal (rich) and
report.md share, as `tables.py` does for the app's own numbers. `waiting_notes()` explains a
fix that shows more callers waiting for a connection than its anti-pattern.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from demo_app import events, snapshots, traces
from demo_app.tables import _num, _seconds, _share

LONG_HELD_EVENTS = "sqlalchemy.pool.long_held_events"
#: Code sites shown per variant (report.json keeps them all).
TOP_SITES = 3
#: A record this long after a window's end still belongs to it (logging is synchronous,
#: so this only covers clock granularity).
GRACE_S = 1.0

Figures = dict[str, Any]


# --- building the findings --------------------------------------------------------------


def site_rows(deltas: Mapping[str, snapshots.Snapshot]) -> list[dict[str, Any]]:
    """Every code site seen in the window, by hold time (largest first), all pools."""
    rows: list[dict[str, Any]] = []
    for pool, snap in deltas.items():
        counters = snap.get("counters", {})

        def by_site(name: str, counters: dict[str, Any] = counters) -> dict[str, float]:
            value = counters.get(name) or {}
            return value if isinstance(value, Mapping) else {}

        use, idle = by_site(snapshots.SITE_USE_TIME), by_site(snapshots.SITE_IDLE_TIME)
        checkouts, alerts = by_site(snapshots.SITE_CHECKOUTS), by_site(LONG_HELD_EVENTS)
        cross, concurrent = by_site(snapshots.CROSS_THREAD), by_site(snapshots.CONCURRENT)
        for site in sorted({*use, *checkouts, *alerts, *cross, *concurrent}):
            n, held = int(checkouts.get(site, 0)), float(use.get(site, 0.0))
            misuse = int(cross.get(site, 0)) + int(concurrent.get(site, 0))
            if n <= 0 and held <= 1e-9 and not alerts.get(site) and not misuse:
                continue
            rows.append(
                {
                    "pool": pool,
                    "site": site,
                    "checkouts": n,
                    "hold_s": held,
                    "mean_hold_s": held / n if n else None,
                    "no_sql_share": min(1.0, float(idle.get(site, 0.0)) / held)
                    if held > 1e-9
                    else None,
                    "long_held_alerts": int(alerts.get(site, 0)),
                    "cross_thread_uses": int(cross.get(site, 0)),
                    "concurrent_uses": int(concurrent.get(site, 0)),
                }
            )
    rows.sort(key=lambda r: (-r["hold_s"], r["pool"], r["site"]))
    return rows


def pool_rows(deltas: Mapping[str, snapshots.Snapshot]) -> dict[str, dict[str, Any]]:
    """Per pool: checkouts, hold time, its share without SQL, timeouts, long-held alerts."""
    out: dict[str, dict[str, Any]] = {}
    for pool, snap in deltas.items():
        use = snapshots.histogram(snap, snapshots.USE_TIME)
        held = use["sum"] if use else 0.0
        idle = snapshots.total(snap, snapshots.IDLE_IN_USE)
        out[pool] = {
            "checkouts": snapshots.total(snap, snapshots.CHECKOUTS),
            "hold_s": held,
            "no_sql_share": min(1.0, idle / held) if held > 1e-9 else None,
            "timeouts": snapshots.total(snap, snapshots.TIMEOUTS),
            "long_held_alerts": snapshots.total(snap, LONG_HELD_EVENTS),
        }
    return out


def long_held_alerts(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`monitor.long_held` warnings grouped by (pool, checkout site), most alerts first.

    Each group keeps its most frequent stack (where the holder was when the alert fired,
    innermost frame last), the oldest age at alert time and, from the monitor's follow-up
    record when the connection came back, the longest hold in all."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    stacks: dict[tuple[str, str], Counter[tuple[str, ...]]] = {}
    returned: dict[tuple[str, str], float] = {}
    for r in records:
        if r.get("logger") != events.LONG_HELD:
            continue
        key = (str(r.get("pool")), str(r.get("site")))
        if r.get("level") == "WARNING" and "age_s" in r:
            group = groups.setdefault(
                key,
                {
                    "pool": key[0],
                    "site": key[1],
                    "alerts": 0,
                    "age_at_alert_max_s": 0.0,
                    "workers": set(),
                },
            )
            group["alerts"] += 1
            group["age_at_alert_max_s"] = max(group["age_at_alert_max_s"], float(r["age_s"]))
            group["workers"].add(r.get("pid"))
            stacks.setdefault(key, Counter())[tuple(str(s) for s in r.get("stack") or ())] += 1
        elif isinstance(r.get("held_s"), (int, float)):
            returned[key] = max(returned.get(key, 0.0), float(r["held_s"]))
    out = []
    for key, group in groups.items():
        (stack, seen), *others = stacks[key].most_common()
        out.append(
            {
                **group,
                "workers": len(group["workers"]),
                "held_max_s": returned.get(key),
                "stack": list(stack),
                "stack_share": seen / group["alerts"],
                "other_stacks": len(others),
            }
        )
    out.sort(key=lambda g: (-g["alerts"], g["pool"], g["site"]))
    return out


def misuse_rows(
    deltas: Mapping[str, snapshots.Snapshot], records: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Connections used from two threads: the counters by use site, with the warning's
    checkout site and threads when the monitor logged one in this window (it warns once
    per kind and site in each process)."""
    warned: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in records:
        if r.get("logger") == events.MISUSE and r.get("misuse"):
            key = (str(r.get("pool")), str(r["misuse"]), str(r.get("use_site")))
            warned.setdefault(key, r)
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for pool, snap in deltas.items():
        for kind, counter in (
            ("cross_thread", snapshots.CROSS_THREAD),
            ("concurrent", snapshots.CONCURRENT),
        ):
            per_site = snap.get("counters", {}).get(counter) or {}
            for site, n in per_site.items() if isinstance(per_site, Mapping) else ():
                if n > 0:
                    rows[(pool, kind, site)] = {
                        "pool": pool,
                        "kind": kind,
                        "use_site": site,
                        "uses": int(n),
                    }
    for key, r in warned.items():
        row = rows.setdefault(
            key, {"pool": key[0], "kind": key[1], "use_site": key[2], "uses": None}
        )
        threads = (r.get("checkout_thread"), r.get("use_thread"), r.get("other_thread"))
        row.update(
            checkout_site=r.get("checkout_site"),
            threads=[str(t) for t in dict.fromkeys(threads) if t],
            warning=r.get("message"),
        )
    return sorted(rows.values(), key=lambda r: (-(r["uses"] or 0), r["pool"], r["use_site"]))


def lock_rows(figures: Figures) -> list[dict[str, Any]]:
    """`monitor.lock` histograms reported by the variant (session_store), if any."""
    waits = figures.get("lock_wait_histogram")
    if not waits or not waits.get("count"):
        return []
    holds = figures.get("lock_hold_histogram")
    return [
        {
            "lock": figures.get("lock_name"),
            "acquisitions": waits["count"],
            "waited_over_1ms_share": snapshots.fraction_above(waits, 0.001),
            "wait_mean_s": snapshots.mean(waits),
            "wait_p99_s": snapshots.quantile(waits, 0.99),
            "wait_total_s": waits["sum"],
            "hold_p99_s": snapshots.quantile(holds, 0.99),
        }
    ]


def variant_findings(
    deltas: Mapping[str, snapshots.Snapshot],
    records: Sequence[dict[str, Any]],
    figures: Figures,
) -> dict[str, Any]:
    sites = site_rows(deltas)
    alerts = long_held_alerts(records)
    return {
        "pools": pool_rows(deltas),
        "sites": sites,
        "long_held": alerts,
        "long_held_alerts": sum(a["alerts"] for a in alerts),
        "misuse": misuse_rows(deltas, records),
        "locks": lock_rows(figures),
    }


#: A long-held warning and the record of the same hold's return may be logged in either
#: order (the watchdog marks a hold alerted, then logs; the holder may return in between).
PAIRING_SLACK_S = 0.1
#: Fields that tell one hold's records from another's, when both records have them.
_HOLD_FIELDS = ("pid", "pool", "backend_pid", "site", "thread_name", "task_name", "span_id")


def _same_hold(warning: Mapping[str, Any], returned: Mapping[str, Any]) -> bool:
    return all(
        warning.get(k) is None or returned.get(k) is None or warning.get(k) == returned.get(k)
        for k in _HOLD_FIELDS
    )


def pair_returns(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records, each long-held warning with `returned_held_s`: how long that hold
    lasted in all, from the INFO record the monitor logs when an alerted connection comes
    back (None while it had not). The INFO record names no trace, so it is paired by the
    hold's fields: process, pool, backend pid (one connection serves one hold at a time),
    site, thread and task; the first unpaired return of the same hold at or after the
    warning (less `PAIRING_SLACK_S`)."""
    out = [dict(r) for r in records]
    out.sort(key=lambda r: r["time"])
    returns = [
        i
        for i, r in enumerate(out)
        if r.get("logger") == events.LONG_HELD and isinstance(r.get("held_s"), (int, float))
    ]
    used: set[int] = set()
    for r in out:
        if r.get("logger") != events.LONG_HELD or r.get("level") != "WARNING":
            continue
        r["returned_held_s"] = None
        for i in returns:
            back = out[i]
            if i in used or back["time"] < r["time"] - PAIRING_SLACK_S or not _same_hold(r, back):
                continue
            used.add(i)
            r["returned_held_s"] = float(back["held_s"])
            break
    return out


def _hold_candidates(
    records: Sequence[dict[str, Any]],
    exemplars: Sequence[dict[str, Any]],
    pools: Sequence[str],
    started: float,
    ended: float,
) -> list[dict[str, Any]]:
    out = []
    for r in records:
        if r.get("logger") != events.LONG_HELD or r.get("level") != "WARNING" or "age_s" not in r:
            continue
        total = r.get("returned_held_s")
        out.append(
            {
                "source": "long_held",
                "pool": r.get("pool"),
                "site": r.get("site"),
                "held_s": float(total) if total is not None else float(r["age_s"]),
                "returned": total is not None,
                "trace_id": r.get("trace_id"),
                "span_id": r.get("span_id"),
                "checked_out_at": float(r["time"]) - float(r["age_s"]),
                "pid": r.get("pid"),
            }
        )
    for e in exemplars:
        at = e.get("timestamp")
        if (
            e.get("histogram") != snapshots.USE_TIME
            or e.get("pool") not in pools
            or not isinstance(at, (int, float))
            or not started <= at <= ended + GRACE_S
        ):
            continue
        out.append(
            {
                "source": "exemplar",
                "pool": e["pool"],
                "site": None,
                "held_s": float(e["value"]),
                "returned": True,
                "trace_id": e.get("trace_id"),
                "span_id": e.get("span_id"),
                "checked_out_at": float(at) - float(e["value"]),
                "pid": e.get("pid"),
            }
        )
    return out


def top_bucket(
    histograms: Mapping[str, snapshots.Histogram | None],
) -> tuple[float, float | None] | None:
    """`(lower, upper)` bounds of the highest non-empty bucket over `histograms` (upper
    None for +Inf), or None if they are all empty."""
    top: tuple[float, float | None] | None = None
    for hist in histograms.values():
        if not hist or not hist.get("count"):
            continue
        bounds, counts = hist["bounds"], hist["counts"]
        i = max(i for i, n in enumerate(counts) if n > 0)
        lower = float(bounds[i - 1]) if i > 0 else 0.0
        upper = float(bounds[i]) if i < len(bounds) else None
        if top is None or lower > top[0]:
            top = (lower, upper)
    return top


def slowest_hold(
    records: Sequence[dict[str, Any]],
    exemplars: Sequence[dict[str, Any]],
    pools: Sequence[str],
    started: float,
    ended: float,
    spans: traces.SpanIndex | None = None,
    use_time: Mapping[str, snapshots.Histogram | None] | None = None,
) -> dict[str, Any] | None:
    """The window's slowest hold, with the trace id the monitor recorded at its checkout.

    Two sources, and the slower hold wins:

    * the `monitor.long_held` warnings (`records`, after `pair_returns`): the primary one.
      Every hold past the threshold is logged, by the worker that saw it, into a file the
      runner reads whole: nothing is sampled, polled or replaced, and the warning's
      `trace_id` is the checkout's. Its duration is the hold's total from its return
      record (the age at the alert, a lower bound, while it had not come back).
    * the use-time histogram's exemplars (`exemplars`, every one the sampler saw, with a
      timestamp, the hold's end, inside the window, on the window's `pools`): they cover
      what the warnings cannot, the variants whose holds never reach the threshold (the
      fixes). They are weaker as a source: only holds under a sampled span have one, and
      each bucket keeps one, its slowest of the last `exemplar_window` (15 s): a slower
      hold of the *previous* window in the same bucket keeps this window's out of it
      (lost_update's variants run a fraction of a second apart); hence second.

    `use_time` (pool → the window's use-time histogram) tells whether the hold found is
    the slowest: if the window's top bucket lies above it, the slowest hold left no
    exemplar of this window, and `slowest_bucket_s` gives that bucket's bounds (then the
    hold shown is the slowest *traced one seen*). The same hold seen both ways keeps the
    warning's code site. A long hold without a trace id (checked out where no span was
    current) is still the slowest hold, and says so, rather than giving way to a shorter
    traced one. With `spans`, the trace is looked up in the span files
    (`traces.SpanIndex.describe`)."""
    candidates = _hold_candidates(records, exemplars, pools, started, ended)
    if not candidates:
        return None
    ranked = sorted(candidates, key=lambda c: (-c["held_s"], c["source"] != "long_held"))
    best = dict(ranked[0])
    sources = [best["source"]]
    for other in ranked[1:]:
        if (
            other["source"] != best["source"]
            and best["trace_id"]
            and other["trace_id"] == best["trace_id"]
            and other["span_id"] == best["span_id"]
            and other["pool"] == best["pool"]
            and abs(other["checked_out_at"] - best["checked_out_at"]) <= PAIRING_SLACK_S
        ):
            sources.append(other["source"])
            best["site"] = best["site"] or other["site"]
    best["sources"] = sorted(sources)
    del best["source"]
    top = top_bucket(use_time or {})
    best["slowest_bucket_s"] = list(top) if top and best["held_s"] <= top[0] else None
    if spans is not None and best["trace_id"]:
        best["trace"] = spans.describe(
            best["trace_id"], best["span_id"], best["pool"], best["checked_out_at"]
        )
    else:
        best["trace"] = None
    return best


def split_records(
    records: Sequence[dict[str, Any]], windows: Mapping[str, Any], time_key: str = "time"
) -> dict[str, list[dict[str, Any]]]:
    """Each record to the window (label → `Measured`) it fell in: the latest one that had
    started by then, if the record is no later than its end (+ `GRACE_S`). Records are
    timed by `time_key` (an exemplar's is `timestamp`, when its hold ended)."""
    ordered = sorted(windows.items(), key=lambda kv: kv[1].started)
    out: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in ordered}
    for r in records:
        t = r.get(time_key)
        if not isinstance(t, (int, float)):
            continue
        started = [(label, w) for label, w in ordered if w.started <= t]
        if started and t <= started[-1][1].ended + GRACE_S:
            out[started[-1][0]].append(r)
    return out


def collect(
    results: dict[str, dict[str, Any]],
    windows: Mapping[str, Any],
    records: Sequence[dict[str, Any]],
    exemplars: Sequence[dict[str, Any]] = (),
    spans: traces.SpanIndex | None = None,
) -> None:
    """Add `findings` to every variant's figures that has a measured window: `records`
    are the monitor's log records (`events.read`), `exemplars` the sampler's
    (`MonitorSampler.exemplars`), `spans` the service's span files (`traces.read`)."""
    by_window = split_records(pair_returns(records), windows)
    # Each exemplar to one window, as the records: a window's grace must not take in the
    # next one's (lost_update's windows are a fraction of a second apart).
    exemplars_by_window = split_records(exemplars, windows, "timestamp")
    starts = sorted(w.started for w in windows.values())
    for scenario, variants in results.items():
        if "error" in variants:
            continue
        for variant, figures in variants.items():
            label = f"{scenario}/{variant}"
            if label not in windows or not isinstance(figures, dict):
                continue
            window = windows[label]
            found = variant_findings(window.pools, by_window.get(label, []), figures)
            found["slowest_hold"] = slowest_hold(
                by_window.get(label, []),
                exemplars_by_window.get(label, []),
                list(window.pools),
                window.started,
                window.ended,
                spans,
                {p: snapshots.histogram(d, snapshots.USE_TIME) for p, d in window.pools.items()},
            )
            # Waits that started in the window (or its grace, up to the next window).
            until = min([window.ended + GRACE_S, *(t for t in starts if t > window.started)])
            found["pool_wait_spans"] = (
                spans.pool_waits(window.started, until, window.pools) if spans else None
            )
            figures["findings"] = found


# --- tables (terminal and report.md) ----------------------------------------------------


@dataclass(frozen=True)
class Code:
    """A cell (or a line of one) shown as code: a code site, a stack frame."""

    text: str


Line = str | Code
#: A table cell: text, code, or several lines of either.
Cell = Line | list[Line]


@dataclass
class Section:
    """One of the monitor's tables; without headers, a single line (`title`)."""

    title: str
    headers: list[str] = field(default_factory=list)
    rows: list[list[Cell]] = field(default_factory=list)
    note: str = ""


def _variants(figures: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (v, f["findings"]) for v, f in figures.items() if isinstance(f, dict) and "findings" in f
    ]


def _pools(found: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return sorted({pool for _, f in found for pool in f["pools"]})


def _sites_section(found: list[tuple[str, dict[str, Any]]]) -> Section | None:
    if not any(f["sites"] for _, f in found):
        return None
    pools = _pools(found)
    several = len(pools) > 1
    section = Section(
        "pool-monitor: code sites by hold time"
        + ("" if several else f" (pool `{pools[0]}`, all workers)"),
        [
            "variant",
            *(["pool"] if several else []),
            "code site",
            "checkouts",
            "held",
            "mean",
            "no SQL",
            "long-held",
        ],
        note="held: checkout → return, per `code.site`; no SQL: the share of that time no "
        "statement ran; long-held: alerts raised. Each variant's window, top "
        f"{TOP_SITES} sites.",
    )
    for variant, f in found:
        if not f["sites"]:
            section.rows.append(
                [variant, *(["–"] if several else []), "no checkout", "0"] + [""] * 4
            )
        for row in f["sites"][:TOP_SITES]:
            section.rows.append(
                [
                    variant,
                    *([row["pool"]] if several else []),
                    Code(row["site"]),
                    _num(row["checkouts"]),
                    _seconds(row["hold_s"]),
                    _seconds(row["mean_hold_s"]),
                    _share(row["no_sql_share"]),
                    _num(row["long_held_alerts"]),
                ]
            )
    return section


def _long_held_section(
    found: list[tuple[str, dict[str, Any]]], threshold_s: float | None
) -> Section | None:
    if not any(f["sites"] or f["long_held"] for _, f in found):
        return None
    over = f" (held over {threshold_s:g} s)" if threshold_s else ""
    if not any(f["long_held"] for _, f in found):
        return Section(f"pool-monitor: no long-held alerts{over} in any variant")
    several = len(_pools(found)) > 1
    section = Section(
        f"pool-monitor: long-held alerts{over}",
        [
            "variant",
            *(["pool"] if several else []),
            "alerts",
            "held up to",
            "checked out at → the holder was at, when alerted (innermost frame last)",
        ],
        note="From the `monitor.long_held` warnings (logger extra fields `site`, `stack`), "
        "grouped by checkout site; the stack shown is the most frequent one.",
    )
    for variant, f in found:
        if not f["long_held"]:
            section.rows.append([variant, *(["–"] if several else []), "0", "–", "none"])
        for alert in f["long_held"]:
            held = alert["held_max_s"] or alert["age_at_alert_max_s"]
            where: list[Line] = [Code(alert["site"]), "→"]
            where += [Code(line) for line in alert["stack"]] or ["(no user frames)"]
            section.rows.append(
                [
                    variant,
                    *([alert["pool"]] if several else []),
                    _num(alert["alerts"]),
                    _seconds(held),
                    where,
                ]
            )
    return section


def _misuse_section(found: list[tuple[str, dict[str, Any]]]) -> Section | None:
    if not any(f["misuse"] for _, f in found):
        return None
    several = len(_pools(found)) > 1
    section = Section(
        "pool-monitor: misuse (one connection used by two threads)",
        [
            "variant",
            *(["pool"] if several else []),
            "kind",
            "uses",
            "checked out at → used at",
            "threads",
        ],
        note="`sqlalchemy.pool.cross_thread_uses` (threads taking turns) and "
        "`concurrent_uses` (overlapping statements), by the site that used the connection; "
        "checkout site and threads from the `monitor.misuse` warning.",
    )
    for variant, f in found:
        if not f["misuse"]:
            section.rows.append([variant, *(["–"] if several else []), "none", "0", "", ""])
        for row in f["misuse"]:
            checkout = row.get("checkout_site")
            section.rows.append(
                [
                    variant,
                    *([row["pool"]] if several else []),
                    row["kind"].replace("_", "-"),
                    _num(row["uses"]),
                    [
                        Code(checkout) if checkout else "(not warned in this window)",
                        "→",
                        Code(row["use_site"]),
                    ],
                    ", ".join(row.get("threads") or []) or "–",
                ]
            )
    return section


def _lock_section(found: list[tuple[str, dict[str, Any]]]) -> Section | None:
    if not any(f["locks"] for _, f in found):
        return None
    section = Section(
        "pool-monitor: lock contention",
        ["variant", "lock", "acquisitions", "waited > 1 ms", "wait mean", "wait p99", "hold p99"],
        note="`app.lock.wait_time` / `app.lock.hold_time` histograms of `monitor.lock`, "
        "over each variant's run.",
    )
    for variant, f in found:
        if not f["locks"]:
            section.rows.append([variant, "no monitor.lock: nothing to time", *[""] * 5])
        for row in f["locks"]:
            section.rows.append(
                [
                    variant,
                    Code(str(row["lock"])),
                    _num(row["acquisitions"]),
                    _share(row["waited_over_1ms_share"]),
                    _seconds(row["wait_mean_s"]),
                    _seconds(row["wait_p99_s"]),
                    _seconds(row["hold_p99_s"]),
                ]
            )
    return section


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3g} ms" if seconds < 1 else _seconds(seconds)


def _trace_lines(hold: dict[str, Any]) -> list[Line]:
    """What the span files hold of the slowest hold's trace."""
    found = hold.get("trace")
    if found is None:
        return ["span files not read"]
    if not found.get("in_span_file"):
        return ["not in the span files"]
    lines: list[Line] = []
    server, holder = found.get("server_span"), found.get("holder_span")
    if server:
        status = server.get("status_code")
        lines.append(Code(server["name"] + (f" → {status}" if status is not None else "")))
    if holder and (not server or holder["span_id"] != server["span_id"]):
        lines.append(Code(f"in {holder['name']}"))
    wait = found.get("pool_wait")
    if wait:
        timed_out = f", failed: {wait['error']}" if wait.get("error") else ""
        lines.append(f"{traces.POOL_WAIT} {_ms(wait['wait_s'])}{timed_out}")
    else:
        lines.append(f"no {traces.POOL_WAIT} span")
    return lines


def _bucket(bounds: Sequence[float | None]) -> str:
    lower, upper = float(bounds[0] or 0.0), bounds[1]
    return f"{_ms(lower)}–{_ms(upper)}" if upper is not None else f"over {_ms(lower)}"


#: The slowest-hold table's last column.
SLOWEST_WHERE = "checked out at → the trace in the span files"


def _slowest_section(found: list[tuple[str, dict[str, Any]]]) -> Section | None:
    if not any(f.get("slowest_hold") or ("slowest_hold" in f and f["sites"]) for _, f in found):
        return None  # no checkout in any variant (session_store), or not collected
    several = len(_pools(found)) > 1
    section = Section(
        "pool-monitor: slowest hold and its trace",
        ["variant", *(["pool"] if several else []), "held", "trace id", SLOWEST_WHERE],
        note="The slowest hold of each variant, with the OpenTelemetry trace id the monitor "
        "recorded at its checkout: from the `monitor.long_held` warnings (`trace_id`) and, "
        "where no hold reached the threshold, the use-time histogram's exemplars (which "
        "name no code site); confirmed in the service's span files "
        "(`logs/spans-<pid>.jsonl`): the request's server span (and the job's span) and "
        "the `pool.wait` span of that checkout.",
    )
    for variant, f in found:
        hold = f.get("slowest_hold")
        if not hold:
            section.rows.append([variant, *(["–"] if several else []), "–", "no traced hold", ""])
            continue
        held = _seconds(hold["held_s"])
        where: list[Line] = [
            Code(hold["site"]) if hold.get("site") else "(exemplar: no code site)",
            "→",
        ]
        where += _trace_lines(hold) if hold.get("trace_id") else ["no span at checkout"]
        if hold.get("slowest_bucket_s"):
            where.append(
                f"(the slowest traced hold seen: the slowest, "
                f"{_bucket(hold['slowest_bucket_s'])}, left no exemplar of this window: "
                "untraced, or its bucket kept an earlier, slower one)"
            )
        section.rows.append(
            [
                variant,
                *([hold["pool"]] if several else []),
                held if hold["returned"] else f"≥ {held}",
                Code(hold["trace_id"]) if hold.get("trace_id") else "untraced",
                where,
            ]
        )
    return section


def sections(figures: dict[str, Any], threshold_s: float | None = None) -> list[Section]:
    """The monitor's tables for one scenario: one row per variant and finding."""
    found = _variants(figures)
    if not found:
        return []
    built = [
        _sites_section(found),
        _long_held_section(found, threshold_s),
        _slowest_section(found),
        _misuse_section(found),
        _lock_section(found),
    ]
    return [s for s in built if s is not None]


#: Right-aligned columns.
_NUMERIC = {
    "checkouts",
    "held",
    "mean",
    "no SQL",
    "long-held",
    "alerts",
    "held up to",
    "uses",
    "acquisitions",
    "waited > 1 ms",
    "wait mean",
    "wait p99",
    "hold p99",
}


def _rich_line(line: Line) -> str:
    return escape(line.text) if isinstance(line, Code) else escape(line)


def _rich_cell(cell: Cell) -> str:
    if isinstance(cell, list):
        return "\n".join(_rich_line(line) for line in cell)
    return _rich_line(cell)


def _lines(cell: Cell) -> list[Line]:
    return cell if isinstance(cell, list) else [cell]


def rich_section(section: Section) -> Table | Text:
    """The section as a rich table. The variant heads its group of rows instead of taking a
    column, and other text columns wrap narrow, so code sites keep the width to read whole
    in a 120-column terminal."""
    title = section.title.replace("`", "")
    if not section.headers:
        return Text(title, style="italic")
    by_variant = section.headers[0] == "variant"
    headers = section.headers[1:] if by_variant else section.headers
    rows = [row[1:] for row in section.rows] if by_variant else section.rows
    table = Table(
        title=title,
        title_justify="left",
        caption=section.note.replace("`", ""),
        caption_justify="left",
        caption_style="dim",
    )
    for header in headers:
        if header in _NUMERIC:
            table.add_column(header, justify="right", no_wrap=True)
        elif header == "code site" or "→" in header:
            table.add_column(header, style="cyan", overflow="fold")
        elif header == "trace id":  # whole, to copy
            table.add_column(header, no_wrap=True, min_width=32)
        else:
            table.add_column(header, max_width=18)
    current = None
    for variant_row, row in zip(section.rows, rows, strict=True):
        if by_variant and variant_row[0] != current:
            current = variant_row[0]
            if table.rows:
                table.add_section()
            label = Text(f"▸ {current}", style="bold", justify="left", no_wrap=True)
            table.add_row(label, *[""] * (len(headers) - 1))
        table.add_row(*(_rich_cell(c) for c in row))
    return table


def _md_line(line: Line) -> str:
    return f"`{line.text}`" if isinstance(line, Code) else line.replace("|", "\\|")


def _md_cell(cell: Cell) -> str:
    if isinstance(cell, list):
        return "<br>".join(_md_line(line) for line in cell)
    return _md_line(cell)


def markdown_section(section: Section) -> str:
    if not section.headers:
        return f"*{section.title}*"
    lines = [f"**{section.title}**", ""]
    if section.note:
        lines += [section.note, ""]
    lines += [
        "| " + " | ".join(section.headers) + " |",
        "|" + "|".join("---:" if h in _NUMERIC else "---" for h in section.headers) + "|",
    ]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in section.rows]
    return "\n".join(lines)


# --- more callers waiting in a fix than in its anti-pattern -----------------------------


def _hold(figures: Figures) -> str:
    return _seconds((figures.get("monitor") or {}).get("use_time_mean_s"))


def _wait(figures: Figures) -> str:
    return _seconds((figures.get("monitor") or {}).get("wait_time_p99_s"))


def _idempotent_payment_note(f: dict[str, Figures], fix: str) -> str:
    naive, fixed = f["naive"], f[fix]
    checkouts = [(x.get("monitor") or {}).get("checkouts") for x in (fixed, naive)]
    return (
        f"`{fix}` keeps more callers waiting for a connection than `naive` (on average or "
        "at the peak), on purpose. The "
        "retries of one key arrive together and the key's unique index lets exactly one "
        "of them own the payment: another one's `INSERT … ON CONFLICT DO NOTHING` waits "
        "inside PostgreSQL for the owner's transaction while it is open (holding its "
        'connection meanwhile), then sees the conflict, answers 409 ("in flight") and its '
        "client asks again "
        f"every 0.2 s until the owner's charge is done: {_num(fixed.get('requests'))} "
        f"requests and {_num(checkouts[0])} checkouts vs {_num(naive.get('requests'))} and "
        f"{_num(checkouts[1])} for `naive` ({_num(fixed.get('conflicts_409'))} were 409s). "
        "That queue is the price of one charge per key "
        f"({_num(fixed.get('charges'))} charges for {_num(fixed.get('keys'))} keys); "
        "`naive` waits less because no retry waits for another: it charges every one "
        f"({_num(naive.get('charges'))} charges for {_num(naive.get('keys'))} keys)."
    )


def _duplicate_rows_note(f: dict[str, Figures], fix: str) -> str:
    unsafe, safe = f["unsafe"], f[fix]
    return (
        f"Nothing in `{fix}` waits on purpose: no lock, no constraint. The same "
        f"{_num(safe.get('users'))} closed-loop users send the same lookups to the same small "
        "pool (more users than connections), so some queue in both variants; both start "
        "their users at once, so each opens with a burst of them waiting, which a 10 Hz "
        "sample may or may not catch. The queue stays short: pool wait p99 "
        f"{_wait(safe)} vs {_wait(unsafe)} for `unsafe`, mean "
        f"hold {_hold(safe)} vs {_hold(unsafe)}, "
        f"{_num((safe.get('monitor') or {}).get('timeouts'))} pool timeouts. `{fix}` orders "
        "the task's rows (`ORDER BY created_at DESC LIMIT 1`, a sort of one or two rows) and "
        f"answers every lookup ({_num(safe.get('errors'))} errors vs "
        f"{_num(unsafe.get('errors'))}), so it is no cheaper per lookup than the failing "
        "`unsafe`; a few more users in the queue at the sampled instants is the same load on "
        "the same pool, not a wait the fix adds."
    )


#: Why a fix may show more waiting callers than its anti-pattern (pool_usage.png).
WAITING_EXPLAINED = {
    "idempotent_payment": (
        _idempotent_payment_note,
        "more waiting on purpose: retries of a key wait for its owner (unique key), "
        "then poll after 409",
    ),
    "duplicate_rows": (
        _duplicate_rows_note,
        "no lock in either variant: the same users queue for a small pool; waits stay short",
    ),
}


def waiting_notes(
    scenarios: dict[str, dict[str, Any]], waiting: dict[str, dict[str, dict[str, float]]]
) -> dict[str, dict[str, str]]:
    """Scenario → {"text", "short"} where a fix shows more callers waiting for a connection
    (sampled peak or time-average, all pools) than the anti-pattern, and we know why.

    `waiting` is `charts.waiting_by_variant()`: variant → {"peak", "mean"}."""
    notes: dict[str, dict[str, str]] = {}
    for scenario, per_variant in waiting.items():
        figures = scenarios.get(scenario) or {}
        if scenario not in WAITING_EXPLAINED or "error" in figures or len(per_variant) < 2:
            continue
        anti, *fixes = list(per_variant)
        worse = [
            v
            for v in fixes
            if per_variant[v]["peak"] > per_variant[anti]["peak"]
            or per_variant[v]["mean"] > per_variant[anti]["mean"]
        ]
        if not worse or anti not in figures or worse[0] not in figures:
            continue
        explain, short = WAITING_EXPLAINED[scenario]
        fix = worse[0]
        seen = (
            f"Sampled callers waiting for a connection: `{fix}` peak "
            f"{per_variant[fix]['peak']:.0f}, mean {per_variant[fix]['mean']:.1f}; `{anti}` "
            f"peak {per_variant[anti]['peak']:.0f}, mean {per_variant[anti]['mean']:.1f}. "
        )
        notes[scenario] = {"text": seen + explain(figures, fix), "short": short}
    return notes
