"""The chart's copies of the rules and dashboards never drift from `dashboards/`.

Helm reads only files inside the chart, so `helm/sync_files.py` copies them there (and
derives the values block, the schema parts and the README's parameters table). These tests
fail when a committed file differs from what the generator makes from the current tree:
run `python helm/sync_files.py` after `python -m dashboards`.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from dashboards.thresholds import ALERTS, THRESHOLDS

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "pool-monitor"


def _load_sync() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "helm_sync_files", ROOT / "helm" / "sync_files.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


sync = _load_sync()


def test_committed_chart_files_match_the_generator() -> None:
    stale = [str(p.relative_to(ROOT)) for p in sync.stale_files()]
    assert stale == [], f"out of date: {stale}; run: python helm/sync_files.py"


def test_check_mode_reports_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert sync.main(["--check"]) == 0
    assert capsys.readouterr().err == ""


def test_dashboard_copies_are_byte_identical() -> None:
    source = {p.name: p.read_bytes() for p in (ROOT / "dashboards" / "json").glob("*.json")}
    copies = {p.name: p.read_bytes() for p in (CHART / "files" / "dashboards").glob("*.json")}
    assert source and copies == source


def test_recording_rules_copy_is_the_committed_file() -> None:
    committed = (ROOT / "dashboards" / "rules" / "recording.yml").read_bytes()
    assert (CHART / "files" / "rules" / "recording.yml").read_bytes() == committed


def test_alerts_template_escapes_every_prometheus_template() -> None:
    text = (CHART / "files" / "rules" / "alerts.yml").read_text()
    committed = (ROOT / "dashboards" / "rules" / "alerts.yml").read_text()
    # Every `{{ $labels.x }}` / `{{ $value ... }}` of the rules is Helm-escaped ...
    assert text.count('{{ "{{" }} $') == committed.count("{{ $")
    # ... and no other unescaped Prometheus template is left for Helm to choke on.
    assert "{{ $labels" not in text.replace('{{ "{{" }} $labels', "")
    assert "{{ $value" not in text.replace('{{ "{{" }} $value', "")
    for alert in ALERTS:
        assert f'(has "{alert.alert}" $disabled)' in text


def test_values_defaults_are_the_threshold_defaults() -> None:
    rule = yaml.safe_load((CHART / "values.yaml").read_text())["prometheusRule"]
    assert rule["thresholds"] == {t.name: t.default for t in THRESHOLDS}
    assert rule["for"] == {a.alert: a.for_ for a in ALERTS}
    assert rule["severity"] == {a.alert: a.severity for a in ALERTS}
    assert rule["disabled"] == []


def test_schema_knows_every_threshold_alert_and_dashboard() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    rule = schema["properties"]["prometheusRule"]["properties"]
    assert set(rule["thresholds"]["properties"]) == {t.name for t in THRESHOLDS}
    assert set(rule["for"]["properties"]) == {a.alert for a in ALERTS}
    assert rule["disabled"]["items"]["enum"] == [a.alert for a in ALERTS]
    exclude = schema["properties"]["dashboards"]["properties"]["exclude"]["items"]["enum"]
    assert exclude == sorted(p.stem for p in (ROOT / "dashboards" / "json").glob("*.json"))


def _leaves(data: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(data, dict) and data:
        return [leaf for k, v in data.items() for leaf in _leaves(v, (*path, k))]
    return [path]


def test_every_value_is_documented_in_the_readme_table() -> None:
    values_text = (CHART / "values.yaml").read_text()
    documented = {tuple(key.split(".")) for key, *_ in sync.values_rows(values_text)}
    missing = [
        ".".join(leaf)
        for leaf in _leaves(yaml.safe_load(values_text))
        if not any(leaf[: len(d)] == d for d in documented)
    ]
    assert missing == []
    readme = (ROOT / "helm" / "README.md").read_text()
    for key in documented:
        assert f"| `{'.'.join(key)}` |" in readme


def test_generator_refuses_a_format_it_does_not_know() -> None:
    with pytest.raises(sync.SyncError, match=r"teach helm/sync_files\.py"):
        sync._threshold_expression("pool_saturation_ratio", "ninety percent")
