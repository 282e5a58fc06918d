"""Panel helpers over grafana-foundation-sdk builders, with this project's house style.

Why: every panel must carry a description, a unit and Prometheus targets on the
`$datasource` variable. Making those required arguments here means a panel cannot be
added without them, and every dashboard looks and reads the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import heatmap, stat, table, timeseries
from grafana_foundation_sdk.builders import prometheus as pb
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import heatmap as hm
from grafana_foundation_sdk.models import prometheus as pm

#: Every panel and query variable reads from the dashboard's `datasource` variable.
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")

GREEN, YELLOW, ORANGE, RED, BLUE = "green", "yellow", "orange", "red", "blue"
Steps = Sequence[tuple[float | None, str]]


@dataclass(frozen=True)
class Q:
    """One Prometheus query of a panel. `exemplar` also asks Prometheus for the exemplars
    of the series the query selects; Grafana draws them as dots linked to their trace (the
    data source's `exemplarTraceIdDestinations`). Prometheus keeps exemplars only on
    scraped series, never on what a recording rule records: a query for dots must read the
    raw `_bucket` series."""

    expr: str
    legend: str = ""
    instant: bool = False
    table: bool = False
    heatmap: bool = False
    exemplar: bool = False

    def __post_init__(self) -> None:
        if self.exemplar and (self.instant or self.table):
            raise ValueError(f"exemplars need a range query, not {self.expr!r}")

    def build(self, ref: str) -> pb.Dataquery:
        query = (
            pb.Dataquery()
            .expr(self.expr)
            .ref_id(ref)
            .datasource(DATASOURCE)
            .editor_mode(pm.QueryEditorMode.CODE)
        )
        if self.legend:
            query.legend_format(self.legend)
        if self.instant:
            query.instant()
        else:
            query.range()
        if self.table:
            query.format(pm.PromQueryFormat.TABLE)
        elif self.heatmap:
            query.format(pm.PromQueryFormat.HEATMAP)
        if self.exemplar:
            query.exemplar(True)
        return query


def _common(
    panel: Any, title: str, description: str, unit: str, queries: Sequence[Q], w: int, h: int
) -> None:
    if not description.strip():
        raise ValueError(f"panel {title!r} needs a description")
    if not unit:
        raise ValueError(f"panel {title!r} needs a unit")
    if not queries:
        raise ValueError(f"panel {title!r} has no query")
    panel.title(title).description(description).unit(unit).datasource(DATASOURCE)
    panel.span(w).height(h)
    for i, q in enumerate(queries):
        panel.with_target(q.build(chr(ord("A") + i)))


def _thresholds(steps: Steps) -> db.ThresholdsConfig:
    return (
        db.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=v, color=c) for v, c in steps])
    )


def timeseries_panel(
    title: str,
    description: str,
    unit: str,
    queries: Sequence[Q],
    *,
    w: int = 12,
    h: int = 8,
    stack: bool = False,
    min_: float | None = 0,
    max_: float | None = None,
    threshold: float | str | None = None,
    unstacked: Sequence[str] = (),
    colors: dict[str, str] | None = None,
    dashed: Sequence[str] = (),
    repeat: str | None = None,
) -> timeseries.Panel:
    """A time series. `threshold` draws a dashed red line (usually the alert's threshold);
    `unstacked` names series (e.g. a "max" line) drawn as dashed lines over a stack;
    `colors` maps a regex of series names to a fixed colour; `dashed` are regexes of series
    names drawn as dashed lines without fill, in their own colours (a limit per series);
    `repeat` repeats the panel for each selected value of a variable."""
    panel = timeseries.Panel()
    _common(panel, title, description, unit, queries, w, h)
    panel.line_width(1).fill_opacity(40 if stack else 10).show_points(cm.VisibilityMode.NEVER)
    panel.legend(
        cb.VizLegendOptions()
        .show_legend(True)
        .display_mode(cm.LegendDisplayMode.LIST)
        .placement(cm.LegendPlacement.BOTTOM)
    )
    panel.tooltip(
        cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING)
    )
    if min_ is not None:
        panel.min(min_)
    if max_ is not None:
        panel.max(max_)
    if stack:
        panel.stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL).group("A"))
    if threshold is not None:
        value = float(threshold)
        panel.thresholds(_thresholds([(None, GREEN), (value, RED)]))
        panel.thresholds_style(
            cb.GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.DASHED)
        )
    for name in unstacked:
        panel.override_by_name(
            name,
            [
                dm.DynamicConfigValue(
                    id_val="custom.stacking", value={"mode": "none", "group": "A"}
                ),
                dm.DynamicConfigValue(id_val="custom.fillOpacity", value=0),
                dm.DynamicConfigValue(
                    id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}
                ),
                dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": RED}),
            ],
        )
    for regex, color in (colors or {}).items():
        panel.override_by_regexp(
            regex,
            [
                dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": color}),
            ],
        )
    for regex in dashed:
        panel.override_by_regexp(
            regex,
            [
                dm.DynamicConfigValue(id_val="custom.fillOpacity", value=0),
                dm.DynamicConfigValue(
                    id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}
                ),
            ],
        )
    if repeat:
        panel.repeat(repeat).repeat_direction("h").max_per_row(2)
    return panel


def stat_panel(
    title: str,
    description: str,
    unit: str,
    queries: Sequence[Q],
    *,
    w: int = 6,
    h: int = 4,
    steps: Steps = ((None, GREEN),),
    mappings: dict[str, tuple[str, str]] | None = None,
) -> stat.Panel:
    """A single number per series, coloured by `steps`; `mappings` turns values into words."""
    panel = stat.Panel()
    _common(panel, title, description, unit, queries, w, h)
    panel.thresholds(_thresholds(steps))
    panel.color_mode(cm.BigValueColorMode.BACKGROUND).graph_mode(cm.BigValueGraphMode.AREA)
    panel.reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    if mappings:
        panel.mappings(
            [
                dm.ValueMap(
                    options={
                        value: dm.ValueMappingResult(text=text, color=color, index=i)
                        for i, (value, (text, color)) in enumerate(mappings.items())
                    }
                )
            ]
        )
    return panel


def table_panel(
    title: str,
    description: str,
    unit: str,
    queries: Sequence[Q],
    *,
    value_name: str,
    w: int = 12,
    h: int = 8,
) -> table.Panel:
    """A table of one instant query: one row per series, its labels as columns, sorted by
    the value (renamed to `value_name`) descending."""
    if any(not (q.instant and q.table) for q in queries):
        raise ValueError(f"table {title!r} needs instant table-format queries")
    panel = table.Panel()
    _common(panel, title, description, unit, queries, w, h)
    panel.with_transformation(
        dm.DataTransformerConfig(
            id_val="organize",
            options={
                "excludeByName": {"Time": True},
                "renameByName": {"Value": value_name},
            },
        )
    )
    panel.sort_by([cb.TableSortByFieldState().display_name(value_name).desc(True)])
    return panel


def joined_table_panel(
    title: str,
    description: str,
    unit: str,
    columns: Sequence[tuple[str, Q]],
    *,
    sort_by: str,
    colored: dict[str, Steps] | None = None,
    w: int = 12,
    h: int = 8,
) -> table.Panel:
    """A table of several instant queries joined on their labels: one row per label set,
    one column per query (named by `columns`), sorted by column `sort_by` descending.
    Every query must aggregate to the same labels (e.g. `max by (pool) (...)`), or rows do
    not join. `colored` colours a column's cells by its steps."""
    names = [name for name, _ in columns]
    queries = [q for _, q in columns]
    if any(not (q.instant and q.table) for q in queries):
        raise ValueError(f"table {title!r} needs instant table-format queries")
    if len(queries) < 2 or sort_by not in names or not set(colored or {}) <= set(names):
        raise ValueError(f"table {title!r}: two or more columns, sorted and coloured by them")
    panel = table.Panel()
    _common(panel, title, description, unit, queries, w, h)
    # Several table-format queries name their values `Value #<refId>`; `merge` joins the
    # frames into rows on the labels they share.
    panel.with_transformation(dm.DataTransformerConfig(id_val="merge", options={}))
    panel.with_transformation(
        dm.DataTransformerConfig(
            id_val="organize",
            options={
                "excludeByName": {"Time": True},
                "renameByName": {
                    f"Value #{chr(ord('A') + i)}": name for i, name in enumerate(names)
                },
            },
        )
    )
    for name, steps in (colored or {}).items():
        panel.override_by_name(
            name,
            [
                dm.DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-text"}),
                dm.DynamicConfigValue(
                    id_val="thresholds",
                    value={
                        "mode": "absolute",
                        "steps": [{"value": v, "color": c} for v, c in steps],
                    },
                ),
            ],
        )
    panel.sort_by([cb.TableSortByFieldState().display_name(sort_by).desc(True)])
    return panel


def heatmap_panel(
    title: str,
    description: str,
    y_unit: str,
    query: Q,
    *,
    w: int = 12,
    h: int = 8,
) -> heatmap.Panel:
    """A heatmap of pre-bucketed histogram rates (Prometheus `le` buckets, no re-binning).
    Cell values are rates (ops/s); `y_unit` is the unit of the bucket bounds."""
    if not query.heatmap:
        raise ValueError(f"heatmap {title!r} needs a heatmap-format query")
    panel = heatmap.Panel()
    _common(panel, title, description, "ops", [query], w, h)
    panel.calculate(False)
    panel.y_axis(heatmap.YAxisConfig().unit(y_unit))
    panel.color(
        heatmap.HeatmapColorOptions()
        .mode(hm.HeatmapColorMode.SCHEME)
        .scheme("Oranges")
        .scale(hm.HeatmapColorScale.EXPONENTIAL)
        .exponent(0.5)
        .fill("dark-orange")
    )
    return panel


def query_variable(name: str, label: str, query: str, description: str) -> db.QueryVariable:
    """A multi-select variable over `label_values(...)`; "All" means `.*` (matches series
    that lack the label too, e.g. `namespace` outside Kubernetes)."""
    return (
        db.QueryVariable(name)
        .label(label)
        .description(description)
        .datasource(DATASOURCE)
        .query(query)
        .definition(query)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .current(dm.VariableOption(selected=True, text="All", value="$__all"))
    )


def datasource_variable() -> db.DatasourceVariable:
    return (
        db.DatasourceVariable("datasource")
        .label("Data source")
        .type("prometheus")
        .description("The Prometheus that scrapes pool-monitor.")
    )


class Board:
    """A dashboard under construction: numbers panels, places rows, encodes to a dict."""

    def __init__(
        self,
        uid: str,
        title: str,
        description: str,
        variables: Sequence[cogbuilder.Builder[dm.VariableModel]],
    ) -> None:
        self._next_id = 1
        self._builder = (
            db.Dashboard(title)
            .uid(uid)
            .description(description)
            .tags(["pool-monitor", "sqlalchemy"])
            .editable()
            .time("now-1h", "now")
            .refresh("30s")
            .timezone("browser")
            .tooltip(dm.DashboardCursorSync.CROSSHAIR)
            .timepicker(db.TimePicker().refresh_intervals(["10s", "30s", "1m", "5m", "15m"]))
            .variables(list(variables))
        )

    def row(self, title: str) -> Board:
        self._builder.with_row(db.Row(title).id(self._take_id()))
        return self

    def add(self, *panels: cogbuilder.Builder[dm.Panel]) -> Board:
        for panel in panels:
            panel.id(self._take_id())  # type: ignore[attr-defined]
            self._builder.with_panel(panel)
        return self

    def link(self, title: str, tags: Sequence[str]) -> Board:
        self._builder.link(
            db.DashboardLink(title)
            .type(dm.DashboardLinkType.DASHBOARDS)
            .tags(list(tags))
            .as_dropdown(False)
            .include_vars(True)
            .keep_time(True)
        )
        return self

    def _take_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def to_dict(self) -> dict[str, Any]:
        return json.loads(JSONEncoder(sort_keys=True).encode(self._builder.build()))
