"""`pool-monitor advise --prometheus URL`: sizing advice for every pool, from Prometheus.

Reads a range of the pool metrics (as scraped from the workers or from the sidecars),
sums each pool over every pod and process, and prints, per pool, the measured arrival
rate and mean hold, Erlang C's P(wait) and mean wait at the current size next to the
measured ones, the smallest size meeting the target, and why the model may not fit; then
the fleet's connections against the server's. Standard library HTTP only: the command
must run wherever the library is installed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from monitor.sizing import Advice, Target, advise, measured_wait

POOL = "db_client_connection_pool_name"
_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


class AdviseError(RuntimeError):
    """Prometheus could not be asked, or answered something unusable (said in words)."""


def parse_duration(text: str) -> float:
    """`30s`, `5m`, `1h`… in seconds (Prometheus' own units); ValueError naming it."""
    match = _DURATION.match(text.strip())
    if not match or int(match[1]) * _SECONDS[match[2]] < 1:
        raise ValueError(f"not a duration of a second or more like 30s, 5m or 1h: {text!r}")
    return int(match[1]) * _SECONDS[match[2]]


class Prometheus:
    """The two HTTP API calls the command needs."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _get(self, path: str, params: dict[str, str]) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=self.timeout) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            raise AdviseError(f"Prometheus answered {exc.code} to {params}: {detail}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise AdviseError(f"cannot query Prometheus at {self.url}: {exc}") from None
        if body.get("status") != "success":
            raise AdviseError(f"Prometheus refused {params}: {body.get('error')}")
        return body["data"]["result"]

    def instant(self, expr: str, at: float) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/query", {"query": expr, "time": f"{at:.3f}"}))

    def series(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step}"}
        return list(self._get("/api/v1/query_range", params))


def _by_pool(result: list[dict[str, Any]]) -> dict[str, float]:
    """{pool: value}, finite values only (Prometheus answers NaN for 0/0)."""
    out = {}
    for r in result:
        value = float(r["value"][1])
        if math.isfinite(value):
            out[r["metric"].get(POOL, "")] = value
    return out


def _series_by_pool(result: list[dict[str, Any]]) -> dict[str, dict[float, float]]:
    """{pool: {timestamp: value}}, finite values only: series are joined on timestamps."""
    out: dict[str, dict[float, float]] = {}
    for r in result:
        points = {float(t): float(v) for t, v in r["values"]}
        out[r["metric"].get(POOL, "")] = {t: v for t, v in points.items() if math.isfinite(v)}
    return out


def gather(
    prom: Prometheus,
    *,
    end: float,
    range_s: float,
    step_s: float,
    selector: str = "",
    target: Target | None = None,
) -> tuple[list[Advice], dict[str, Any]]:
    """Advice per pool over `[end - range_s, end]`, and the fleet's budget."""
    sel = selector.strip().strip("{}")
    s = "{" + sel + "}" if sel else ""
    r = f"{int(range_s)}s"

    def one(expr: str) -> dict[str, float]:
        return _by_pool(prom.instant(expr, end))

    checkouts = one(f"sum by ({POOL}) (increase(sqlalchemy_pool_checkouts_total{s}[{r}]))")
    if not checkouts:
        raise AdviseError(
            f"no sqlalchemy_pool_checkouts_total{s} in Prometheus over the last {r} before "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(end))} UTC: is the selector "
            "right, and are the pods scraped?"
        )
    hold = one(f"sum by ({POOL}) (increase(db_client_connection_use_time_seconds_sum{s}[{r}]))")
    wait_sum = one(
        f"sum by ({POOL}) (increase(db_client_connection_wait_time_seconds_sum{s}[{r}]))"
    )
    buckets: dict[str, dict[float, float]] = {}
    for row in prom.instant(
        f"sum by ({POOL}, le) (increase(db_client_connection_wait_time_seconds_bucket{s}[{r}]))",
        end,
    ):
        le = float(row["metric"]["le"])
        buckets.setdefault(row["metric"].get(POOL, ""), {})[le] = float(row["value"][1])
    # Summed over pods first, then over time (a subquery): a rolling deploy inside the
    # range has old and new pods' series side by side only for a moment, and must not
    # count twice. Processes per pool: the sidecars say how many they merged (averaged:
    # λ is a window average too); a process scraped directly is one series of its own.
    step = f"{int(step_s)}s"
    maximum = one(f"max_over_time(sum by ({POOL}) (db_client_connection_max{s})[{r}:{step}])")
    processes = one(
        f"avg_over_time(sum by ({POOL}) (pool_monitor_advice_processes{s})[{r}:{step}])"
    )
    targets = one(f"max_over_time(count by ({POOL}) (db_client_connection_max{s})[{r}:{step}])")
    start = end - range_s
    counts = _series_by_pool(
        prom.series(
            f"sum by ({POOL}) (increase(sqlalchemy_pool_checkouts_total{s}[{step}]))",
            start,
            end,
            step_s,
        )
    )
    holds = _series_by_pool(
        prom.series(
            f"sum by ({POOL}) (increase(db_client_connection_use_time_seconds_sum{s}[{step}]))"
            f" / (sum by ({POOL}) "
            f"(increase(db_client_connection_use_time_seconds_count{s}[{step}])) > 0)",
            start,
            end,
            step_s,
        )
    )
    advice = []
    for pool in sorted(checkouts):
        n = round(processes.get(pool) or targets.get(pool) or 1)
        size = None
        if pool in maximum and maximum[pool] > 0:
            size = max(1, math.floor(maximum[pool] / n + 0.5))
        measured = _measured(buckets.get(pool, {}), wait_sum.get(pool, 0.0))
        pool_counts = counts.get(pool, {})
        pool_holds = holds.get(pool, {})
        both = sorted(t for t in pool_counts if t in pool_holds)
        advice.append(
            advise(
                pool,
                processes=n,
                size=size,
                checkouts=checkouts[pool],
                seconds=range_s,
                hold_seconds=hold.get(pool, 0.0),
                target=target,
                measured_p_wait=measured[0] if measured else None,
                measured_mean_wait_s=measured[1] if measured else None,
                interval_counts=[pool_counts[t] for t in sorted(pool_counts)],
                interval_rates=[pool_counts[t] / step_s / n for t in both],
                interval_holds=[pool_holds[t] for t in both],
            )
        )
    usable = one(f"max(pg_max_connections{s}) - max(pg_reserved_connections{s})")
    fleet_now = sum(a.size * a.processes for a in advice if a.size)
    fleet_recommended = sum((a.recommended_size or 0) * a.processes for a in advice if a.size)
    budget = {
        "fleet_max_connections": fleet_now,
        "fleet_recommended_connections": fleet_recommended,
        "server_usable_connections": next(iter(usable.values()), None),
    }
    return advice, budget


def _measured(buckets: dict[float, float], wait_sum: float) -> tuple[float, float] | None:
    """The wait histogram's cumulative buckets back to per-bucket counts."""
    if not buckets:
        return None
    bounds = sorted(b for b in buckets if math.isfinite(b))
    cumulative = [buckets[b] for b in bounds] + [buckets.get(math.inf, 0.0)]
    counts = [max(0.0, c - p) for p, c in zip([0.0, *cumulative], cumulative, strict=False)]
    return measured_wait(bounds, counts, wait_sum)


def _ms(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value * 1000:.1f}"


def _share(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def render(advice: Sequence[Advice], budget: dict[str, Any], target: Target) -> str:
    """The table, the budget and the warnings, as text."""
    head = (
        f"{'pool':<24}{'procs':>6}{'size':>6}{'λ/s/proc':>10}{'W ms':>8}{'load':>7}"
        f"{'P(wait) pred':>14}{'meas':>7}{'wait ms pred':>14}{'meas':>7}{'advise':>8}"
    )
    lines = [head, "-" * len(head)]
    for a in advice:
        c = a.current
        recommended = "–" if a.recommended_size is None else str(a.recommended_size)
        lines.append(
            f"{a.pool[:23]:<24}{a.processes:>6}{a.size or '–':>6}{a.arrival_rate:>10.2f}"
            f"{a.mean_hold_s * 1000:>8.1f}{a.offered_load:>7.2f}"
            f"{_share(c.p_wait if c else None):>14}{_share(a.measured_p_wait):>7}"
            f"{_ms(c.mean_wait_s if c else None):>14}{_ms(a.measured_mean_wait_s):>7}"
            f"{recommended:>8}"
        )
    lines.append("")
    lines.append(
        f"target: P(wait) < {target.p_wait:g} and mean wait < {target.mean_wait_s * 1000:g} ms "
        "per checkout; sizes are per process (pool_size + max_overflow)"
    )
    usable = budget.get("server_usable_connections")
    lines.append(
        f"fleet: {budget['fleet_max_connections']} connections at the current sizes, "
        f"{budget['fleet_recommended_connections']} at the advised ones; the server allows "
        + ("(unknown: no pg_max_connections)" if usable is None else f"{usable:.0f}")
    )
    for a in advice:
        for warning in a.warnings:
            lines.append(f"  {a.pool}: {warning}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pool-monitor advise",
        description="Pool sizing advice (Erlang C) from the metrics in Prometheus.",
    )
    parser.add_argument("--prometheus", required=True, metavar="URL", help="Prometheus base URL")
    parser.add_argument("--range", default="1h", help="window to size from (default 1h)")
    parser.add_argument(
        "--step",
        default="5m",
        help="interval for the model-fit checks (default 5m: at least two scrapes, and long "
        "enough that when a counter was last written does not read as a burst)",
    )
    parser.add_argument("--end", type=float, help="end of the window, unix time (default now)")
    parser.add_argument(
        "--selector", default="", help='label matchers for every series, e.g. namespace="shop"'
    )
    parser.add_argument("--target-p-wait", type=float, default=0.01, metavar="SHARE")
    parser.add_argument("--target-wait-ms", type=float, default=5.0, metavar="MS")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        range_s = parse_duration(args.range)
        step_s = parse_duration(args.step)
    except ValueError as exc:
        parser.error(str(exc))
    if step_s >= range_s:
        parser.error(f"--step ({args.step}) must be shorter than --range ({args.range})")
    if not 0 < args.target_p_wait < 1 or args.target_wait_ms <= 0:
        parser.error("--target-p-wait must be between 0 and 1, --target-wait-ms above 0")
    target = Target(args.target_p_wait, args.target_wait_ms / 1000.0)
    prom = Prometheus(args.prometheus)
    try:
        advice, budget = gather(
            prom,
            end=args.end or time.time(),
            range_s=range_s,
            step_s=step_s,
            selector=args.selector,
            target=target,
        )
    except AdviseError as exc:
        print(f"pool-monitor advise: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"pools": [a.to_dict() for a in advice], "budget": budget}))
    else:
        print(render(advice, budget, target))
    return 0
