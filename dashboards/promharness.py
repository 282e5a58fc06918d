"""Run a real Prometheus on loopback with our rules, for tests.

Why a real one: promtool's unit tests prove the rule logic on synthetic series, but only a
running Prometheus proves that our exporters' series, the recording rules, the alert `for`
timers and the dashboards' queries fit together (label joins, parse errors, evaluation
errors such as many-to-many matches). Everything listens on 127.0.0.1 only.

Usage::

    with running_prometheus([ScrapeTarget("app", "127.0.0.1:8000")],
                            for_={"PoolSaturated": "1s"}) as prom:
        prom.wait_for_alert("PoolSaturated", state="firing")
        prom.query("pool:db_client_connection_saturation:ratio")
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dashboards.ruleset import render_rules
from dashboards.thresholds import Value

T = TypeVar("T")

#: Scrape and rule evaluation interval: short, so tests see data and alerts in seconds.
INTERVAL = "1s"


def missing_binary_reason(name: str) -> str:
    return (
        f"`{name}` not found on PATH; install Debian's `prometheus` package "
        "(apt-get install prometheus), which provides `prometheus` and `promtool`"
    )


def require_binary(name: str) -> str:
    """Path of `name` for a test. Missing: skip the test, unless CI is set (then fail),
    so CI cannot pass by silently skipping the Prometheus checks."""
    import pytest  # a test helper: pytest is only needed when this is called

    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{missing_binary_reason(name)} (CI is set, so this is an error)")
    pytest.skip(missing_binary_reason(name))


@dataclass(frozen=True)
class ScrapeTarget:
    """One `static_configs` entry: a job scraping one loopback address."""

    job: str
    address: str
    labels: Mapping[str, str] = field(default_factory=dict)
    metrics_path: str = "/metrics"

    def __post_init__(self) -> None:
        host = self.address.rpartition(":")[0]
        if host not in ("127.0.0.1", "localhost", "[::1]"):
            raise ValueError(f"scrape targets must be on loopback, got {self.address!r}")


class PrometheusError(RuntimeError):
    """Prometheus failed to start, or an API call failed; carries the HTTP status."""

    def __init__(
        self, message: str, status: int | None = None, error_type: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Never send loopback requests through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Prometheus:
    """Client for a running Prometheus' HTTP API (stdlib only)."""

    def __init__(self, url: str, log_path: Path | None = None) -> None:
        self.url = url.rstrip("/")
        self.log_path = log_path

    def _get(
        self, path: str, params: Mapping[str, str] | None = None, timeout: float = 10
    ) -> dict[str, Any]:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with _OPENER.open(f"{self.url}{path}{query}", timeout=timeout) as response:
                body: dict[str, Any] = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                err = json.loads(exc.read())
            except ValueError:
                err = {}
            raise PrometheusError(
                f"GET {path} {dict(params or {})} -> HTTP {exc.code}: "
                f"{err.get('errorType')}: {err.get('error')}",
                status=exc.code,
                error_type=err.get("errorType"),
            ) from None
        if body.get("status") != "success":
            raise PrometheusError(f"GET {path} -> {body}")
        return body

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query; returns the result list (`metric`, `value`). A parse error
        raises PrometheusError with status 400, an evaluation error with 422."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._get("/api/v1/query", params)["data"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def value(self, expr: str) -> float:
        """The single value an expression returns (fails on none or several)."""
        result = self.query(expr)
        if len(result) != 1:
            raise PrometheusError(f"{expr!r} returned {len(result)} series: {result}")
        return float(result[0]["value"][1])

    def exemplars(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        """`/api/v1/query_exemplars`: the exemplars of every series `expr` selects between
        `start` and `end` (unix times), as Grafana asks for a query with exemplars on; one
        entry per series (`seriesLabels`, `exemplars`). Needs `exemplar-storage`."""
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}"}
        return list(self._get("/api/v1/query_exemplars", params)["data"] or [])

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (pending and firing) with labels, annotations and state."""
        return list(self._get("/api/v1/alerts")["data"]["alerts"])

    def rule_groups(self) -> list[dict[str, Any]]:
        """Loaded rule groups with each rule's health and last error."""
        return list(self._get("/api/v1/rules")["data"]["groups"])

    def targets(self) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/targets")["data"]["activeTargets"])

    def wait_for(
        self, probe: Callable[[], T | None], what: str, timeout: float = 30, interval: float = 0.25
    ) -> T:
        """Call `probe` until it returns something truthy; fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            try:
                result = probe()
                if result:
                    return result
            except PrometheusError as exc:
                last_error = exc
            if time.monotonic() > deadline:
                detail = f" (last error: {last_error})" if last_error else ""
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}{detail}")
            time.sleep(interval)

    def wait_for_data(self, expr: str, timeout: float = 30) -> list[dict[str, Any]]:
        return self.wait_for(lambda: self.query(expr), f"data from {expr!r}", timeout)

    def wait_for_alert(
        self, name: str, state: str = "firing", timeout: float = 30
    ) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            for alert in self.alerts():
                if alert["labels"].get("alertname") == name and alert["state"] == state:
                    return alert
            return None

        return self.wait_for(probe, f"alert {name} to be {state}", timeout)

    def wait_for_targets_up(self, timeout: float = 30) -> list[dict[str, Any]]:
        def probe() -> list[dict[str, Any]] | None:
            targets = self.targets()
            return targets if targets and all(t["health"] == "up" for t in targets) else None

        return self.wait_for(probe, "every scrape target to be up", timeout)

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def config(targets: Sequence[ScrapeTarget], rule_files: Iterable[str]) -> dict[str, Any]:
    """prometheus.yml for the harness: 1 s scrapes and evaluations, given targets/rules."""
    jobs: dict[str, list[dict[str, Any]]] = {}
    paths: dict[str, str] = {}
    for target in targets:
        if paths.setdefault(target.job, target.metrics_path) != target.metrics_path:
            raise ValueError(f"job {target.job!r} has two metrics paths")
        entry: dict[str, Any] = {"targets": [target.address]}
        if target.labels:
            entry["labels"] = dict(target.labels)
        jobs.setdefault(target.job, []).append(entry)
    return {
        "global": {
            "scrape_interval": INTERVAL,
            "scrape_timeout": INTERVAL,
            "evaluation_interval": INTERVAL,
        },
        "rule_files": list(rule_files),
        "scrape_configs": [
            {"job_name": job, "metrics_path": paths[job], "static_configs": entries}
            for job, entries in jobs.items()
        ],
    }


@contextlib.contextmanager
def running_prometheus(
    targets: Sequence[ScrapeTarget],
    *,
    thresholds: Mapping[str, Value] | None = None,
    for_: Mapping[str, str] | None = None,
    severity: Mapping[str, str] | None = None,
    disabled: Iterable[str] = (),
    rule_files: Mapping[str, str] | None = None,
    features: Iterable[str] = (),
    binary: str | None = None,
    startup_timeout: float = 30,
) -> Iterator[Prometheus]:
    """Start `prometheus` scraping `targets` with our rules, yield a client, clean up.

    The rules are `render_rules(thresholds, for_, severity, disabled)` unless
    `rule_files` ({file name: YAML text}) is given. `features` are passed as
    `--enable-feature=...` (e.g. `exemplar-storage`). The data directory is temporary.
    """
    feature_args = [f"--enable-feature={name}" for name in features]
    binary = binary or shutil.which("prometheus")
    if not binary:
        raise PrometheusError(missing_binary_reason("prometheus"))
    rules = (
        rule_files if rule_files is not None else render_rules(thresholds, for_, severity, disabled)
    )
    with tempfile.TemporaryDirectory(prefix="pool-monitor-prom-") as tmp:
        root = Path(tmp)
        for name, text in rules.items():
            (root / name).write_text(text, encoding="utf-8")
        config_path = root / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config(targets, sorted(rules))), encoding="utf-8")
        log_path = root / "prometheus.log"
        for attempt in range(3):  # the free port can be taken between probe and bind
            port = _free_port()
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    [
                        binary,
                        f"--config.file={config_path}",
                        f"--storage.tsdb.path={root / 'data'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                        "--log.level=warn",
                        *feature_args,
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=root,
                )
            prom = Prometheus(f"http://127.0.0.1:{port}", log_path)
            try:
                _wait_ready(prom, process, startup_timeout)
            except PrometheusError:
                _stop(process)
                if "address already in use" in prom.log_tail() and attempt < 2:
                    continue
                raise
            break
        try:
            yield prom
        finally:
            _stop(process)


def _wait_ready(prom: Prometheus, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PrometheusError(
                f"prometheus exited with {process.returncode}:\n{prom.log_tail()}"
            )
        try:
            with _OPENER.open(f"{prom.url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise PrometheusError(f"prometheus not ready after {timeout}s:\n{prom.log_tail()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
