"""Grafana dashboards and Prometheus rules for pool-monitor, generated from code.

`python -m dashboards` (later also `pool-monitor dashboards`) regenerates the committed
files: `json/*.json` (Grafana), `rules/*.yml` (Prometheus) and the thresholds table in
`README.md`. Tests fail when the committed files differ from what the generator makes.

The Grafana builder library is imported lazily, so `render_rules()` and the Prometheus
harness work without it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from dashboards.ruleset import render_rules

__all__ = ["PACKAGE_DIR", "build_dashboards", "generate", "render_rules"]

PACKAGE_DIR = Path(__file__).resolve().parent


def build_dashboards() -> dict[str, dict[str, Any]]:
    """Every dashboard as a Grafana JSON model, keyed by its file name under `json/`."""
    with warnings.catch_warnings():
        # The SDK warns on import that it prefers the v2 schema, which only Grafana 12+
        # with a feature flag reads; the v1 JSON we build is what file provisioning loads
        # everywhere.
        warnings.filterwarnings("ignore", "Prefer using dashboardv2", DeprecationWarning)
        from dashboards.boards import BOARDS

        return {name: build() for name, build in BOARDS.items()}


def generate(out_dir: Path | str | None = None) -> list[Path]:
    """Write every generated file under `out_dir` (default: this package's directory).

    Returns the paths written. `out_dir` gets the same layout as the package: `json/`,
    `rules/` and, if a README.md exists there, its thresholds table is refreshed.
    """
    from dashboards.writer import write_all

    return write_all(Path(out_dir) if out_dir is not None else PACKAGE_DIR)
