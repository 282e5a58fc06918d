"""`pool-monitor`: one command, a subcommand per job. Each subcommand's module is imported
only when used, so `pool-monitor bench` does not need the demo's dependencies."""

from __future__ import annotations

import sys
from collections.abc import Callable

USAGE = """usage: pool-monitor COMMAND [ARGS]

commands:
  demo        run the demo: embedded PostgreSQL, service, sidecar, load, report
  sidecar     serve every worker's pools and PostgreSQL's view on /metrics
  bench       measure instrumentation cost per checkout cycle
  bench-live  measure what the live-hold document costs a worker (CPU % of one core)
  dashboards  regenerate the Grafana dashboards JSON

`pool-monitor COMMAND --help` for a command's options."""


def _demo(argv: list[str]) -> int:
    from demo_app.runner import main

    return main(argv)


def _sidecar(argv: list[str]) -> int:
    from monitor.sidecar.cli import main

    return main(argv)


def _bench(argv: list[str]) -> int:
    from monitor.bench import main

    return main(argv)


def _bench_live(argv: list[str]) -> int:
    from monitor.livebench import main

    return main(argv)


def _dashboards(argv: list[str]) -> int:
    from dashboards.__main__ import main

    return main(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "demo": _demo,
    "sidecar": _sidecar,
    "bench": _bench,
    "bench-live": _bench_live,
    "dashboards": _dashboards,
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"pool-monitor: unknown command {args[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return command(args[1:])


if __name__ == "__main__":
    sys.exit(main())
