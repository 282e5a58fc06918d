"""PNG charts of a demo run (matplotlib, no display needed).

* `hold_times.png`   – per scenario, the distribution of connection hold times (the
  monitor's `db.client.connection.use_time` histogram over the variant's window), anti-
  pattern next to fix: seed 002's "30–60 s → 0.1–0.5 s", in this run's numbers.
* `pool_wait.png`    – pool_isolation: how long callers waited for a connection on the pool
  that serves the API (`shared`, where jobs wait too, vs `api`).
* `pool_usage.png`   – connections in use and callers waiting, per pool over the whole run,
  with each variant's window shaded and each pool's capacity dotted; where a fix shows more
  waiting callers than its anti-pattern, a note says why (`findings.waiting_notes`).

Times are in milliseconds throughout (bucket labels and legends), as on the dashboards.

`matplotlib.figure.Figure` is used directly (never pyplot), so nothing needs a display or
touches global backend state.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from demo_app.sampler import Span, TimelinePoint
from demo_app.snapshots import Histogram

#: Scenarios that ran shorter than this are too brief for the sampled timeline.
MIN_WINDOW_S = 5.0
COLORS = {"anti": "#d62728", "fix": "#2ca02c"}
FIX_COLORS = ["#2ca02c", "#1f77b4", "#9467bd"]


def ms(seconds: float) -> str:
    """Milliseconds with sensible precision: 2,059 ms, 54.7 ms, 3.29 ms, 0.42 ms."""
    value = seconds * 1000
    if value >= 100:
        return f"{value:,.0f} ms"
    if value >= 10:
        return f"{value:.1f} ms"
    return f"{value:.2f} ms"


def _bucket_labels(bounds: Sequence[float]) -> list[str]:
    def fmt(b: float) -> str:
        return f"{b * 1000:,.10g}"

    return [f"≤{fmt(b)}" for b in bounds] + [f">{fmt(bounds[-1])}"]


def distribution_label(variant: str, hist: Histogram) -> str:
    """A legend entry: the variant, its number of observations and their mean, in ms."""
    return f"{variant} (n={hist['count']:,}, mean {ms(hist['sum'] / hist['count'])})"


def _histograms(figures: dict[str, Any]) -> dict[str, Histogram]:
    """variant → use-time histogram of a scenario's one pool (skips empty ones)."""
    out: dict[str, Histogram] = {}
    for variant, f in figures.items():
        hist = (f.get("monitor") or {}).get("use_time_histogram")
        if hist and hist.get("count"):
            out[variant] = hist
    return out


def _plot_distribution(
    ax: Any, title: str, histograms: dict[str, Histogram], xlabel: str = "hold time"
) -> None:
    variants = list(histograms)
    bounds = histograms[variants[0]]["bounds"]
    labels = _bucket_labels(bounds)
    used = [i for i in range(len(labels)) if any(h["counts"][i] for h in histograms.values())]
    lo, hi = (min(used), max(used)) if used else (0, len(labels) - 1)
    idx = list(range(lo, hi + 1))
    width = 0.8 / len(variants)
    for n, variant in enumerate(variants):
        hist = histograms[variant]
        shares = [hist["counts"][i] / hist["count"] for i in idx]
        color = COLORS["anti"] if n == 0 else FIX_COLORS[(n - 1) % len(FIX_COLORS)]
        ax.bar(
            [x + n * width for x in range(len(idx))],
            shares,
            width=width,
            color=color,
            label=distribution_label(variant, hist),
        )
    ax.set_xticks([x + width * (len(variants) - 1) / 2 for x in range(len(idx))])
    ax.set_xticklabels([labels[i] for i in idx], rotation=45, ha="right", fontsize=8)
    ax.set_xlabel(f"{xlabel}, ms (bucket upper bound)", fontsize=8)
    ax.set_ylabel("share of checkouts")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def hold_time_figure(scenarios: dict[str, dict[str, Any]]) -> Figure:
    """Hold-time distribution per scenario (anti-pattern in red, fixes in green/blue)."""
    panels = [
        (name, hists)
        for name, figures in scenarios.items()
        if "error" not in figures and (hists := _histograms(figures))
    ]
    fig = Figure(figsize=(9, 3.2 * max(1, len(panels))), layout="constrained")
    axes = fig.subplots(max(1, len(panels)), 1, squeeze=False)[:, 0]
    if not panels:
        axes[0].text(0.5, 0.5, "no hold-time data in this run", ha="center", va="center")
        axes[0].set_axis_off()
    for ax, (name, hists) in zip(axes, panels, strict=False):
        _plot_distribution(ax, f"{name}: connection hold time (checkout → return)", hists)
    fig.suptitle("Connection hold time, anti-pattern vs fix (pool-monitor use_time)")
    return fig


def hold_time_chart(scenarios: dict[str, dict[str, Any]], path: Path) -> Path:
    hold_time_figure(scenarios).savefig(path, dpi=110)
    return path


def pool_wait_figure(figures: dict[str, Any]) -> Figure:
    """pool_isolation: the API pool's wait-time distribution, shared vs split."""
    hists = {
        variant: f["monitor"][f["api_pool"]]["wait_time_histogram"]
        for variant, f in figures.items()
        if f.get("monitor", {})
        .get(f.get("api_pool"), {})
        .get("wait_time_histogram", {})
        .get("count")
    }
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    ax = fig.subplots()
    if hists:
        _plot_distribution(
            ax,
            "pool_isolation: wait for a connection on the pool serving the API",
            hists,
            xlabel="wait time",
        )
    else:
        ax.text(0.5, 0.5, "no wait-time data in this run", ha="center", va="center")
        ax.set_axis_off()
    return fig


def pool_wait_chart(figures: dict[str, Any], path: Path) -> Path:
    pool_wait_figure(figures).savefig(path, dpi=110)
    return path


def _scenario_windows(spans: Sequence[Span]) -> list[tuple[str, list[Span]]]:
    """Group variant spans (`scenario/variant`) by scenario, in run order."""
    groups: dict[str, list[Span]] = {}
    for span in spans:
        groups.setdefault(span.label.split("/", 1)[0], []).append(span)
    return list(groups.items())


def waiting_by_variant(
    timeline: Sequence[TimelinePoint], spans: Sequence[Span]
) -> dict[str, dict[str, dict[str, float]]]:
    """scenario → variant → peak and time-average of callers waiting for a connection
    (summed over pools, all workers), from the sampled timeline inside the variant's span."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for span in spans:
        if span.end is None or "/" not in span.label:
            continue
        scenario, variant = span.label.split("/", 1)
        points = [p for p in timeline if span.start <= p.time <= span.end]
        if not points:
            continue
        pending = [sum(g.get("pending", 0) for g in p.pools.values()) for p in points]
        # Time-weighted: each sample holds until the next one (a step, as charted).
        times = [p.time for p in points] + [span.end]
        weights = [max(0.0, b - a) for a, b in itertools.pairwise(times)]
        total = sum(weights)
        mean = sum(w * n for w, n in zip(weights, pending, strict=True)) / total if total else 0.0
        out.setdefault(scenario, {})[variant] = {"peak": float(max(pending)), "mean": mean}
    return out


def _plot_usage(
    ax: Any, title: str, points: Sequence[TimelinePoint], spans: list[Span], note: str = ""
) -> None:
    t0 = spans[0].start
    pools = sorted(
        {name for p in points for name, g in p.pools.items() if g["used"] or g["pending"]}
    )
    for i, pool in enumerate(pools):
        color = f"C{i}"
        xs = [p.time - t0 for p in points]
        used = [p.pools.get(pool, {}).get("used", 0) for p in points]
        pending = [p.pools.get(pool, {}).get("pending", 0) for p in points]
        ax.step(xs, used, where="post", color=color, label=f"{pool}: in use")
        if any(pending):
            ax.step(
                xs, pending, where="post", color=color, linestyle="--", label=f"{pool}: waiting"
            )
        top = max((p.pools.get(pool, {}).get("max", 0) for p in points), default=0)
        if top:
            ax.axhline(
                top, color=color, linestyle=":", linewidth=0.9, label=f"{pool}: capacity ({top:g})"
            )
    for n, span in enumerate(spans):
        end = span.end if span.end is not None else points[-1].time
        ax.axvspan(span.start - t0, end - t0, color="grey", alpha=0.07 if n % 2 else 0.15)
        ax.annotate(
            span.label.split("/", 1)[-1],
            xy=(span.start - t0, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -3),
            textcoords="offset points",
            va="top",
            fontsize=8,
            color="dimgrey",
        )
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_ylabel("connections / callers")
    if note:  # beside the title, where it cannot hide a line
        ax.set_title(
            f"note: {note}", fontsize=7.5, loc="right", style="italic", color="saddlebrown"
        )
    if pools:
        ax.legend(fontsize=7, loc="center right")


def pool_usage_figure(
    timeline: Sequence[TimelinePoint],
    spans: Sequence[Span],
    notes: dict[str, str] | None = None,
) -> Figure:
    """Per scenario: connections in use (solid) and callers waiting (dashed) per pool, all
    workers summed, each variant's window shaded; dotted lines are the pools' capacity (max
    connections, all workers). `notes` (scenario → text) are drawn in the scenario's panel.

    Scenarios shorter than `MIN_WINDOW_S` (the thread-based ones take a second or two) are
    left out when longer ones ran: each worker is sampled a few times a second, too coarse
    for them."""
    notes = notes or {}
    windows = []
    for name, group in _scenario_windows(spans):
        start, end = group[0].start, group[-1].end or group[-1].start
        points = [p for p in timeline if start <= p.time <= end]
        if points:
            windows.append((name, group, points, end - start))
    long_enough = [w for w in windows if w[3] >= MIN_WINDOW_S]
    windows = long_enough or windows
    fig = Figure(figsize=(10, 2.6 * max(1, len(windows))), layout="constrained")
    axes = fig.subplots(max(1, len(windows)), 1, squeeze=False)[:, 0]
    if not windows:
        axes[0].text(0.5, 0.5, "no samples", ha="center", va="center")
        axes[0].set_axis_off()
    for ax, (name, group, points, _) in zip(axes, windows, strict=False):
        _plot_usage(ax, name, points, group, notes.get(name, ""))
    axes[-1].set_xlabel("seconds since the scenario started")
    fig.suptitle("Pool usage during each scenario (all workers)")
    return fig


def pool_usage_chart(
    timeline: Sequence[TimelinePoint],
    spans: Sequence[Span],
    path: Path,
    notes: dict[str, str] | None = None,
) -> Path:
    pool_usage_figure(timeline, spans, notes).savefig(path, dpi=110)
    return path
