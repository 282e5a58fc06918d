"""The README's "Instrument your engine" snippet, as written, under real servers.

The python block under "## Instrument your engine" is read from README.md (so this test
breaks when the README changes) and run verbatim inside a real FastAPI app and a real
Starlette app, each served by a uvicorn process on the embedded PostgreSQL. The block's
free names come from the surrounding module: `create_engine` (SQLAlchemy's), `url` (the
test database), `app` (the framework's application) and `provider` (an OpenTelemetry SDK
`MeterProvider` with an in-memory reader), so every line of it runs, the OpenTelemetry one
included. After one checkout, `GET /metrics` (redirects not followed, as curl does) must
answer 200 with the Prometheus text exposition and the exact values of that checkout;
`/metrics/` answers a 307 redirect to `/metrics` (the router's `redirect_slashes`).

Mounting (`app.mount("/metrics", monitor.metrics_app())`, the README's earlier advice) still
works as before: `/metrics/` answers, `/metrics` redirects there.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import monitor
from tests.test_lifecycle import BIN, ROOT, free_port, wait_for

README = ROOT / "README.md"
POOL = "db_client_connection_pool_name"
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
#: Exposition lines after one checkout and return on the snippet's pool ("orders-api").
ONE_CHECKOUT = 'sqlalchemy_pool_checkouts_total{db_client_connection_pool_name="orders-api"} 1.0\n'
ONE_IDLE = (
    'db_client_connection_count{db_client_connection_pool_name="orders-api",'
    'db_client_connection_state="idle"} 1.0\n'
)


def readme_snippet() -> str:
    """The first python block under the README's "## Instrument your engine"."""
    text = README.read_text()
    section = re.search(r"^## Instrument your engine\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section, "README.md has no '## Instrument your engine' section"
    block = re.search(r"^```python\n(.*?)^```", section.group(1), re.M | re.S)
    assert block, "no ```python block under '## Instrument your engine'"
    return block.group(1)


def test_snippet_serves_metrics_the_documented_way() -> None:
    snippet = readme_snippet()
    assert 'app.add_route("/metrics", monitor.metrics_app())' in snippet
    assert "app.mount(" not in snippet, "mounting answers /metrics with a 307 and no body"


APP_MODULE = """\
import os

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from sqlalchemy import create_engine

url = os.environ["README_DATABASE_URL"]
reader = InMemoryMetricReader()
provider = MeterProvider(metric_readers=[reader])
if os.environ["README_FRAMEWORK"] == "fastapi":
    from fastapi import FastAPI

    app = FastAPI()
else:
    from starlette.applications import Starlette

    app = Starlette()

# ---- README.md, "## Instrument your engine", verbatim ----
{snippet}
# ---- end of the README's block ----

from starlette.responses import JSONResponse, PlainTextResponse


def checkout(request):
    with engine.connect():
        pass
    return PlainTextResponse("ok")


def otel(request):
    data = reader.get_metrics_data()
    return JSONResponse(sorted(
        metric.name
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    ))


app.add_route("/checkout", checkout)
app.add_route("/otel", otel)
"""


@pytest.fixture
def serve(database_url: str, tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Serve the README's snippet inside `framework` with uvicorn; its base URL."""
    procs: list[subprocess.Popen[bytes]] = []
    (tmp_path / "readme_app.py").write_text(APP_MODULE.replace("{snippet}", readme_snippet()))

    def _serve(framework: str) -> str:
        port = free_port()
        log = tmp_path / f"{framework}.log"
        argv = [str(BIN / "uvicorn"), "readme_app:app", "--app-dir", str(tmp_path)]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [*argv, "--port", str(port)],
                cwd=ROOT,
                env={
                    **os.environ,
                    "PYTHONPATH": str(ROOT),
                    "README_DATABASE_URL": database_url,
                    "README_FRAMEWORK": framework,
                },
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, log.read_text(errors="replace")
            try:  # /otel checks nothing out, so the readiness probe leaves the pool alone
                return httpx.get(f"{base}/otel", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, 20, f"uvicorn serving the README snippet under {framework}")
        return base

    yield _serve
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _samples(exposition: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


@pytest.mark.parametrize("framework", ["fastapi", "starlette"])
def test_readme_snippet_under_uvicorn(serve: Callable[[str], str], framework: str) -> None:
    base = serve(framework)
    assert httpx.get(f"{base}/checkout", timeout=10).text == "ok"

    # As curl does: no redirect followed.
    response = httpx.get(f"{base}/metrics", timeout=10, follow_redirects=False)
    assert response.status_code == 200, (response.status_code, response.headers)
    assert response.headers["content-type"] == PROMETHEUS_TEXT
    text = response.text
    # The snippet's pool, with the exact values of one checkout and return.
    assert ONE_CHECKOUT in text
    assert ONE_IDLE in text
    samples = _samples(text)
    orders = frozenset({(POOL, "orders-api")})
    assert samples["sqlalchemy_pool_checkouts_total", orders] == 1
    used = orders | {("db_client_connection_state", "used")}
    assert samples["db_client_connection_count", used] == 0
    assert samples["db_client_connection_max", orders] == 15  # QueuePool's 5 + 10 overflow
    assert samples["db_client_connection_idle_max", orders] == 5
    assert samples["db_client_connection_use_time_seconds_count", orders] == 1
    assert "python_info" in text, "the application's own default-registry metrics too"

    # HEAD: the same status and content type, no body.
    head = httpx.head(f"{base}/metrics", timeout=10)
    assert head.status_code == 200
    assert head.headers["content-type"] == PROMETHEUS_TEXT
    assert head.content == b""

    # /metrics/ is not a route: the router redirects it to /metrics (307, same method).
    slash = httpx.get(f"{base}/metrics/", timeout=10, follow_redirects=False)
    assert slash.status_code == 307
    assert slash.headers["location"] == f"{base}/metrics"
    followed = httpx.get(f"{base}/metrics/", timeout=10, follow_redirects=True)
    assert followed.status_code == 200
    assert ONE_CHECKOUT in followed.text

    # The snippet's OpenTelemetry line ran: the same pool through the SDK's reader.
    assert "db.client.connection.count" in httpx.get(f"{base}/otel", timeout=10).json()


async def _requests(app: Any, *calls: tuple[str, str]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        return [await client.request(method, path) for method, path in calls]


@pytest.mark.parametrize("framework", ["fastapi", "starlette"])
def test_mounting_still_works(framework: str) -> None:
    """Backward compatible: `metrics_app()` mounted still answers at the mount's `/`, and
    Starlette's Mount redirects the bare path there (307, empty body: why the README now
    says `add_route`); as a route it answers GET and HEAD on the path itself."""
    if framework == "fastapi":
        from fastapi import FastAPI

        app: Any = FastAPI()
    else:
        from starlette.applications import Starlette

        app = Starlette()
    app.mount("/mounted", monitor.metrics_app())
    app.add_route("/metrics", monitor.metrics_app())
    calls = [("GET", "/mounted/"), ("GET", "/mounted"), ("GET", "/metrics"), ("HEAD", "/metrics")]
    mounted, bare, route, head = asyncio.run(_requests(app, *calls))
    assert mounted.status_code == 200
    assert mounted.headers["content-type"] == PROMETHEUS_TEXT
    assert "python_info" in mounted.text
    assert bare.status_code == 307
    assert bare.headers["location"] == "http://app/mounted/"
    assert bare.content == b""
    assert route.status_code == 200
    assert route.headers["content-type"] == PROMETHEUS_TEXT
    assert "python_info" in route.text
    assert (head.status_code, head.content) == (200, b"")
