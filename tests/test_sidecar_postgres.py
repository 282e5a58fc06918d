"""The PostgreSQL collector when things go wrong (issue 5): the server stops and comes
back, the DSN is bad. The sidecar keeps serving, says `pg_up 0`, counts the failures and
logs one readable line per streak (never the password)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from demo_app.stack import libpq_dsn
from monitor.sidecar.aggregate import EMPTY
from monitor.sidecar.app import create_app
from monitor.sidecar.config import SidecarConfig
from monitor.sidecar.metrics import Registries
from monitor.sidecar.postgres import PostgresCollector
from monitor.sidecar.runtime import Sidecar


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_server_stopped_and_restarted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pgserver = pytest.importorskip("pgserver")
    caplog.set_level(logging.INFO, logger="monitor.sidecar.postgres")
    data = tmp_path / "pgdata"
    server = pgserver.get_server(data, cleanup_mode="stop")
    try:
        dsn = libpq_dsn(server.get_uri())
        collector = PostgresCollector(dsn, 0.2, backoff_max=0.2)
        registries = Registries(lambda: EMPTY, collector)
        with psycopg.connect(dsn, application_name="restart-app"):
            assert collector.poll()
            up = samples(registries.exposition().decode())
        assert up[("pg_up", ())] == 1
        assert (
            up[("pg_app_backends", (("application_name", "restart-app"), ("state", "idle")))] == 1
        )
        server.cleanup()  # PostgreSQL stops
        assert not collector.poll() and not collector.poll()
        down = samples(registries.exposition().decode())
        assert down[("pg_up", ())] == 0
        assert not any(name.startswith("pg_app_") for name, _ in down)
        assert down[("pool_monitor_sidecar_postgres_poll_errors_total", ())] == 2
        lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(lines) == 1 and lines[0].startswith("PostgreSQL unreachable: ")
        server = pgserver.get_server(data, cleanup_mode="stop")  # and comes back
        assert libpq_dsn(server.get_uri()) == dsn
        assert collector.poll()
        assert samples(registries.exposition().decode())[("pg_up", ())] == 1
        assert "PostgreSQL reachable again" in caplog.text
    finally:
        server.cleanup()


async def test_bad_dsn_keeps_serving_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="monitor.sidecar.postgres")
    cfg = SidecarConfig(
        snapshot_dir=str(tmp_path),
        listen_host="127.0.0.1",
        postgres_dsn="dbname=x password=hunter2 oops",
        postgres_interval=0.1,
    )
    sidecar = Sidecar(cfg)
    sidecar.pg.backoff_max = 0.1
    sidecar.start()  # the real threads
    try:
        deadline = time.monotonic() + 10
        while sidecar.pg.errors < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        transport = httpx.ASGITransport(create_app(sidecar, manage=False))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            metrics = await http.get("/metrics")
            pools = (await http.get("/api/pools")).json()
            ready = await http.get("/readyz")
    finally:
        sidecar.stop()
    assert metrics.status_code == 200
    values = samples(metrics.text)
    assert values[("pg_up", ())] == 0
    assert values[("pool_monitor_sidecar_postgres_poll_errors_total", ())] >= 2
    assert ready.status_code == 200  # PostgreSQL down is not "sidecar not ready"
    error = pools["postgres"]["error"]
    assert error.startswith("invalid DSN: ") and "hunter2" not in error
    assert "hunter2" not in caplog.text and "invalid DSN" in caplog.text
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
