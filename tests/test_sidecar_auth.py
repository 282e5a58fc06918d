"""The sidecar's access control against hostile requests: DNS rebinding on a loopback
listener (the Host check) and the page cookie (never the raw token, dead on rotation).

The Host rules run against the real `pool-monitor sidecar` process (uvicorn parses the
requests, including one with no Host header at all) and in-process over httpx's ASGI
transport, where the token file's re-check interval can be patched down for rotation.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from monitor.sidecar import auth
from monitor.sidecar.app import create_app
from monitor.sidecar.config import SidecarConfig
from monitor.sidecar.runtime import Sidecar
from tests.test_sidecar_e2e import ROOT, free_port, stop_sidecar, wait_for

TOKEN = "rotate-me-0123456789"
PROTECTED = ("/api/pools", "/api/checkouts", "/")
OPEN = ("/metrics", "/healthz", "/readyz")
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


# -- the Host rule itself -----------------------------------------------------------------
@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "localhost:9187",
        "LocalHost:9187",
        "localhost.:9187",
        "app.localhost:9187",
        "127.0.0.1",
        "127.0.0.1:9187",
        "127.8.9.10:80",
        "[::1]",
        "[::1]:9187",
        "[::ffff:127.0.0.1]:9187",
    ],
)
def test_loopback_hosts_are_recognised(host: str) -> None:
    assert auth.host_is_loopback(host)


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:9187",
        "localhost.evil.example",
        "127.0.0.1.nip.io:9187",
        "localhost:",
        "localhost:abc",
        "::1",  # an IPv6 literal must be bracketed in a Host header
        "[::1",
        "[::1]x",
        "10.0.0.5:9187",
        "0.0.0.0:9187",
        "[::]:9187",
        ".localhost",
        "",
    ],
)
def test_other_hosts_are_not(host: str) -> None:
    assert not auth.host_is_loopback(host)


def test_cookie_value_is_an_hmac_of_the_token_not_the_token() -> None:
    value = auth.cookie_value(TOKEN)
    assert TOKEN not in value and len(value) == 64
    assert value == auth.cookie_value(TOKEN) != auth.cookie_value(TOKEN + "x")


# -- in-process --------------------------------------------------------------------------
Client = Callable[..., Any]


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    """`await client(path, host=..., token=..., insecure=..., **kwargs)`: one sidecar per
    call, listening (nominally) on 127.0.0.1; the token file is `tmp_path / "token"`."""
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "snapshots").mkdir()
    clients: list[httpx.AsyncClient] = []
    sidecars: dict[tuple[bool, bool], Sidecar] = {}

    async def request(
        path: str,
        *,
        host: str = "127.0.0.1:9187",
        token: bool = False,
        insecure: bool = False,
        method: str = "GET",
        **kwargs: Any,
    ) -> httpx.Response:
        key = (token, insecure)
        if key not in sidecars:  # one per mode, so a rotation is seen by later requests
            cfg = SidecarConfig(
                snapshot_dir=str(tmp_path / "snapshots"),
                listen_host="127.0.0.1",
                auth_token_file=str(tmp_path / "token") if token else None,
                insecure_api=insecure,
            )
            sidecars[key] = Sidecar(cfg)
            sidecars[key].scan()
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(create_app(sidecars[key], manage=False)),
            base_url=f"http://{host}",
        )
        clients.append(http)
        return await http.request(method, path, **kwargs)

    yield request
    for http in clients:
        await http.aclose()


async def test_loopback_without_token_refuses_a_foreign_host(client: Client) -> None:
    for path in PROTECTED:
        refused = await client(path, host="evil.example:9187")
        assert refused.status_code == 403, path
        assert "the Host header names a non-loopback host" in refused.text
        assert "http://127.0.0.1:9187/" in refused.text and "--auth-token-file" in refused.text
        for host in ("127.0.0.1:9187", "localhost:9187", "[::1]:9187", "app.localhost"):
            assert (await client(path, host=host)).status_code == 200, (path, host)
    page = await client("/", host="evil.example")
    assert "<form" not in page.text  # no token to type: the message says what to do


async def test_metrics_and_health_stay_open_for_any_host(client: Client) -> None:
    for path in OPEN:
        assert (await client(path, host="10.1.2.3:9187")).status_code == 200, path
        assert (await client(path, host="evil.example")).status_code == 200, path


async def test_insecure_api_serves_any_host(client: Client) -> None:
    for path in PROTECTED:
        assert (await client(path, host="evil.example", insecure=True)).status_code == 200


async def test_with_a_token_the_host_is_not_checked(client: Client) -> None:
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for path in PROTECTED:
        assert (await client(path, host="evil.example", token=True)).status_code == 401
        ok = await client(path, host="pool-monitor.svc:9187", token=True, headers=bearer)
        assert ok.status_code == 200, path


async def _login(client: Client, token: str) -> httpx.Response:
    return await client("/login", token=True, method="POST", content=f"token={token}", headers=FORM)


def _cookie(response: httpx.Response) -> str:
    (set_cookie,) = response.headers.get_list("set-cookie")
    return set_cookie


async def test_login_cookie_is_derived_from_the_token_and_locked_down(client: Client) -> None:
    good = await _login(client, TOKEN)
    assert good.status_code == 303
    set_cookie = _cookie(good)
    assert TOKEN not in set_cookie
    attributes = [part.strip().lower() for part in set_cookie.split(";")]
    assert "httponly" in attributes and "samesite=strict" in attributes and "path=/" in attributes
    name, value = attributes[0].split("=", 1)
    assert name == auth.COOKIE and value == auth.cookie_value(TOKEN)
    jar = {"Cookie": f"{auth.COOKIE}={value}"}
    for path in PROTECTED:
        assert (await client(path, token=True, headers=jar)).status_code == 200, path
    raw = {"Cookie": f"{auth.COOKIE}={TOKEN}"}  # what the cookie used to hold: no longer
    for path in PROTECTED:
        assert (await client(path, token=True, headers=raw)).status_code == 401, path
    bad = await _login(client, "nope")
    assert bad.status_code == 401 and "set-cookie" not in bad.headers


async def test_rotating_the_token_kills_old_cookies_and_bearers(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "_RECHECK_S", 0.0)
    old_jar = {"Cookie": f"{auth.COOKIE}={auth.cookie_value(TOKEN)}"}
    assert (await client("/api/pools", token=True, headers=old_jar)).status_code == 200
    token_file = tmp_path / "token"
    token_file.write_text("the-new-token\n")
    stat = token_file.stat()
    os.utime(token_file, (stat.st_atime, stat.st_mtime + 10))  # a visible change
    for path in PROTECTED:
        assert (await client(path, token=True, headers=old_jar)).status_code == 401, path
        old_bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert (await client(path, token=True, headers=old_bearer)).status_code == 401, path
    assert (await _login(client, TOKEN)).status_code == 401
    new = await _login(client, "the-new-token")
    value = _cookie(new).split(";")[0].split("=", 1)[1]
    assert value == auth.cookie_value("the-new-token") and "the-new-token" not in value
    jar = {"Cookie": f"{auth.COOKIE}={value}"}
    assert (await client("/api/pools", token=True, headers=jar)).status_code == 200


# -- the real process ----------------------------------------------------------------------
@dataclass
class Real:
    port: int
    http: httpx.Client
    token_file: Path


def _serve(token: bool) -> Iterator[Real]:
    """`pool-monitor sidecar` on 127.0.0.1 (with a token file when `token`), healthy."""
    tmp = Path(tempfile.mkdtemp(prefix="pool-monitor-auth-"))
    (tmp / "snapshots").mkdir()
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    command = [sys.executable, "-m", "monitor.cli", "sidecar", "--snapshot-dir"]
    command += [str(tmp / "snapshots"), "--listen", f"127.0.0.1:{port}"]
    if token:
        command += ["--auth-token-file", str(token_file)]
    log = tmp / "sidecar.log"
    log_file = open(log, "wb")  # noqa: SIM115 - the process writes it until the end
    proc = subprocess.Popen(command, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5)
    try:

        def ready() -> bool:
            try:
                return http.get("/readyz").status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, log.read_text()
                return False

        wait_for(ready, 30, "the sidecar's /readyz")
        yield Real(port, http, token_file)
    finally:
        stop_sidecar(proc, http, log_file, tmp)


@pytest.fixture
def open_sidecar() -> Iterator[Real]:
    yield from _serve(token=False)


@pytest.fixture
def token_sidecar() -> Iterator[Real]:
    yield from _serve(token=True)


def _raw_get(port: int, request: bytes) -> bytes:
    """A request exactly as given (httpx always adds a Host header)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_real_sidecar_refuses_rebinding_hosts_but_not_port_forward(open_sidecar: Real) -> None:
    http, port = open_sidecar.http, open_sidecar.port
    for path in PROTECTED:
        refused = http.get(path, headers={"Host": "evil.example"})
        assert refused.status_code == 403, path
        assert "the Host header names a non-loopback host" in refused.text
        refused = http.get(path, headers={"Host": f"evil.example:{port}"})
        assert f"http://127.0.0.1:{port}/" in refused.text
        # what a browser sends through `kubectl port-forward` or on this machine
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost"):
            assert http.get(path, headers={"Host": host}).status_code == 200, (path, host)
    for path in OPEN:  # Prometheus scrapes by pod IP, kubelet probes by IP
        for host in ("evil.example", f"10.1.2.3:{port}"):
            assert http.get(path, headers={"Host": host}).status_code == 200, (path, host)
    # HTTP/1.0 without Host: not a browser, so not a rebinding request: served
    reply = _raw_get(port, b"GET /api/pools HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    reply = _raw_get(port, b"GET /api/pools HTTP/1.0\r\nHost: evil.example\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 403"), reply[:200]


def test_real_sidecar_cookie_is_not_the_token(token_sidecar: Real) -> None:
    http = token_sidecar.http
    assert http.get("/api/pools").status_code == 401
    login = http.post("/login", content=f"token={TOKEN}", headers=FORM)
    assert login.status_code == 303
    for set_cookie in login.headers.get_list("set-cookie"):
        assert TOKEN not in set_cookie
        attributes = [part.strip().lower() for part in set_cookie.split(";")]
        assert "httponly" in attributes and "samesite=strict" in attributes
    value = http.cookies[auth.COOKIE]
    assert value == auth.cookie_value(TOKEN)
    for path in PROTECTED:  # the client's jar now carries the cookie; any Host will do
        assert http.get(path).status_code == 200, path
        assert http.get(path, headers={"Host": "evil.example"}).status_code == 200, path
    http.cookies.clear()
    raw = {"Cookie": f"{auth.COOKIE}={TOKEN}"}
    assert http.get("/api/pools", headers=raw).status_code == 401
