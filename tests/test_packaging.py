"""The distribution, as a user gets it: the wheel and sdist hold the library (`monitor`) and
nothing of the repository's own tools (demo_app, dashboards, compat, tests), and the wheel,
installed with the `sidecar` extra in a fresh virtualenv, runs the sidecar and says clearly
that `pool-monitor demo` runs from a clone.

The build (`python -m build`: the sdist, then the wheel from the sdist) runs once for this
module, on a copy of the working tree without its caches, virtualenvs and *.egg-info (a stale
SOURCES.txt would leak old files into the sdist; and the tree is left untouched). The wheel
is installed with pip from the configured package index, as a user would install it."""

from __future__ import annotations

import configparser
import email.parser
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs tomli on 3.10")

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
#: The repository's tools: never in the distribution.
TOOLS = ("demo_app", "dashboards", "compat", "tests", "helm")
#: What a fresh clone would not have.
NOT_IN_A_CLONE = shutil.ignore_patterns(
    ".git",
    ".venv*",
    "*.egg-info",
    "__pycache__",
    "*.py[cod]",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    ".compat-cache",
    "build",
    "dist",
    "demo-report",
    ".pgdata",
)
TIMEOUT = 300


@dataclass(frozen=True)
class Dists:
    source: Path  # the copy of the tree that was built
    wheel: Path
    sdist: Path


def _run(command: list[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in command],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        **kwargs,
    )


def _clean_env() -> dict[str, str]:
    """Our environment without what would make the repository importable or pick a venv."""
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "DATABASE_URL", "PYTHONSTARTUP"}
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    try:
        import build  # noqa: F401
    except ModuleNotFoundError:
        message = "`build` is not installed: pip install -e '.[dev]'"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI installs the dev extra")
        pytest.skip(message)
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=NOT_IN_A_CLONE)
    out = tmp / "dist"
    done = _run([sys.executable, "-m", "build", "--outdir", out, source], env=_clean_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return Dists(source, wheel, sdist)


def _wheel_names(dists: Dists) -> list[str]:
    with zipfile.ZipFile(dists.wheel) as wheel:
        return wheel.namelist()


def _metadata(dists: Dists) -> Message:
    with zipfile.ZipFile(dists.wheel) as wheel:
        (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(wheel.read(name).decode())


def _library_files(source: Path) -> set[str]:
    """Every file of the monitor package in the built tree, as a relative POSIX path."""
    return {
        p.relative_to(source).as_posix() for p in (source / "monitor").rglob("*") if p.is_file()
    }


def test_wheel_holds_the_library_only(dists: Dists) -> None:
    names = _wheel_names(dists)
    dist_info = f"pool_monitor-{PROJECT['version']}.dist-info/"
    others = [n for n in names if not n.startswith(("monitor/", dist_info))]
    assert not others, f"the wheel holds more than monitor/: {others}"
    assert not [n for n in names if n.split("/")[0] in TOOLS]
    # Every module, the sidecar's static files, py.typed if there is one; not other files
    # (a README next to the code is for the repository's readers).
    package = {
        n
        for n in _library_files(dists.source)
        if n.endswith(".py") or n.startswith("monitor/sidecar/static/") or n == "monitor/py.typed"
    }
    assert {n for n in names if n.startswith("monitor/")} == package
    assert {"monitor/sidecar/static/index.html", "monitor/sidecar/static/live.js"} <= package
    with zipfile.ZipFile(dists.wheel) as wheel:
        top_level = wheel.read(f"{dist_info}top_level.txt").decode().split()
    assert top_level == ["monitor"]


def test_wheel_metadata(dists: Dists) -> None:
    from packaging.requirements import Requirement

    meta = _metadata(dists)
    assert meta["Name"] == "pool-monitor" == PROJECT["name"]
    assert meta["Version"] == PROJECT["version"]
    assert meta["Requires-Python"] == ">=3.10"
    assert {"sidecar", "otel"} <= set(meta.get_all("Provides-Extra"))
    requires = [Requirement(r) for r in meta.get_all("Requires-Dist")]

    def declared(extra: str | None) -> set[tuple[str, str, tuple[str, ...]]]:
        environment = {"extra": extra or "", "python_version": "3.11"}
        return {
            (r.name, str(r.specifier), tuple(sorted(r.extras)))
            for r in requires
            if (r.marker is None) == (extra is None)
            and (r.marker is None or r.marker.evaluate(environment))
        }

    def expected(specs: list[str]) -> set[tuple[str, str, tuple[str, ...]]]:
        return {
            (r.name, str(r.specifier), tuple(sorted(r.extras))) for r in map(Requirement, specs)
        }

    assert declared(None) == expected(PROJECT["dependencies"])
    for extra in ("sidecar", "otel"):
        assert declared(extra) == expected(PROJECT["optional-dependencies"][extra]), extra
    assert {"starlette", "uvicorn"} <= {name for name, _, _ in declared("sidecar")}
    assert "prometheus-client" in {name for name, _, _ in declared(None)}

    with zipfile.ZipFile(dists.wheel) as wheel:
        (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
        entry_points = configparser.ConfigParser()
        entry_points.read_string(wheel.read(name).decode())
    assert dict(entry_points["console_scripts"]) == {"pool-monitor": "monitor.cli:main"}


def test_sdist_holds_the_library_source_and_readme(dists: Dists) -> None:
    with tarfile.open(dists.sdist) as sdist:
        members = [m.name.split("/", 1) for m in sdist.getmembers() if m.isfile()]
    assert {top for top, _ in members} == {f"pool_monitor-{PROJECT['version']}"}
    names = {rest for _, rest in members}
    assert {"README.md", "pyproject.toml", "PKG-INFO"} <= names
    assert _library_files(dists.source) <= names
    assert not [n for n in names if n.split("/")[0] in TOOLS]
    assert not [n for n in names if n.endswith((".pyc", ".pyo"))]


@pytest.fixture(scope="module")
def venv(dists: Dists, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel and its `sidecar` extra, from the package index."""
    where = tmp_path_factory.mktemp("venv")
    done = _run([sys.executable, "-m", "venv", where], env=_clean_env())
    assert done.returncode == 0, done.stderr
    pip = [where / "bin" / "python", "-m", "pip", "install", "--quiet"]
    done = _run([*pip, f"{dists.wheel}[sidecar]"], env=_clean_env(), cwd=where)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return where


def _in_venv(venv: Path, *command: str) -> subprocess.CompletedProcess[str]:
    """Run from the virtualenv's own directory: the repository is not on sys.path."""
    program, *args = command
    return _run([venv / "bin" / program, *args], env=_clean_env(), cwd=venv)


def test_installed_wheel_imports_monitor_from_site_packages(venv: Path) -> None:
    done = _in_venv(venv, "python", "-c", "import monitor; print(monitor.__file__)")
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).is_relative_to(venv)
    for tool in ("demo_app", "dashboards", "compat", "tests"):
        done = _in_venv(venv, "python", "-c", f"import {tool}")
        assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr, tool


def test_installed_sidecar_command(venv: Path) -> None:
    done = _in_venv(venv, "pool-monitor", "--help")
    assert done.returncode == 0 and "sidecar" in done.stdout, done.stderr
    done = _in_venv(venv, "pool-monitor", "sidecar", "--help")
    assert done.returncode == 0, done.stderr
    assert "usage: pool-monitor sidecar" in done.stdout and "--snapshot-dir" in done.stdout


@pytest.mark.parametrize("command", ["demo", "dashboards"])
def test_installed_repository_commands_say_they_run_from_a_clone(venv: Path, command: str) -> None:
    done = _in_venv(venv, "pool-monitor", command)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"pool-monitor {command}: runs from a clone of the repository")
    assert "pip install -e '.[" in line


def test_installed_bench_needs_a_database_url(venv: Path) -> None:
    done = _in_venv(venv, "pool-monitor", "bench", "--rounds", "1")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "give --url or DATABASE_URL" in done.stderr
