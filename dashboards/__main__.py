"""`python -m dashboards`: regenerate the committed dashboards, rules and thresholds table.

`--check` writes nothing and exits 1 listing the files that differ (for CI and hooks).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dashboards import PACKAGE_DIR, generate
from dashboards.writer import README, expected_files, with_thresholds_table


def stale_files(directory: Path) -> list[str]:
    """Files under `directory` whose content differs from what the generator makes."""
    stale = []
    for rel, text in expected_files().items():
        path = directory / rel
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            stale.append(rel)
    readme = directory / README
    if readme.exists():
        current = readme.read_text(encoding="utf-8")
        if with_thresholds_table(current) != current:
            stale.append(README)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboards", description=__doc__)
    parser.add_argument(
        "--out",
        type=Path,
        default=PACKAGE_DIR,
        help="directory to write json/ and rules/ into (default: %(default)s)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if any generated file is out of date",
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.out)
        for rel in stale:
            print(f"out of date: {args.out / rel}", file=sys.stderr)
        if stale:
            print("run: python -m dashboards", file=sys.stderr)
        return 1 if stale else 0
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
