"""The sidecar's HTTP surface in-process (issue 5): token enforcement, the loopback rule,
the metric names shared with the in-process exporter, health, options.

The app runs in-process over httpx's ASGI transport; the end-to-end test
(test_sidecar_e2e) runs the real command with real workers.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

import monitor
from monitor.exporters import snapshot
from monitor.exporters.prometheus import families
from monitor.exporters.samples import lock_samples, pool_samples
from monitor.sidecar import cli, config, sqltext
from monitor.sidecar.app import create_app
from monitor.sidecar.config import SidecarConfig
from monitor.sidecar.runtime import Sidecar

TOKEN = "s3cret-token-value"

Client = Callable[..., Any]


@pytest.fixture
def snapshot_dir(tmp_path: Path) -> Path:
    """One real process document (this process, one instrumented sqlite pool)."""
    engine = sa.create_engine(
        f"sqlite:///{tmp_path / 'db.sqlite'}", poolclass=sa.pool.QueuePool, pool_size=2
    )
    monitor.instrument(engine, pool_name="api-pool")
    try:
        with monitor.lock("api-lock"):
            pass
        for _ in range(3):
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        held = engine.connect()
        doc = snapshot.process_snapshot(1.0)
        held.close()
    finally:
        monitor.uninstrument(engine)
        engine.dispose()
    doc["pools"] = [p for p in doc["pools"] if p["pool"] == "api-pool"]
    out = tmp_path / "snapshots"
    out.mkdir()
    (out / snapshot.file_name(snapshot.identity())).write_text(json.dumps(doc))
    return out


@pytest.fixture
async def client(snapshot_dir: Path, tmp_path: Path) -> AsyncIterator[Client]:
    """`await client(path, listen=..., token=..., **headers)` against a fresh sidecar."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    clients: list[httpx.AsyncClient] = []

    async def request(
        path: str,
        *,
        listen: str = "127.0.0.1",
        token: bool = False,
        insecure: bool = False,
        method: str = "GET",
        **kwargs: Any,
    ) -> httpx.Response:
        cfg = SidecarConfig(
            snapshot_dir=str(snapshot_dir),
            listen_host=listen,
            auth_token_file=str(token_file) if token else None,
            insecure_api=insecure,
        )
        sidecar = Sidecar(cfg)
        sidecar.scan()
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(create_app(sidecar, manage=False)),
            base_url="http://127.0.0.1",  # a loopback Host: see test_sidecar_auth
        )
        clients.append(http)
        return await http.request(method, path, **kwargs)

    yield request
    for http in clients:
        await http.aclose()


async def test_api_and_page_require_the_token_when_configured(client: Client) -> None:
    for path in ("/api/pools", "/api/checkouts", "/"):
        assert (await client(path, token=True)).status_code == 401, path
        wrong = await client(path, token=True, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401, path
        ok = await client(path, token=True, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200, path
    refused = await client("/api/pools", token=True)
    assert refused.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in refused.json()["error"]
    page = await client("/", token=True)
    assert '<form method="post" action="/login">' in page.text
    for path in ("/metrics", "/healthz", "/readyz", "/static/live.js"):
        assert (await client(path, token=True)).status_code == 200, path


async def test_browser_login_sets_a_cookie_the_page_and_api_accept(client: Client) -> None:
    bad = await client(
        "/login",
        token=True,
        method="POST",
        content="token=nope",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert bad.status_code == 401 and "set-cookie" not in bad.headers
    good = await client(
        "/login",
        token=True,
        method="POST",
        content=f"token={TOKEN}",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert good.status_code == 303
    cookie = good.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    value = cookie.split(";")[0].split("=", 1)[1]
    page = await client("/", token=True, headers={"Cookie": f"pool_monitor_token={value}"})
    assert page.status_code == 200 and 'id="holds"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]


async def test_non_loopback_listener_without_token_refuses_api_and_page(client: Client) -> None:
    for path in ("/api/pools", "/api/checkouts", "/"):
        refused = await client(path, listen="0.0.0.0")
        assert refused.status_code == 403, path
        assert "--auth-token-file" in refused.text and "--insecure-api" in refused.text
        assert (await client(path, listen="0.0.0.0", insecure=True)).status_code == 200
        assert (await client(path, listen="::1")).status_code == 200
    assert (await client("/metrics", listen="0.0.0.0")).status_code == 200


async def test_metrics_use_the_in_process_exporter_names_and_labels(
    client: Client, snapshot_dir: Path
) -> None:
    doc = json.loads(next(snapshot_dir.iterdir()).read_text())
    text = (await client("/metrics")).text
    served = {f.name: f for f in text_string_to_metric_families(text)}
    expected = [*families([*pool_samples(doc["pools"]), *lock_samples(doc["locks"])])]
    for family in expected:
        assert family.name in served, family.name
        ours = {(s.name, tuple(sorted(s.labels.items())), s.value) for s in family.samples}
        theirs = {
            (s.name, tuple(sorted(s.labels.items())), s.value) for s in served[family.name].samples
        }
        assert ours == theirs, family.name
    checkouts = served["sqlalchemy_pool_checkouts"].samples[0]
    assert checkouts.value == 4 and checkouts.labels == {
        "db_client_connection_pool_name": "api-pool"
    }
    assert served["pool_monitor_snapshot_errors"].type == "counter"
    assert "pg_up" not in served  # no DSN: no PostgreSQL series at all


async def test_api_payloads(client: Client) -> None:
    pools = (await client("/api/pools")).json()
    [p] = pools["pools"]
    assert p["pool"] == "api-pool" and p["checkouts"] == 4 and p["processes"] == 1
    assert p["used"] == 1 and p["max"] == 12 and p["holds"] == 1
    assert pools["postgres"]["configured"] is False
    assert pools["processes"][0]["pid"] == os.getpid()
    [row] = (await client("/api/checkouts")).json()
    assert set(row) >= {
        "pool",
        "age_s",
        "site",
        "thread",
        "task",
        "backend_pid",
        "server_state",
        "server_xact_age_s",
        "wait_event",
        "blocked_by",
    }
    assert row["pool"] == "api-pool" and row["site"].startswith("tests/test_sidecar_api.py:")
    assert row["server_state"] is None and row["blocked_by"] == []
    assert "query" not in row


async def test_health_and_readiness(client: Client, tmp_path: Path) -> None:
    assert (await client("/healthz")).json() == {"status": "ok"}
    ready = await client("/readyz")
    assert ready.status_code == 200 and ready.json()["live_processes"] == 1
    cfg = SidecarConfig(snapshot_dir=str(tmp_path / "absent"))
    sidecar = Sidecar(cfg)
    sidecar.scan()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(create_app(sidecar, False)), base_url="http://s"
    ) as http:
        not_ready = await http.get("/readyz")
        metrics = await http.get("/metrics")
    assert not_ready.status_code == 503 and "absent" in not_ready.json()["snapshot_dir_error"]
    assert "pool_monitor_sidecar_snapshot_dir_readable 0.0" in metrics.text


def test_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text("postgresql://u:pw@db/app\n")
    cfg = config.parse(
        ["--snapshot-dir", "/s", "--postgres-dsn-file", str(dsn_file), "--listen", "[::1]:9999"],
        environ={},
    )
    assert (cfg.postgres_dsn, cfg.listen_host, cfg.listen_port) == (
        "postgresql://u:pw@db/app",
        "::1",
        9999,
    )
    assert (
        config.parse([], environ={"POOL_MONITOR_POSTGRES_DSN": "host=x"}).postgres_dsn == "host=x"
    )
    defaults = config.parse([], environ={})
    assert (defaults.listen_host, defaults.listen_port, defaults.postgres_interval) == (
        "0.0.0.0",
        9187,
        5.0,
    )
    assert cli.main(["--listen", "nowhere"]) == 2
    assert "--listen must be HOST:PORT" in capsys.readouterr().err
    assert cli.main(["--auth-token-file", str(tmp_path / "missing")]) == 2
    assert "cannot read --auth-token-file" in capsys.readouterr().err
    assert cli.main(["--postgres-interval", "0"]) == 2


def test_query_text_is_masked_and_truncated() -> None:
    sql = "UPDATE users SET email = 'a@b.c', n = 42 WHERE id = $1 AND tag = $t$x$t$"
    assert sqltext.mask(sql) == "UPDATE users SET email = ?, n = ? WHERE id = $1 AND tag = ?"
    assert sqltext.shown("SELECT 'secret'  \n FROM t", 10) == "SELECT ? …"
    assert sqltext.shown("SELECT 'unterminated secret", 200) == "SELECT ?"
