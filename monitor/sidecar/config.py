"""`pool-monitor sidecar` options, validated before anything starts.

A typo in a Helm value should fail the container at start with a message naming the
option, not leave a sidecar that quietly serves nothing.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from monitor.config import ConfigError
from monitor.sidecar import files, postgres, sqltext

DSN_ENV = "POOL_MONITOR_POSTGRES_DSN"
TRACE_URL_ENV = "POOL_MONITOR_TRACE_URL_TEMPLATE"
DEFAULT_LISTEN = "0.0.0.0:9187"

#: A placeholder of `--trace-url-template`: `{` and `}` around anything but braces, quotes
#: and white space. So `{trace_id}` is one, and so are `{traceId}` or `{0}` (refused), but
#: the JSON of a Grafana Explore URL (`left={"datasource":…}`) is text, kept as it is.
PLACEHOLDER = re.compile(r"\{([^{}\"'\s]*)\}")
TRACE_PLACEHOLDERS = ("trace_id", "span_id")
#: What a template may be (checked with the placeholders filled with ids of this shape).
_SAMPLE_IDS = {"trace_id": "0" * 32, "span_id": "0" * 16}
_CONTROL = re.compile(r"[\x00-\x20\x7f]")


@dataclass(frozen=True)
class SidecarConfig:
    snapshot_dir: str | None = None
    postgres_dsn: str | None = None
    postgres_interval: float = 5.0
    listen_host: str = "0.0.0.0"
    listen_port: int = 9187
    auth_token_file: str | None = None
    insecure_api: bool = False
    show_query_text: bool = False
    query_text_limit: int = sqltext.DEFAULT_LIMIT
    scan_interval: float = 1.0
    live_scan_interval: float = 0.2
    max_snapshot_bytes: int = files.MAX_BYTES
    retain_dead_s: float = 600.0
    page_refresh_s: float = 2.0
    #: `https://…/{trace_id}…`: link each hold's trace id (None: ids shown, not linked)
    trace_url_template: str | None = None
    #: Sizing advice (`/api/advice`): the window it is computed over, and its target.
    advice_window_s: float = 300.0
    advice_target_p_wait: float = 0.01
    advice_target_wait_s: float = 0.005
    log_level: str = "INFO"


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT`, `[v6]:PORT` or `:PORT` (all interfaces)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--listen must be HOST:PORT with a port from 1 to 65535, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def trace_url(template: str, trace_id: str, span_id: str | None) -> str:
    """`template` (a checked `--trace-url-template`) with the ids put in, URL-quoted (they
    are lowercase hex: quoting changes nothing, but nothing reaches the URL unquoted).
    A template naming `{span_id}` for a hold without one gets an empty string there."""
    ids = {"trace_id": trace_id, "span_id": span_id or ""}
    return PLACEHOLDER.sub(lambda m: quote(ids[m[1]], safe=""), template)


def check_trace_url_template(template: str, name: str = "--trace-url-template") -> str:
    """The template if it is an absolute http(s) URL with `{trace_id}` and no placeholder
    but `{trace_id}` and `{span_id}`; else `ConfigError` naming `name` and the problem.
    The template itself is not quoted in the message: a URL may hold credentials."""
    if _CONTROL.search(template):
        raise ConfigError(
            f"{name} must not contain spaces or control characters (percent-encode them)"
        )
    unknown = [m[0] for m in PLACEHOLDER.finditer(template) if m[1] not in TRACE_PLACEHOLDERS]
    if unknown:
        raise ConfigError(
            f"{name} has an unknown placeholder {unknown[0]}: only {{trace_id}} and "
            "{span_id} are replaced"
        )
    if not any(m[1] == "trace_id" for m in PLACEHOLDER.finditer(template)):
        raise ConfigError(f"{name} must contain the placeholder {{trace_id}}")
    try:
        url = urlsplit(PLACEHOLDER.sub(lambda m: _SAMPLE_IDS[m[1]], template))
        host = url.hostname
    except ValueError as exc:
        raise ConfigError(f"{name} is not a valid URL: {exc}") from None
    if url.scheme not in ("http", "https"):
        got = f"{url.scheme}:" if url.scheme else "no scheme"
        raise ConfigError(f"{name} must be an http:// or https:// URL, got {got}")
    if not host:
        raise ConfigError(f"{name} must be an absolute URL with a host (https://host/...)")
    return template


def _trace_url_template(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    """The option, else `$POOL_MONITOR_TRACE_URL_TEMPLATE`; empty means none."""
    if args.trace_url_template is not None:
        value, name = args.trace_url_template, "--trace-url-template"
    else:
        value = environ.get(TRACE_URL_ENV, "")
        name = f"--trace-url-template (from ${TRACE_URL_ENV})"
    value = value.strip()
    return check_trace_url_template(value, name) if value else None


def _positive(name: str, value: float, low: float, high: float) -> float:
    if not low <= value <= high:
        raise ConfigError(f"{name} must be from {low:g} to {high:g}, got {value:g}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pool-monitor sidecar",
        description="Serve every worker process's pools (from their snapshot files) and "
        "PostgreSQL's view of them: /metrics, /api/pools, /api/checkouts, a live page at /.",
    )
    p.add_argument(
        "--snapshot-dir",
        help="directory the workers write snapshots into "
        "(POOL_MONITOR_SNAPSHOT_DIR in the app); mount it read-only here",
    )
    p.add_argument(
        "--postgres-dsn",
        help=f"libpq DSN/URL to poll pg_stat_activity (also "
        f"${DSN_ENV}; prefer that or --postgres-dsn-file: arguments show in ps)",
    )
    p.add_argument("--postgres-dsn-file", help="file holding the DSN (a mounted Secret)")
    p.add_argument(
        "--postgres-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="seconds between PostgreSQL polls (default 5)",
    )
    p.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"address to serve on (default {DEFAULT_LISTEN})",
    )
    p.add_argument("--auth-token-file", help="file holding the bearer token /api/* and / require")
    p.add_argument(
        "--insecure-api",
        action="store_true",
        help="serve /api/* and / without a token on a non-loopback listener",
    )
    p.add_argument(
        "--show-query-text",
        action="store_true",
        help="include each backend's query text in /api/checkouts (literals masked, truncated)",
    )
    p.add_argument(
        "--query-text-limit",
        type=int,
        default=sqltext.DEFAULT_LIMIT,
        metavar="CHARS",
        help="truncate query text to this many characters",
    )
    p.add_argument(
        "--scan-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between scans of the snapshot directory (default 1)",
    )
    p.add_argument(
        "--live-scan-interval",
        type=float,
        default=0.2,
        metavar="SECONDS",
        help="seconds between reads of the workers' small live-hold documents (default "
        "0.2): with the workers' 0.1 s check, an ended hold leaves /api/checkouts within "
        "about 0.3 s",
    )
    p.add_argument(
        "--max-snapshot-bytes",
        type=int,
        default=files.MAX_BYTES,
        help="larger snapshot files are skipped and counted as oversized",
    )
    p.add_argument(
        "--retain-dead",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="keep an exited worker's document this long before compacting it "
        "into the retained totals (default 600)",
    )
    p.add_argument(
        "--page-refresh",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how often the live page refreshes its pools and the holds' server columns "
        "(default 2; the holds list itself follows /api/checkouts every 0.1 s)",
    )
    p.add_argument(
        "--trace-url-template",
        metavar="URL",
        help=f"link each hold's OpenTelemetry trace id on the live page and in "
        f"/api/checkouts (trace_url): an http(s) URL with {{trace_id}} and optionally "
        f"{{span_id}}, e.g. https://tempo.example/trace/{{trace_id}} (also "
        f"${TRACE_URL_ENV}; default: ids shown, not linked)",
    )
    p.add_argument(
        "--advice-window",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="sizing advice (/api/advice, pool_monitor_advice_*) is computed over the last "
        "this many seconds of merged counts (default 300)",
    )
    p.add_argument(
        "--advice-target-p-wait",
        type=float,
        default=0.01,
        metavar="SHARE",
        help="the recommended pool size keeps the probability that a checkout waits below "
        "this (default 0.01)",
    )
    p.add_argument(
        "--advice-target-wait-ms",
        type=float,
        default=5.0,
        metavar="MS",
        help="and the mean wait per checkout below this many milliseconds (default 5)",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def _read_dsn_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            dsn = f.read().strip()
    except OSError as exc:
        raise ConfigError(
            f"cannot read --postgres-dsn-file {path}: {exc.strerror or exc}"
        ) from None
    if not dsn:
        raise ConfigError(f"--postgres-dsn-file {path} is empty")
    return dsn


def _dsn_and_source(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[str | None, str]:
    """The DSN and where it came from (the option, file or variable: never its value)."""
    if args.postgres_dsn and args.postgres_dsn_file:
        raise ConfigError("give --postgres-dsn or --postgres-dsn-file, not both")
    if args.postgres_dsn:
        return args.postgres_dsn, "--postgres-dsn"
    if args.postgres_dsn_file:
        path = args.postgres_dsn_file
        return _read_dsn_file(path), f"--postgres-dsn-file {path}"
    return environ.get(DSN_ENV) or None, f"${DSN_ENV}"


def _check_dsn(dsn: str, source: str) -> None:
    """Fail at start on a DSN that does not parse (libpq's parser, via psycopg), naming
    its source only: the message goes to logs, and a mistyped DSN holds its password."""
    try:
        postgres.parse_dsn(dsn)
    except postgres.DsnError as exc:
        raise ConfigError(f"PostgreSQL DSN (from {source}) {exc}") from None
    except ImportError:
        raise ConfigError(
            f"PostgreSQL DSN (from {source}) cannot be checked: psycopg is not installed; "
            "install it: pip install 'pglast>=7,<9' (GPL-3.0-or-later, hence not in the "
            "sidecar extra)"
        ) from None


def parse(argv: list[str], environ: Mapping[str, str] | None = None) -> SidecarConfig:
    """Arguments (and `POOL_MONITOR_POSTGRES_DSN`, `POOL_MONITOR_TRACE_URL_TEMPLATE`) to a
    validated config; `ConfigError` on a bad value (argparse itself exits with status 2 on
    unknown options)."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    dsn, source = _dsn_and_source(args, environ)
    if dsn is not None:
        _check_dsn(dsn, source)
    if args.show_query_text and not sqltext.available():
        raise ConfigError(
            "--show-query-text needs pglast (PostgreSQL's SQL scanner, to mask literals); "
            "install it: pip install 'pglast>=7,<9' (GPL-3.0-or-later, hence not in the "
            "sidecar extra)"
        )
    host, port = parse_listen(args.listen)
    if args.query_text_limit < 8 or args.query_text_limit > 10000:
        raise ConfigError(
            f"--query-text-limit must be from 8 to 10000, got {args.query_text_limit}"
        )
    if args.max_snapshot_bytes < 1024:
        raise ConfigError(
            f"--max-snapshot-bytes must be at least 1024, got {args.max_snapshot_bytes}"
        )
    return SidecarConfig(
        snapshot_dir=args.snapshot_dir,
        postgres_dsn=dsn,
        postgres_interval=_positive("--postgres-interval", args.postgres_interval, 0.05, 3600),
        listen_host=host,
        listen_port=port,
        auth_token_file=args.auth_token_file,
        insecure_api=args.insecure_api,
        show_query_text=args.show_query_text,
        query_text_limit=args.query_text_limit,
        scan_interval=_positive("--scan-interval", args.scan_interval, 0.05, 60),
        live_scan_interval=_positive("--live-scan-interval", args.live_scan_interval, 0.02, 60),
        max_snapshot_bytes=args.max_snapshot_bytes,
        retain_dead_s=_positive("--retain-dead", args.retain_dead, 0, 86400 * 7),
        page_refresh_s=_positive("--page-refresh", args.page_refresh, 0.2, 3600),
        trace_url_template=_trace_url_template(args, environ),
        advice_window_s=_positive("--advice-window", args.advice_window, 10, 86_400),
        advice_target_p_wait=_positive(
            "--advice-target-p-wait", args.advice_target_p_wait, 0.0001, 0.5
        ),
        advice_target_wait_s=_positive(
            "--advice-target-wait-ms", args.advice_target_wait_ms, 0.01, 60_000
        )
        / 1000.0,
        log_level=args.log_level,
    )
