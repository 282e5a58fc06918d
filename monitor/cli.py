"""`pool-monitor`: one command, a subcommand per job. Each subcommand's module is imported
only when used, so `pool-monitor bench` does not need the demo's dependencies.

The top-level parser knows the subcommands (for `--help` and for errors); each subcommand's
own parser (`prog="pool-monitor COMMAND"`) reads the rest of the command line, so
`pool-monitor COMMAND --help` is that parser's help."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

#: `demo` and `dashboards` are tools of the repository, not part of the installed package.
REPOSITORY = "https://github.com/pool-monitor/pool-monitor"


@dataclass(frozen=True)
class Command:
    help: str
    #: "module:function": takes the rest of the command line, returns the exit status.
    target: str
    #: What the command needs when its module cannot be imported (one line, no traceback).
    needs: str = ""

    def load(self) -> Callable[[list[str]], int]:
        module, _, function = self.target.partition(":")
        return getattr(importlib.import_module(module), function)

    def __call__(self, argv: list[str]) -> int:
        return self.load()(argv)


COMMANDS: dict[str, Command] = {
    "demo": Command(
        "run the demo: embedded PostgreSQL, service, sidecar, load, report",
        "demo_app.runner:main",
        f"runs from a clone of the repository ({REPOSITORY}) with pip install -e '.[demo]' "
        "(or `make demo`)",
    ),
    "sidecar": Command(
        "serve every worker's pools and PostgreSQL's view on /metrics",
        "monitor.sidecar.cli:main",
        "needs the sidecar extra: pip install 'pool-monitor[sidecar]'",
    ),
    "advise": Command(
        "pool sizing advice (Erlang C) for every pool, from Prometheus",
        "monitor.advise:main",
    ),
    "bench": Command("measure instrumentation cost per checkout cycle", "monitor.bench:main"),
    "bench-live": Command(
        "measure what the live-hold document costs a worker (CPU %% of one core)",
        "monitor.livebench:main",
    ),
    "dashboards": Command(
        "regenerate the Grafana dashboards JSON",
        "dashboards.__main__:main",
        f"runs from a clone of the repository ({REPOSITORY}) with pip install -e '.[dev]' "
        "(or `make dashboards`)",
    ),
}


class _HelpFormatter(argparse.HelpFormatter):
    """Lists the commands as options are listed: no `COMMAND` line above them, same indent."""

    def _iter_indented_subactions(self, action: argparse.Action) -> Iterator[argparse.Action]:
        subactions = getattr(action, "_get_subactions", None)  # the commands; not indented
        yield from subactions() if subactions else ()

    def _format_action(self, action: argparse.Action) -> str:
        text = super()._format_action(action)
        return text.split("\n", 1)[1] if action.nargs == argparse.PARSER else text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pool-monitor",
        formatter_class=_HelpFormatter,
        description="Observability for SQLAlchemy connection pools.",
        epilog="`pool-monitor COMMAND --help` for a command's options.",
    )
    commands = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", required=True
    )
    for name, command in COMMANDS.items():
        # No options here: the subcommand's own parser reads them, --help included.
        commands.add_parser(name, help=command.help, add_help=False)
    return parser


def _load(name: str, command: Command) -> Callable[[list[str]], int] | str:
    """The command's main, or the module missing for it to run here."""
    try:
        main = command.load()
    except ModuleNotFoundError as exc:
        if not command.needs or exc.name is None or exc.name.split(".")[0] == "monitor":
            raise
        return exc.name
    # Imported only when it runs: the embedded PostgreSQL (not needed with DATABASE_URL).
    embedded = name == "demo" and not os.environ.get("DATABASE_URL")
    if embedded and importlib.util.find_spec("pgserver") is None:
        return "pgserver"
    return main


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not args:
        parser.print_help()
        return 2
    name, rest = args[0], args[1:]
    try:
        if not name.startswith("-") and name not in COMMANDS:
            parser.error(f"unknown command {name!r} (choose from {', '.join(COMMANDS)})")
        name = parser.parse_args([name]).command  # -h/--help exit here
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    command = COMMANDS[name]
    run = _load(name, command)
    if isinstance(run, str):
        print(f"pool-monitor {name}: {command.needs}; not importable here: {run}", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
