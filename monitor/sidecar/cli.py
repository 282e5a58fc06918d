"""`pool-monitor sidecar`: parse options, start the threads, serve with uvicorn."""

from __future__ import annotations

import logging
import os
import sys
from urllib.parse import urlsplit

from monitor.config import ConfigError
from monitor.sidecar.auth import TokenError, is_loopback
from monitor.sidecar.config import SidecarConfig, parse
from monitor.sidecar.postgres import describe_dsn

log = logging.getLogger("monitor.sidecar")


def _describe(config: SidecarConfig) -> None:
    if config.snapshot_dir is None:
        log.warning("no --snapshot-dir: serving PostgreSQL's side only")
    elif not os.path.isdir(config.snapshot_dir):
        log.warning(
            "snapshot directory %s does not exist (yet); /readyz answers 503 until it does",
            config.snapshot_dir,
        )
    if config.postgres_dsn is None:
        log.info(
            "no PostgreSQL DSN (--postgres-dsn, --postgres-dsn-file or "
            "POOL_MONITOR_POSTGRES_DSN): no pg_* series"
        )
    else:
        log.info(
            "polling PostgreSQL every %g s at %s",
            config.postgres_interval,
            describe_dsn(config.postgres_dsn),
        )
    if config.trace_url_template is not None:  # (its host only: a URL may hold credentials)
        log.info(
            "linking holds' trace ids to %s",
            urlsplit(config.trace_url_template).hostname,
        )
    if (
        config.auth_token_file is None
        and not is_loopback(config.listen_host)
        and not config.insecure_api
    ):
        log.warning(
            "no --auth-token-file on non-loopback %s: /api/* and / answer 403 "
            "(/metrics, /healthz, /readyz stay open)",
            config.listen_host,
        )


def main(argv: list[str] | None = None) -> int:
    """Run the sidecar until SIGINT/SIGTERM; 2 on a configuration error."""
    args = sys.argv[1:] if argv is None else argv
    try:
        config = parse(args)
    except ConfigError as exc:
        print(f"pool-monitor sidecar: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        import uvicorn

        from monitor.sidecar.app import create_app
        from monitor.sidecar.runtime import Sidecar
    except ImportError as exc:
        print(
            f"pool-monitor sidecar: {exc}; install the extra: pip install 'pool-monitor[sidecar]'",
            file=sys.stderr,
        )
        return 2
    try:
        sidecar = Sidecar(config)
    except TokenError as exc:
        print(f"pool-monitor sidecar: {exc}", file=sys.stderr)
        return 2
    _describe(config)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(sidecar),
            host=config.listen_host,
            port=config.listen_port,
            log_level=config.log_level.lower(),
            access_log=False,
            lifespan="on",
            log_config=None,  # keep the root handler set up above: one log format
        )
    )
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
