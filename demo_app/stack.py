"""The running demo: fake external service, demo service (N uvicorn workers), sidecar.

`DemoStack` is a context manager, usable from the runner and from tests (e.g. a test that
points a real Prometheus at the service and the sidecar). It picks ports (preferred ones
when free, so URLs are stable for a user's Prometheus, else any free port), starts each
process with its own log file, waits for health, and stops them all by pid on exit.
The service's workers write monitor snapshots to a temporary directory the sidecar reads,
the monitor's long-held and misuse log records, with their structured fields, to
`<log_dir>/monitor-events.jsonl` (`events_path`; see `demo_app.events`), and their finished
OpenTelemetry spans to `<log_dir>/spans-<pid>.jsonl` (`traces_dir`; see `demo_app.traces`).
When the installed sidecar takes `--trace-url-template`, its live page links each hold's
trace id to the service's `/demo/traces/{trace_id}` (the spans from those files).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from types import TracebackType

from sqlalchemy.engine import make_url

from demo_app import events, servers, traces
from demo_app.settings import DemoSettings


def sidecar_available() -> bool:
    """True once issue 5's `monitor.sidecar` exists in this installation."""
    try:
        return importlib.util.find_spec("monitor.sidecar") is not None
    except (ImportError, ValueError):
        return False


#: The sidecar option that makes its live page link trace ids (when it has it).
TRACE_URL_OPTION = "--trace-url-template"


def sidecar_takes(option: str) -> bool:
    """True if the installed sidecar's command line has `option`."""
    try:
        from monitor.sidecar.config import build_parser

        return option in build_parser()._option_string_actions
    except Exception:  # an older or broken sidecar: just don't pass it
        return False


def libpq_dsn(sqlalchemy_url: str) -> str:
    """`postgresql+psycopg://…` → `postgresql://…`, what psycopg/libpq accept as a DSN."""
    return (
        make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)
    )


class DemoStack:
    """Start everything the demo serves; stop it all on exit."""

    def __init__(
        self,
        database_url: str,
        *,
        latency_s: float,
        log_dir: Path,
        workers: int = 2,
        base_port: int | None = 8700,
        start_sidecar: bool = True,
    ) -> None:
        self.database_url = database_url
        self.latency_s = latency_s
        self.log_dir = log_dir
        #: The monitor's log records from every worker, one JSON object a line.
        self.events_path = (log_dir / "monitor-events.jsonl").resolve()
        #: Each worker's finished spans, `spans-<pid>.jsonl` (`demo_app.traces`).
        self.traces_dir = log_dir.resolve()
        self.workers = workers
        self._base_port = base_port
        self._start_sidecar = start_sidecar
        self._procs: list[subprocess.Popen[bytes]] = []
        self.snapshot_dir = ""
        self.service_url = self.external_url = ""
        self.sidecar_url: str | None = None
        self.sidecar_note = ""
        self.settings: DemoSettings | None = None

    def _port(self, offset: int) -> int:
        return servers.free_port(self._base_port + offset if self._base_port else None)

    def __enter__(self) -> DemoStack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _start(self) -> None:
        self.snapshot_dir = tempfile.mkdtemp(prefix="pool-monitor-snapshots-")
        for old in self.traces_dir.glob(traces.SPAN_FILE_GLOB):  # a previous run's spans
            old.unlink(missing_ok=True)
        ext_port = self._port(1)
        self.external_url = f"http://{servers.HOST}:{ext_port}"
        external = servers.start_process(
            servers.uvicorn_command("demo_app.external:create_app", ext_port),
            self.log_dir / "external.log",
            {"DEMO_EXTERNAL_LATENCY_S": str(self.latency_s)},
        )
        self._procs.append(external)
        servers.wait_until_ok(f"{self.external_url}/healthz", 30, external)

        scaled = DemoSettings.scaled(self.database_url, self.external_url, self.latency_s)
        self.settings = replace(scaled, traces_dir=str(self.traces_dir))
        port = self._port(0)
        self.service_url = f"http://{servers.HOST}:{port}"
        service = servers.start_process(
            servers.uvicorn_command("demo_app.service:create_app", port, workers=self.workers),
            self.log_dir / "service.log",
            {
                **self.settings.to_env(),
                "POOL_MONITOR_SNAPSHOT_DIR": self.snapshot_dir,
                events.ENV_VAR: str(self.events_path),
                "PYTHONUNBUFFERED": "1",
            },
        )
        self._procs.append(service)
        servers.wait_until_ok(f"{self.service_url}/healthz", 60, service)

        if not self._start_sidecar:
            self.sidecar_note = "sidecar not requested"
        elif not sidecar_available():
            self.sidecar_note = "sidecar skipped: monitor.sidecar is not installed yet (issue 5)"
        else:
            self._start_sidecar_process()

    def _start_sidecar_process(self) -> None:
        port = self._port(2)
        url = f"http://{servers.HOST}:{port}"
        command = [sys.executable, "-m", "monitor.cli", "sidecar"]
        command += ["--snapshot-dir", self.snapshot_dir, "--listen", f"{servers.HOST}:{port}"]
        # The DSN goes through the environment, not `--postgres-dsn`: arguments show in `ps`,
        # and a DATABASE_URL may carry a password.
        if sidecar_takes(TRACE_URL_OPTION):  # a real target: the spans this demo wrote
            command += [TRACE_URL_OPTION, f"{self.service_url}/demo/traces/{{trace_id}}"]
        env = {"POOL_MONITOR_POSTGRES_DSN": libpq_dsn(self.database_url)}
        sidecar = servers.start_process(command, self.log_dir / "sidecar.log", env)
        self._procs.append(sidecar)
        try:
            servers.wait_until_ok(f"{url}/healthz", 30, sidecar)
        except (RuntimeError, TimeoutError) as exc:
            servers.stop_process(sidecar)
            self._procs.remove(sidecar)
            self.sidecar_note = f"sidecar did not start ({exc}); see {self.log_dir / 'sidecar.log'}"
            return
        self.sidecar_url = url
        self.sidecar_note = "sidecar running"

    def alive(self) -> bool:
        return all(p.poll() is None for p in self._procs)

    def stop(self) -> None:
        for proc in reversed(self._procs):
            servers.stop_process(proc)
        self._procs.clear()
        if self.snapshot_dir:
            shutil.rmtree(self.snapshot_dir, ignore_errors=True)
            self.snapshot_dir = ""
