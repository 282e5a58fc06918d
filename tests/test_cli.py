"""The `pool-monitor` command and `pool-monitor bench` (its output shape, not its timings:
timing goals live in the benchmark's printed ratios, never in asserts)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from monitor.cli import main


def test_usage_and_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "commands:" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_bench_reports_medians_and_ratios(database_url: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "monitor.cli",
            "bench",
            "--rounds",
            "1",
            "--batches",
            "2",
            "--cycles",
            "50",
            "--url",
            database_url,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    medians = result["medians_us"]
    assert set(medians) == {
        "bare",
        "instrumented",
        "no_code_sites",
        "with_sidecar",
        "no_trace_ctx",
        "traced",
        "traced_wait",
    }
    for mode in medians.values():
        assert set(mode) == {"empty", "handler", "select1"} and all(v > 0 for v in mode.values())
    assert result["depth"] == 25


def test_bench_rejects_bad_arguments() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "monitor.cli", "bench", "--rounds", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "--rounds must be at least 1" in done.stderr
