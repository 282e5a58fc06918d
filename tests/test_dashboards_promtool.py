"""`promtool check rules` and `promtool test rules` on the committed rule files.

Without promtool these skip, except under CI (CI set to anything), where they fail.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

import dashboards
from dashboards.promharness import require_binary
from dashboards.ruleset import render_rules
from dashboards.thresholds import ALERTS

RULES = Path(dashboards.__file__).resolve().parent / "rules"
RULE_FILES = sorted(RULES.glob("*.yml"))
TEST_FILES = sorted((RULES / "tests").glob("*.yml"))


def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_rule_files_are_the_ones_expected() -> None:
    assert [p.name for p in RULE_FILES] == ["alerts.yml", "recording.yml"]
    assert [p.name for p in TEST_FILES] == ["alerts_test.yml", "recording_test.yml"]


def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 13 rules found" in result.stdout
    assert "SUCCESS: 33 rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = _promtool("test", "rules", *map(str, TEST_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(TEST_FILES)


def _alert_tests() -> list[dict[str, Any]]:
    doc = yaml.safe_load((RULES / "tests" / "alerts_test.yml").read_text())
    return [case for test in doc["tests"] for case in test.get("alert_rule_test", [])]


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases = _alert_tests()
    for alert in ALERTS:
        mine = [c for c in cases if c["alertname"] == alert.alert]
        assert any(c["exp_alerts"] for c in mine), f"{alert.alert}: no case where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{alert.alert}: no quiet case"
    assert {c["alertname"] for c in cases} == {a.alert for a in ALERTS}


def test_unit_tests_catch_a_changed_threshold(tmp_path: Path) -> None:
    """The unit tests must be able to fail: with PoolSaturated lowered to 0.85 the quiet
    case at exactly 0.9 fires, and the description no longer matches."""
    shutil.copytree(RULES / "tests", tmp_path / "tests")
    for name, text in render_rules(thresholds={"pool_saturation_ratio": 0.85}).items():
        (tmp_path / name).write_text(text)
    result = _promtool("test", "rules", str(tmp_path / "tests" / "alerts_test.yml"))
    assert result.returncode != 0
    assert "PoolSaturated stays quiet at exactly 0.9" in result.stdout + result.stderr
    assert "PoolPendingRequestsSustained" not in result.stdout + result.stderr


def test_check_rules_rejects_a_broken_expression(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(
        render_rules()["alerts.yml"].replace(
            "pool:db_client_connection_saturation:ratio > 0.9",
            "pool:db_client_connection_saturation:ratio > > 0.9",
        )
    )
    result = _promtool("check", "rules", str(broken))
    assert result.returncode != 0
    assert "parse error" in result.stdout + result.stderr
