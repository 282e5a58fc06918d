"""Who may read the API and the page.

The JSON API and the page show code sites, thread names and (with `--show-query-text`)
statement shapes: more than a metrics endpoint. So, per the issue:

- with `--auth-token-file`: `/api/*` and `/` need `Authorization: Bearer <token>` (or the
  cookie a browser gets from the page's token form: a browser cannot send a header on
  navigation, and a token in the URL would end up in logs and history);
- without a token, on a loopback listener: open (it is your own machine or a
  `kubectl port-forward`);
- without a token, on any other listener: 403 with a message saying how to fix it,
  unless `--insecure-api`;
- `/metrics`, `/healthz`, `/readyz` are always open (Prometheus and kubelet).

The token file is re-read when it changes (checked at most every 5 s), so a rotated
Kubernetes Secret takes effect without a restart.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import os
import threading
import time

COOKIE = "pool_monitor_token"
_RECHECK_S = 5.0


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


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
        token = self._current_token()
        return bool(token and presented) and hmac.compare_digest(presented.encode(), token.encode())  # type: ignore[union-attr]

    def refusal(self, authorization: str | None, cookie: str | None) -> tuple[int, str] | None:
        """None if allowed, else (status, message)."""
        if self.token_file is not None:
            presented = None
            if authorization and authorization[:7].lower() == "bearer ":
                presented = authorization[7:].strip()
            if self.token_ok(presented) or self.token_ok(cookie):
                return None
            return 401, (
                "a bearer token is required: send 'Authorization: Bearer <token>' "
                "(the token is in the sidecar's --auth-token-file)"
            )
        if is_loopback(self.listen_host) or self.insecure_api:
            return None
        return 403, (
            f"the sidecar listens on {self.listen_host}, not a loopback address, and "
            "has no --auth-token-file, so /api/* and the page are refused: configure "
            "--auth-token-file, listen on 127.0.0.1 (kubectl port-forward works), or "
            "pass --insecure-api to serve them to anyone who can reach the port"
        )
