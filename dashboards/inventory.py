"""Every PromQL expression the dashboards and rules contain, with where it came from.

Why: the tests (metric names allowed, expressions parse and return data against a real
Prometheus) and the later end-to-end test all need the same list; walking the Grafana JSON
in one place keeps them from drifting apart.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from dashboards.promql import label_values_metric


@dataclass(frozen=True)
class Expression:
    """One PromQL expression; `source` says where it is, for error messages."""

    source: str
    expr: str


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels") or [])


def panels(model: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel of a dashboard, including those nested in collapsed rows."""
    return _panels(list(model.get("panels") or []))


def dashboard_expressions(
    models: Mapping[str, Mapping[str, Any]], *, exemplars_only: bool = False
) -> list[Expression]:
    """Every panel target's `expr`, as written (Grafana variables not substituted); with
    `exemplars_only`, those of targets that ask for exemplars (`"exemplar": true`)."""
    found = []
    for name, model in models.items():
        for panel in panels(model):
            for target in panel.get("targets") or []:
                if "expr" in target and (target.get("exemplar") or not exemplars_only):
                    source = f"{name}: {panel.get('title')!r} ({target.get('refId')})"
                    found.append(Expression(source, target["expr"]))
    return found


def variable_queries(models: Mapping[str, Mapping[str, Any]]) -> list[Expression]:
    """Query variables' `label_values(metric{...}, label)` turned into plain PromQL
    (`count by (label) (metric{...})`), which returns data exactly when the variable
    would have options."""
    found = []
    for name, model in models.items():
        for var in (model.get("templating") or {}).get("list") or []:
            if var.get("type") != "query":
                continue
            query = var["query"] if isinstance(var["query"], str) else var["query"]["query"]
            if label_values_metric(query) is None:
                raise ValueError(f"{name}: variable {var['name']}: unsupported query {query!r}")
            inner = query.strip()[len("label_values(") : -1]
            selector, _, label = inner.rpartition(",")
            found.append(
                Expression(
                    f"{name}: variable ${var['name']}",
                    f"count by ({label.strip()}) ({selector.strip()})",
                )
            )
    return found


def rule_expressions(rule_files: Mapping[str, str]) -> list[Expression]:
    """Every `expr` of rendered rule files ({file name: YAML text})."""
    found = []
    for file_name, text in rule_files.items():
        for group in yaml.safe_load(text)["groups"]:
            for rule in group["rules"]:
                label = rule.get("record") or rule.get("alert")
                found.append(Expression(f"{file_name}: {label}", rule["expr"]))
    return found
