"""Trace ids wherever the sidecar shows a hold, linked through `--trace-url-template`.

- the option (and `$POOL_MONITOR_TRACE_URL_TEMPLATE`): good templates are kept, each bad
  kind (another scheme, no host, no `{trace_id}`, another placeholder, spaces) stops the
  sidecar at start with a message naming the setting and the problem;
- `/api/checkouts`: `trace_id`, `span_id`, `trace_url` on every row and on the holds in
  `blocked_by`, exact, with and without ids and template; through the real app, from a
  real worker document, a document with a hostile "trace id" is rejected whole;
- the live page in headless Chromium: the trace column links the traced hold to the
  template's URL (new tab, no opener, no referrer), shows nothing for an untraced hold,
  and nothing of the hostile document.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

import monitor
from monitor.config import ConfigError
from monitor.exporters import snapshot
from monitor.sidecar import api, cli, config
from monitor.sidecar.aggregate import View
from monitor.sidecar.app import create_app
from monitor.sidecar.config import SidecarConfig
from monitor.sidecar.postgres import Backend, PgView
from monitor.sidecar.runtime import Sidecar
from tests.test_sidecar_e2e import ROOT, chromium_dom, free_port, wait_for

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"
TEMPO = "https://tempo.example/trace/{trace_id}"
#: A Grafana Explore URL as Explore writes it: raw JSON braces, which are not placeholders.
GRAFANA = (
    'https://grafana.example/explore?left={"datasource":"tempo","queries":'
    '[{"refId":"A","queryType":"traceql","query":"{trace_id}"}]}&span={span_id}'
)
ENV = "POOL_MONITOR_TRACE_URL_TEMPLATE"


# -- the option ---------------------------------------------------------------------------
def test_good_templates_are_kept_and_fill_in_the_ids() -> None:
    assert config.parse([], environ={}).trace_url_template is None
    for template in (
        TEMPO,
        "http://jaeger.internal:16686/trace/{trace_id}?uiFind={span_id}",
        GRAFANA,
        "HTTPS://Tempo.Example/trace/{trace_id}",
    ):
        parsed = config.parse(["--trace-url-template", template], environ={})
        assert parsed.trace_url_template == template
    assert config.trace_url(TEMPO, TRACE, SPAN) == f"https://tempo.example/trace/{TRACE}"
    assert config.trace_url(GRAFANA, TRACE, SPAN) == (
        'https://grafana.example/explore?left={"datasource":"tempo","queries":'
        f'[{{"refId":"A","queryType":"traceql","query":"{TRACE}"}}]}}&span={SPAN}'
    )
    assert config.trace_url(GRAFANA, TRACE, None).endswith("&span=")
    # ids are URL-quoted (hex needs nothing; anything else could not break out)
    assert config.trace_url(TEMPO, "a/b?c#d", None) == "https://tempo.example/trace/a%2Fb%3Fc%23d"


def test_the_variable_is_read_and_the_option_wins() -> None:
    assert config.parse([], environ={ENV: TEMPO}).trace_url_template == TEMPO
    assert config.parse([], environ={ENV: f"  {TEMPO}\n"}).trace_url_template == TEMPO
    assert config.parse([], environ={ENV: ""}).trace_url_template is None
    assert (
        config.parse(["--trace-url-template", GRAFANA], environ={ENV: TEMPO}).trace_url_template
        == GRAFANA
    )
    # an empty option turns it off even with the variable set
    assert (
        config.parse(["--trace-url-template", ""], environ={ENV: TEMPO}).trace_url_template is None
    )


BAD = {
    "javascript:alert({trace_id})": "must be an http:// or https:// URL, got javascript:",
    "JavaScript:alert({trace_id})": "must be an http:// or https:// URL, got javascript:",
    "data:text/html,<b>{trace_id}</b>": "must be an http:// or https:// URL, got data:",
    "ftp://files.example/{trace_id}": "must be an http:// or https:// URL, got ftp:",
    "/trace/{trace_id}": "must be an http:// or https:// URL, got no scheme",
    "https:///trace/{trace_id}": "must be an absolute URL with a host (https://host/...)",
    "https://tempo.example/trace/": "must contain the placeholder {trace_id}",
    "https://tempo.example/trace/{traceId}": (
        "has an unknown placeholder {traceId}: only {trace_id} and {span_id} are replaced"
    ),
    "https://tempo.example/{trace_id}/{0}": (
        "has an unknown placeholder {0}: only {trace_id} and {span_id} are replaced"
    ),
    "https://tempo.example/{trace_id:.8}": (
        "has an unknown placeholder {trace_id:.8}: only {trace_id} and {span_id} are replaced"
    ),
    "https://tempo.example/{}{trace_id}": (
        "has an unknown placeholder {}: only {trace_id} and {span_id} are replaced"
    ),
    "https://tempo.example/trace/ {trace_id}": (
        "must not contain spaces or control characters (percent-encode them)"
    ),
    "java\tscript:alert({trace_id})": (
        "must not contain spaces or control characters (percent-encode them)"
    ),
}


@pytest.mark.parametrize("template", sorted(BAD))
def test_each_bad_template_is_a_startup_error_naming_the_setting(
    template: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError) as raised:
        config.parse(["--trace-url-template", template], environ={})
    assert str(raised.value) == f"--trace-url-template {BAD[template]}"
    with pytest.raises(ConfigError) as raised:
        config.parse([], environ={ENV: template})
    assert str(raised.value) == f"--trace-url-template (from ${ENV}) {BAD[template]}"
    assert cli.main(["--trace-url-template", template]) == 2
    assert (
        capsys.readouterr().err == f"pool-monitor sidecar: --trace-url-template {BAD[template]}\n"
    )


def test_the_error_never_quotes_the_template() -> None:
    """A URL may carry credentials; the message names the problem, not the value."""
    with pytest.raises(ConfigError) as raised:
        config.parse(["--trace-url-template", "https://user:hunter2@tempo.example/"], environ={})
    assert "hunter2" not in str(raised.value)


# -- /api/checkouts rows ------------------------------------------------------------------
NOW = 1_700_000_000.0


def _hold(pid: int, site: str, **extra: Any) -> dict[str, Any]:
    return {
        "pool": "orders",
        "started_at": NOW - 5.0,
        "as_of": NOW,
        "site": site,
        "thread": "MainThread",
        "task": None,
        "backend_pid": pid,
        "process": {"hostname": "h", "pid": 7},
        **extra,
    }


def _backend(pid: int, blocked_by: tuple[int, ...] = ()) -> Backend:
    return Backend(
        pid=pid,
        application_name="orders",
        state="active" if blocked_by else "idle in transaction",
        wait_event_type="Lock" if blocked_by else "Client",
        wait_event="transactionid" if blocked_by else "ClientRead",
        xact_age_s=1.0,
        state_age_s=1.0,
        xact_start=NOW - 1.0,
        state_change=NOW - 1.0,
        blocked_by=blocked_by,
        lock_wait_s=1.0 if blocked_by else None,
        query=None,
    )


def _rows(holds: list[dict[str, Any]], template: str | None) -> list[dict[str, Any]]:
    """Holds 101 (traced, blocks 102), 102 (traced, blocked), 103 (none), a pending one."""
    view = View(NOW, 0.0, [{"holds": holds}], {}, [], {}, None, 1)
    pg = PgView(
        configured=True,
        up=True,
        polled_at=NOW,
        poll_started_at=NOW,
        sampled_at=NOW,
        backends={101: _backend(101), 102: _backend(102, (101,)), 103: _backend(103)},
    )
    return api.checkouts(view, pg, now=NOW, trace_url_template=template)


HOLDS = [
    _hold(101, "blocker.py:1:f", trace_id=TRACE, span_id=SPAN),
    _hold(102, "waiter.py:2:g", started_at=NOW - 4.0, trace_id="1" * 32, span_id="2" * 16),
    _hold(103, "plain.py:3:h", started_at=NOW - 3.0),
    {"pool": "orders", "started_at": NOW - 2.0, "as_of": NOW, "pending": True},
]


def _trace_fields(row: dict[str, Any]) -> tuple[Any, Any, Any]:
    return row["trace_id"], row["span_id"], row["trace_url"]


def test_rows_without_a_template_carry_the_ids_and_no_link() -> None:
    rows = _rows(HOLDS, None)
    assert [_trace_fields(r) for r in rows] == [
        (TRACE, SPAN, None),
        ("1" * 32, "2" * 16, None),
        (None, None, None),
        (None, None, None),  # pending: details (and ids) arrive with the next document
    ]
    [by] = rows[1]["blocked_by"]
    assert by["holds"] == [
        {
            "pool": "orders",
            "age_s": 5.0,
            "site": "blocker.py:1:f",
            "thread": "MainThread",
            "task": None,
            "process": {"hostname": "h", "pid": 7},
            "trace_id": TRACE,
            "span_id": SPAN,
            "trace_url": None,
        }
    ]


def test_rows_with_a_template_link_traced_holds_only() -> None:
    rows = _rows(HOLDS, GRAFANA)
    grafana_url = config.trace_url(GRAFANA, TRACE, SPAN)
    assert [_trace_fields(r) for r in rows] == [
        (TRACE, SPAN, grafana_url),
        ("1" * 32, "2" * 16, config.trace_url(GRAFANA, "1" * 32, "2" * 16)),
        (None, None, None),
        (None, None, None),
    ]
    assert rows[1]["blocked_by"][0]["holds"][0]["trace_url"] == grafana_url
    assert rows[1]["blocked_by"][0]["holds"][0]["trace_id"] == TRACE
    [row] = _rows([_hold(101, "a.py:1:f", trace_id=TRACE)], TEMPO)  # no span id recorded
    assert _trace_fields(row) == (TRACE, None, f"https://tempo.example/trace/{TRACE}")


# -- the real app, from a real worker document --------------------------------------------
@pytest.fixture
def documents(tmp_path: Path) -> Iterator[tuple[dict[str, Any], Path]]:
    """This process's real document: one hold checked out under an OpenTelemetry span
    (known ids), one with no span current; and an empty snapshot directory."""
    trace = pytest.importorskip("opentelemetry.trace")
    engine = sa.create_engine(
        f"sqlite:///{tmp_path / 'db.sqlite'}", poolclass=sa.pool.QueuePool, pool_size=2
    )
    monitor.instrument(engine, pool_name="traced-pool")
    context = trace.SpanContext(
        int(TRACE, 16), int(SPAN, 16), is_remote=False, trace_flags=trace.TraceFlags(1)
    )
    try:
        with trace.use_span(trace.NonRecordingSpan(context)):
            traced = engine.connect()
        untraced = engine.connect()
        doc = snapshot.process_snapshot(600.0)  # live for 30 min: long enough for Chromium
        traced.close()
        untraced.close()
    finally:
        monitor.uninstrument(engine)
        engine.dispose()
    doc["pools"] = [p for p in doc["pools"] if p["pool"] == "traced-pool"]
    out = tmp_path / "snapshots"
    out.mkdir()
    yield doc, out


def write_documents(doc: dict[str, Any], directory: Path, hostile_trace_id: str) -> None:
    """The real document, and a copy as if from another live process, its holds' sites
    `hostile.py` and trace ids `hostile_trace_id`."""
    (directory / snapshot.file_name(doc["process"])).write_text(json.dumps(doc))
    other = copy.deepcopy(doc)
    other["process"] = {
        k: v for k, v in other["process"].items() if k not in ("start_token", "pid_ns")
    }
    other["process"].update(hostname="hostile", pid=4_000_000)
    for pool in other["pools"]:
        for hold in pool["holds"]:
            hold.update(site="hostile.py:1:attack", trace_id=hostile_trace_id)
    (directory / snapshot.file_name({**other["process"], "start_token": "1"})).write_text(
        json.dumps(other)
    )


async def _checkouts(directory: Path, template: str | None) -> tuple[list[Any], dict[str, Any]]:
    cfg = SidecarConfig(
        snapshot_dir=str(directory), listen_host="127.0.0.1", trace_url_template=template
    )
    sidecar = Sidecar(cfg)
    sidecar.scan()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(create_app(sidecar, manage=False)),
        base_url="http://127.0.0.1",
    ) as http:
        response = await http.get("/api/checkouts")
        assert response.status_code == 200, response.text
        rows = response.json()
        cached = (await http.get("/api/checkouts?server=cached")).json()
        pools = (await http.get("/api/pools")).json()
    assert [_trace_fields(r) for r in cached] == [_trace_fields(r) for r in rows]
    return rows, pools


async def test_api_rows_from_a_real_document(
    documents: tuple[dict[str, Any], Path],
) -> None:
    doc, directory = documents
    holds = doc["pools"][0]["holds"]
    assert [(h.get("trace_id"), h.get("span_id")) for h in holds] == [(TRACE, SPAN), (None, None)]
    (directory / snapshot.file_name(doc["process"])).write_text(json.dumps(doc))
    rows, _ = await _checkouts(directory, None)
    assert [_trace_fields(r) for r in rows] == [(TRACE, SPAN, None), (None, None, None)]
    rows, _ = await _checkouts(directory, TEMPO)
    assert [_trace_fields(r) for r in rows] == [
        (TRACE, SPAN, f"https://tempo.example/trace/{TRACE}"),
        (None, None, None),
    ]


async def test_a_document_with_a_hostile_trace_id_is_rejected_whole(
    documents: tuple[dict[str, Any], Path],
) -> None:
    doc, directory = documents
    write_documents(doc, directory, "1" * 32)  # the control: the copy is a live process
    rows, pools = await _checkouts(directory, TEMPO)
    assert sorted(r["site"].split(":")[0] for r in rows).count("hostile.py") == 2
    assert pools["snapshot_errors"]["invalid"] == 0
    for hostile in ("<script>alert(1)</script>", "<script>", TRACE.upper(), TRACE + "0"):
        for path in directory.iterdir():
            path.unlink()
        write_documents(doc, directory, hostile)
        rows, pools = await _checkouts(directory, TEMPO)
        assert pools["snapshot_errors"]["invalid"] == 1, hostile
        assert [(r["site"].split(":")[0], *_trace_fields(r)) for r in rows] == [
            ("tests/test_sidecar_traces.py", TRACE, SPAN, f"https://tempo.example/trace/{TRACE}"),
            ("tests/test_sidecar_traces.py", None, None, None),
        ], hostile


# -- the live page in Chromium ------------------------------------------------------------
class TraceCells(HTMLParser):
    """Per holds-table row: its site, and its trace cell's element (tag and attributes,
    text), or None for an empty cell."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and (a.get("class") or "").startswith("hold"):
            self.rows.append({"site": "", "trace": None})
        elif tag == "td" and self.rows and a.get("class") in ("site", "trace"):
            self._in = a["class"]
        elif self._in == "trace" and tag in ("a", "span"):
            self.rows[-1]["trace"] = {"tag": tag, **a, "text": ""}

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "site":
            self.rows[-1]["site"] += data
        elif self._in == "trace":
            element = self.rows[-1]["trace"]
            if element is None:
                self.rows[-1]["trace"] = {"tag": "#text", "text": data}
            else:
                element["text"] += data


def _page(directory: Path, template: str | None, profile: Path) -> tuple[str, list[Any]]:
    """Run the real `pool-monitor sidecar` on `directory`; the page's DOM in Chromium."""
    port = free_port()
    log = directory.parent / f"sidecar-{port}.log"
    command = [sys.executable, "-m", "monitor.cli", "sidecar", "--snapshot-dir", str(directory)]
    command += ["--listen", f"127.0.0.1:{port}", "--page-refresh", "0.5"]
    if template is not None:
        command += ["--trace-url-template", template]
    log_file = open(log, "wb")  # noqa: SIM115 - the process writes it until the end
    sidecar = subprocess.Popen(command, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5)
    try:

        def listed() -> bool:
            assert sidecar.poll() is None, log.read_text()
            try:
                return len(http.get("/api/checkouts").json()) == 2
            except httpx.TransportError:
                return False

        wait_for(listed, 30, "the sidecar listing the two holds")
        dom = chromium_dom(f"http://127.0.0.1:{port}/", profile)
    finally:
        sidecar.terminate()
        try:
            sidecar.wait(10)
        except subprocess.TimeoutExpired:
            sidecar.kill()
            sidecar.wait(10)
        http.close()
        log_file.close()
    cells = TraceCells()
    cells.feed(dom)
    return dom, cells.rows


def test_live_page_links_the_trace_and_shows_nothing_hostile(
    documents: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    doc, directory = documents
    write_documents(doc, directory, "<script>alert(1)</script>")
    began = time.monotonic()
    dom, rows = _page(directory, GRAFANA, tmp_path / "profile")
    expected = config.trace_url(GRAFANA, TRACE, SPAN)
    assert [r["trace"] for r in rows] == [
        {
            "tag": "a",
            "href": expected,
            "target": "_blank",
            "rel": "noopener noreferrer",
            "title": TRACE,
            "text": TRACE[:8],
        },
        None,  # no trace: nothing at all, not even a dash
    ]
    assert all(r["site"].startswith("tests/test_sidecar_traces.py:") for r in rows)
    # the hostile document was rejected whole: none of it reached the page
    assert "hostile" not in dom and "alert(1)" not in dom and "<script>alert" not in dom
    assert "1 bad snapshot files" in dom
    assert 'data-key="trace_id">trace</th>' in dom
    print(f"\n[traces] page checked in {time.monotonic() - began:.1f} s")


def test_live_page_without_a_template_shows_the_id_unlinked(
    documents: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    doc, directory = documents
    (directory / snapshot.file_name(doc["process"])).write_text(json.dumps(doc))
    dom, rows = _page(directory, None, tmp_path / "profile")
    assert [r["trace"] for r in rows] == [
        {"tag": "span", "title": TRACE, "text": TRACE[:8]},
        None,
    ]
    assert "<a " not in dom.split('id="holds"', 1)[1]


def test_the_page_never_parses_data_as_html() -> None:
    """The page builds its DOM with textContent and setAttribute only: no HTML parsing
    of anything, so no hold field (trace ids included) can become markup."""
    source = (ROOT / "monitor" / "sidecar" / "static" / "live.js").read_text(encoding="utf-8")
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in source, sink
