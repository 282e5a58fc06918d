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
  (seed 001's session store).

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

from demo_app import events, snapshots
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


def split_records(
    records: Sequence[dict[str, Any]], windows: Mapping[str, Any]
) -> dict[str, list[dict[str, Any]]]:
    """Each record to the window (label → `Measured`) it fell in: the latest one that had
    started by then, if the record is no later than its end (+ `GRACE_S`)."""
    ordered = sorted(windows.items(), key=lambda kv: kv[1].started)
    out: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in ordered}
    for r in records:
        t = r["time"]
        started = [(label, w) for label, w in ordered if w.started <= t]
        if started and t <= started[-1][1].ended + GRACE_S:
            out[started[-1][0]].append(r)
    return out


def collect(
    results: dict[str, dict[str, Any]],
    windows: Mapping[str, Any],
    records: Sequence[dict[str, Any]],
) -> None:
    """Add `findings` to every variant's figures that has a measured window."""
    by_window = split_records(records, windows)
    for scenario, variants in results.items():
        if "error" in variants:
            continue
        for variant, figures in variants.items():
            label = f"{scenario}/{variant}"
            if label in windows and isinstance(figures, dict):
                figures["findings"] = variant_findings(
                    windows[label].pools, by_window.get(label, []), figures
                )


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


def sections(figures: dict[str, Any], threshold_s: float | None = None) -> list[Section]:
    """The monitor's tables for one scenario: one row per variant and finding."""
    found = _variants(figures)
    if not found:
        return []
    built = [
        _sites_section(found),
        _long_held_section(found, threshold_s),
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
