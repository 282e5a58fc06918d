"""Who may read the API and the page.

The JSON API and the page show code sites, thread names and (with `--show-query-text`)
statement shapes: more than a metrics endpoint. So, per the issue:

- with `--auth-token-file`: `/api/*` and `/` need `Authorization: Bearer <token>` (or the
  cookie a browser gets from the page's token form: a browser cannot send a header on
  navigation, and a token in the URL would end up in logs and history). The cookie never
  holds the token: it holds HMAC-SHA256(key=token, "pool-monitor page cookie v1"), which
  cannot be turned back into the token (so a leaked cookie store or a proxy's log does
  not leak the bearer token) and stops matching when the token is rotated. It is
  `HttpOnly` and `SameSite=Strict` (and `Secure` behind https). The Host header is not
  checked: the token is the protection, and a DNS-rebinding page cannot present it;
- without a token, on a loopback listener: open (it is your own machine or a
  `kubectl port-forward`), but only to requests whose Host header names a loopback host
  (`localhost`, `*.localhost`, any 127.0.0.0/8 address, `[::1]`, with or without a
  port): otherwise a web page on evil.example that re-resolves its name to 127.0.0.1
  (DNS rebinding) could read the API from the victim's browser. Other Hosts get 403.
  `*.localhost` is accepted because RFC 6761 reserves it for loopback and browsers never
  ask DNS for it, so no outside page can have such an origin. A request with no Host
  header at all (HTTP/1.0) is allowed: browsers always send Host, so it is not a
  rebinding request, and a local client that can reach the port could send any Host;
- without a token, on any other listener: 403 with a message saying how to fix it,
  unless `--insecure-api`, which serves `/api/*` and `/` to anyone who can reach the
  port under any Host (it is explicitly insecure; on a loopback listener it also turns
  off the Host check, e.g. for a name of your own in /etc/hosts);
- `/metrics`, `/healthz`, `/readyz` are always open, for any Host (Prometheus scrapes by
  pod IP, kubelet probes by IP).

The token file is re-read when it changes (checked at most every 5 s), so a rotated
Kubernetes Secret takes effect without a restart, and cookies derived from the old token
stop working with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import os
import threading
import time

COOKIE = "pool_monitor_token"  # kept so a login overwrites a stale raw-token cookie
_COOKIE_MESSAGE = b"pool-monitor page cookie v1"
_RECHECK_S = 5.0
_LOOPBACK_NAMES = ("localhost", "ip6-localhost", "ip6-loopback")


class TokenError(ValueError):
    """The token file is missing or empty."""


def read_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise TokenError(f"cannot read --auth-token-file {path}: {exc.strerror or exc}") from None
    if not token:
        raise TokenError(f"--auth-token-file {path} is empty")
    return token


def cookie_value(token: str) -> str:
    """The page cookie for `token`: an HMAC, so the cookie never carries the token itself
    and a rotated token invalidates every cookie made from the old one."""
    return hmac.new(token.encode(), _COOKIE_MESSAGE, hashlib.sha256).hexdigest()


def is_loopback(host: str) -> bool:
    """Whether a listen address (or a Host header's host part) is loopback-only."""
    if host in _LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def split_host(header: str) -> tuple[str, str | None] | None:
    """A Host header as (host, port), host lower-cased without a trailing dot or the
    brackets of an IPv6 literal; None when it is malformed (then it is not trusted)."""
    header = header.strip().lower()
    port: str | None
    if header.startswith("["):
        host, sep, rest = header[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
    else:
        host, sep, port = header.rpartition(":")
        if not sep:
            host, port = header, None
        if ":" in host:  # an IPv6 literal must be bracketed
            return None
    if port is not None and not (port.isdigit() and len(port) <= 5):
        return None
    return host.removesuffix("."), port


def host_is_loopback(header: str) -> bool:
    """Whether a Host header names this machine by a name no outside page can own:
    `localhost`, `*.localhost` (RFC 6761), or a loopback address, with any port."""
    parts = split_host(header)
    if parts is None or not parts[0]:
        return False
    host = parts[0]
    return (host.endswith(".localhost") and host != ".localhost") or is_loopback(host)


def _host_refusal(header: str) -> tuple[int, str]:
    """The 403 for a rebinding-shaped request, saying which URL works instead."""
    parts = split_host(header)
    port = f":{parts[1]}" if parts and parts[1] else ""
    shown = header if len(header) <= 100 else header[:100] + "…"
    return 403, (
        f"the Host header names a non-loopback host ({shown!r}): without a token this "
        "sidecar serves /api/* and the page only to loopback names, against DNS "
        f"rebinding; open it as http://127.0.0.1{port}/ (or http://localhost{port}/), "
        "or configure --auth-token-file"
    )


class Access:
    """Decides, per request, whether the protected routes may answer."""

    def __init__(self, token_file: str | None, listen_host: str, insecure_api: bool) -> None:
        self.token_file = token_file
        self.listen_host = listen_host
        self.insecure_api = insecure_api
        self._token = read_token(token_file) if token_file else None
        self._mtime = self._stat()
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    @property
    def token_required(self) -> bool:
        return self.token_file is not None

    def _stat(self) -> float | None:
        try:
            return os.stat(self.token_file).st_mtime if self.token_file else None
        except OSError:
            return None

    def _current_token(self) -> str | None:
        if self.token_file is None:
            return None
        now = time.monotonic()
        if now - self._checked >= _RECHECK_S:
            with self._lock:
                self._checked = now
                mtime = self._stat()
                if mtime != self._mtime:
                    self._mtime = mtime
                    # a bad new file keeps the last good token rather than lock all out
                    with contextlib.suppress(TokenError):
                        self._token = read_token(self.token_file)
        return self._token

    def token_ok(self, presented: str | None) -> bool:
        """Whether `presented` is the current token (a Bearer header or the login form)."""
        token = self._current_token()
        if not (token and presented):
            return False
        return hmac.compare_digest(presented.encode(), token.encode())

    def cookie_ok(self, presented: str | None) -> bool:
        """Whether `presented` is the page cookie made from the current token."""
        token = self._current_token()
        if not (token and presented):
            return False
        return hmac.compare_digest(presented.encode(), cookie_value(token).encode())

    def refusal(
        self, authorization: str | None, cookie: str | None, host: str | None
    ) -> tuple[int, str] | None:
        """None if allowed, else (status, message). `host` is the Host header (None when
        the request has none)."""
        if self.token_file is not None:
            presented = None
            if authorization and authorization[:7].lower() == "bearer ":
                presented = authorization[7:].strip()
            if self.token_ok(presented) or self.cookie_ok(cookie):
                return None
            return 401, (
                "a bearer token is required: send 'Authorization: Bearer <token>' "
                "(the token is in the sidecar's --auth-token-file)"
            )
        if self.insecure_api:
            return None
        if is_loopback(self.listen_host):
            if not host or host_is_loopback(host):
                return None
            return _host_refusal(host)
        return 403, (
            f"the sidecar listens on {self.listen_host}, not a loopback address, and "
            "has no --auth-token-file, so /api/* and the page are refused: configure "
            "--auth-token-file, listen on 127.0.0.1 (kubectl port-forward works), or "
            "pass --insecure-api to serve them to anyone who can reach the port"
        )
