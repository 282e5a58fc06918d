"""The image (Dockerfile) and the commands the chart runs in it.

There is no Docker engine here, so the image is not built. What can be checked is checked:
the Dockerfile's stages, user and entrypoint; that every file it copies exists and is not
excluded by .dockerignore; and that every command the chart puts in a container exists and
accepts its arguments: the sidecar's options go through the sidecar's own parser, the uvicorn
command lines through uvicorn's, the snapshot cleanup and the schema init container are run.
"""

from __future__ import annotations

import fnmatch
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.test_helm_chart import (
    EXTERNAL_DSN,
    VARIANTS,
    container,
    one,
    pod_spec,
    render,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs tomli on 3.10")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BUILD_TOOLS = ("build-essential", "gcc", "g++", "make", "libpq-dev", "python3-dev", "git")


# --------------------------------------------------------------------------- Dockerfile


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = []
    for word, rest in instructions((ROOT / "Dockerfile").read_text()):
        if word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None
            result.append({"base": parts[0], "name": name, "steps": []})
        elif word != "ARG" or result:
            result[-1]["steps"].append((word, rest))
    return result


def steps(stage: dict[str, Any], word: str) -> list[str]:
    return [rest for w, rest in stage["steps"] if w == word]


def exec_form(rest: str) -> list[str]:
    import json

    value = json.loads(rest)
    assert isinstance(value, list), f"use the exec form: {rest}"
    return value


def test_multi_stage_with_no_build_tools_in_the_final_stage() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2
    build, final = all_stages[0], all_stages[-1]
    assert any("build-essential" in run for run in steps(build, "RUN"))
    assert final["base"].startswith("python:") and "slim" in final["base"]
    assert final["base"] not in {s["name"] for s in all_stages if s["name"]}
    for run in steps(final, "RUN"):
        assert "apt-get install" not in run and "pip install" not in run, run
        for tool in BUILD_TOOLS:
            assert not re.search(rf"(^|\s){re.escape(tool)}(\s|$)", run), run
    for copy in steps(final, "COPY"):
        assert copy.startswith(f"--from={build['name']} "), (
            f"final stage copies only the venv: {copy}"
        )


def test_final_stage_runs_as_the_charts_non_root_user() -> None:
    final = stages()[-1]
    (user,) = steps(final, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    demo = one(render(), "Deployment", "demo")
    assert pod_spec(demo)["securityContext"]["runAsUser"] == int(uid)
    assert container(demo, "pool-monitor")["securityContext"]["runAsUser"] == int(uid)


def test_entrypoint_is_the_pool_monitor_console_script() -> None:
    final = stages()[-1]
    (entrypoint,) = steps(final, "ENTRYPOINT")
    (cmd,) = steps(final, "CMD")
    assert exec_form(entrypoint) == ["pool-monitor"]
    target = PYPROJECT["project"]["scripts"]["pool-monitor"]
    module, _, func = target.partition(":")
    main = getattr(importlib.import_module(module), func)
    assert main(exec_form(cmd)) == 0  # `docker run IMAGE` prints the usage
    commands = importlib.import_module("monitor.cli").COMMANDS
    assert {"sidecar", "demo"} <= set(commands)


def _ignored(path: str, patterns: list[str]) -> bool:
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        pattern = pattern.strip("/")
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatch(part, pattern[3:]) for part in parts):
                return True
        elif any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            return True
    return False


def test_copied_files_exist_and_are_in_the_build_context() -> None:
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in ignore), "keep .dockerignore simple"
    copied: list[str] = []
    for stage in stages():
        for copy in steps(stage, "COPY"):
            if copy.startswith("--from="):
                continue
            *sources, _dest = copy.split()
            copied += sources
    assert {"pyproject.toml", "README.md", "monitor/", "demo_app/", "dashboards/"} <= set(copied)
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
        assert not _ignored(source, ignore), f"COPY {source} is excluded by .dockerignore"
    readme = PYPROJECT["project"]["readme"]
    assert readme in copied, "setuptools needs the readme to build the wheel"
    for package in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert f"{package.rstrip('*')}/" in copied
    for secret_like in (".git", ".venv", "tests", "**/.env"):
        assert secret_like in ignore


def test_installed_extra_covers_the_sidecar_and_the_demo() -> None:
    (install,) = [r for r in steps(stages()[0], "RUN") if 'pip install ".[' in r]
    extra = re.search(r'pip install "\.\[(\w+)\]"', install)
    assert extra and extra.group(1) == "demo"
    demo = " ".join(PYPROJECT["project"]["optional-dependencies"]["demo"])
    assert "pool-monitor[sidecar" in demo and "httpx" in demo
    sidecar = " ".join(PYPROJECT["project"]["optional-dependencies"]["sidecar"])
    assert "uvicorn" in sidecar and "psycopg" in sidecar


def test_the_image_carries_the_repository_s_tools_on_the_path(tmp_path: Path) -> None:
    """The wheel holds `monitor` only; the chart's demo pod runs `demo_app` (and the image
    `dashboards`), so the build copies them beside the virtualenv and puts them on its path
    with a `.pth` file. The Dockerfile's own snippet is run here in a fresh venv."""
    (install,) = [r for r in steps(stages()[0], "RUN") if 'pip install ".[' in r]
    assert "cp -r demo_app dashboards /opt/pool-monitor/tools/" in install
    snippet = re.search(r'python -c "([^"]+)"', install)
    assert snippet, install
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-c", snippet.group(1)], check=True)  # as sh passes it
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    pth = Path(purelib) / "pool-monitor-tools.pth"
    assert pth.read_text() == "/opt/pool-monitor/tools\n"


# --------------------------------------------------------------------------- chart commands


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sidecar_arguments_pass_the_sidecars_own_parser(variant: str, tmp_path: Path) -> None:
    from monitor.sidecar.config import parse

    sidecar = container(one(render(VARIANTS[variant]), "Deployment", "demo"), "pool-monitor")
    assert sidecar["command"] == ["pool-monitor", "sidecar"]
    (tmp_path / "postgres").mkdir()
    (tmp_path / "postgres" / "dsn").write_text("postgresql://u:p@db:5432/app\n")
    (tmp_path / "api-token").mkdir()
    (tmp_path / "api-token" / "token").write_text("s3cret\n")
    args = [a.replace("/etc/pool-monitor", str(tmp_path)) for a in sidecar["args"]]
    config = parse(args, environ={})
    assert config.snapshot_dir == "/run/pool-monitor"
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 9187)
    assert config.postgres_dsn == "postgresql://u:p@db:5432/app"
    assert config.auth_token_file == str(tmp_path / "api-token" / "token")
    assert config.postgres_interval == 5.0
    if variant == "everything":
        assert config.show_query_text and config.scan_interval == 2.0


def _uvicorn_app(argv: list[str]) -> str:
    import uvicorn

    assert argv[0] == "uvicorn"
    context = uvicorn.main.make_context("uvicorn", list(argv[1:]))
    module, _, attr = context.params["app"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    assert context.params["factory"] is True
    return context.params["app"]


def test_demo_commands_exist_and_parse() -> None:
    demo = one(render(), "Deployment", "demo")
    service = container(demo, "demo")
    assert _uvicorn_app(service["args"]) == "demo_app.service:create_app"
    assert "--workers=2" in service["args"] and "--port=8000" in service["args"]
    external = container(demo, "external-api")
    assert _uvicorn_app(external["command"]) == "demo_app.external:create_app"
    env = {e["name"]: e.get("value") for e in service["env"]}
    assert env["DEMO_EXTERNAL_URL"] == "http://127.0.0.1:8701"
    assert "--port=8701" in external["command"] and "--host=127.0.0.1" in external["command"]


def test_app_start_command_clears_stale_snapshots_then_execs(tmp_path: Path) -> None:
    snapshots = tmp_path / "snapshots"
    snapshots.mkdir()
    stale = ["pool-monitor-pod-1-1700000000.json", ".pool-monitor-pod-7-1700000001.json.tmp"]
    for name in [*stale, "keep-me.json", "pool-monitor.conf"]:
        (snapshots / name).write_text("{}")
    values = {"snapshots": {"mountPath": str(snapshots)}}
    app = container(one(render(values), "Deployment", "demo"), "demo")
    probe = "import os, sys; print(sorted(os.listdir(sys.argv[1])), sys.argv[2])"
    result = subprocess.run(
        [*app["command"], sys.executable, "-c", probe, str(snapshots), "exec'd"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout.strip() == "['keep-me.json', 'pool-monitor.conf'] exec'd"


def test_schema_init_container_creates_the_demo_tables(database_url: str) -> None:
    from sqlalchemy import create_engine, inspect

    from demo_app.models import Base

    demo = one(render(), "Deployment", "demo")
    init = container(demo, "schema")
    assert init["command"][:3] == ["python", "-m", "demo_app.schema"]
    env = {**os.environ, "DATABASE_URL": database_url}
    result = subprocess.run(
        [sys.executable, *init["command"][1:]],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "demo tables ready" in result.stdout
    engine = create_engine(database_url)
    try:
        assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_schema_command_fails_clearly_without_a_database() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "demo_app.schema"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "DATABASE_URL is not set" in result.stderr
    env["DATABASE_URL"] = "postgresql://nobody@127.0.0.1:1/none"
    result = subprocess.run(
        [sys.executable, "-m", "demo_app.schema", "--wait", "0"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "demo schema not created: OperationalError" in (result.stderr)


def test_external_dsn_variant_needs_no_bundled_database() -> None:
    objects = render(EXTERNAL_DSN)
    assert not [o for o in objects if o["kind"] == "StatefulSet"]
    init = container(one(objects, "Deployment", "demo"), "schema")
    (env,) = init["env"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "orders-db", "key": "url"}
