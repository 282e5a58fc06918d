"""The documentation: generated references equal what the code says, and links resolve.

- `docs/metrics.md` and `docs/settings.md` are regenerated in memory (`docs/generate.py`)
  and compared with the committed files; the failure names the command to run.
- The series the metric reference lists are the ones really exported: a real in-process
  scrape and a real sidecar exposition are compared with it, and every series name in the
  sidecar's metrics module is documented.
- Every relative link (and image) in the user-facing markdown points at a file that exists,
  and a `#fragment` into a markdown file names one of its headings (GitHub's slugs).
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import unicodedata
from pathlib import Path
from types import ModuleType

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import monitor
from monitor.catalogue import METRICS
from monitor.sidecar import metrics as sidecar_metrics
from monitor.sidecar.aggregate import EMPTY
from monitor.sidecar.postgres import PostgresCollector

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RUN = "run `python docs/generate.py` (or `make docs`)"


def _load_generator() -> ModuleType:
    """`docs/generate.py` by path: `docs` is a folder, not an installed package."""
    spec = importlib.util.spec_from_file_location(
        "pool_monitor_docs_generate", DOCS / "generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _load_generator()


# -- generated references ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(generate.FILES))
def test_generated_reference_is_up_to_date(name: str) -> None:
    expected = generate.FILES[name]()
    path = DOCS / name
    if not path.exists():
        pytest.fail(f"docs/{name} is missing: {RUN}")
    committed = path.read_text(encoding="utf-8")
    if committed != expected:
        diff = "".join(
            list(
                difflib.unified_diff(
                    committed.splitlines(keepends=True),
                    expected.splitlines(keepends=True),
                    f"docs/{name} (committed)",
                    f"docs/{name} (generated)",
                )
            )[:60]
        )
        pytest.fail(
            f"docs/{name} is out of date with the code: {RUN} and commit the result.\n{diff}"
        )


def test_generator_check_mode_agrees(capsys: pytest.CaptureFixture[str]) -> None:
    assert generate.main(["--check"]) == (1 if generate.stale_files() else 0)
    capsys.readouterr()


def _documented(markdown: str) -> set[str]:
    """Series names in the first column of the reference's tables."""
    names = set()
    for line in markdown.splitlines():
        if line.startswith("| `"):
            first = line.split(" | ")[0]
            names.update(re.findall(r"`([a-z_:][a-z0-9_:]*)(?:\{[^`]*\})?`", first))
    return names


def _exposed(registry: CollectorRegistry) -> dict[str, set[str]]:
    """`{family name: sample names}` from a registry's real text exposition."""
    text = generate_latest(registry).decode()
    return {f.name: {s.name for s in f.samples} for f in text_string_to_metric_families(text)}


def test_metric_reference_lists_what_a_scrape_exports(tmp_path: Path) -> None:
    """A real scrape of an instrumented engine and a used lock: each family it exports has
    exactly the series the reference lists, and between them they cover every kind."""
    documented = _documented(generate.render_metrics())
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'docs.db'}")
    monitor.instrument(engine, pool_name="docs-reference")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("select 1")
        with monitor.lock("docs-reference"):
            pass
        registry = CollectorRegistry(auto_describe=False)
        from monitor.exporters.prometheus import register

        register(registry)
        exposed = _exposed(registry)
    finally:
        monitor.uninstrument(engine)
        engine.dispose()
    kinds = {m.kind for m in METRICS if m.prometheus_name.removesuffix("_total") in exposed}
    assert kinds == {"counter", "updowncounter", "gauge", "histogram"}, kinds
    for family, samples in exposed.items():
        assert samples <= documented, f"{family}: {sorted(samples - documented)} undocumented"
    for metric in METRICS:
        assert metric.prometheus_name in generate.render_metrics()


def test_metric_reference_lists_what_the_sidecar_exports() -> None:
    """The sidecar's registries on an empty view, without and with PostgreSQL configured
    (never polled): every series is documented. The generator renders the same
    collectors with made-up PostgreSQL figures, so the other direction holds too."""
    documented = _documented(generate.render_metrics())
    for dsn in (None, "dbname=docs"):
        registries = sidecar_metrics.Registries(lambda: EMPTY, PostgresCollector(dsn))
        for part in (registries.data, registries.health):
            for family, samples in _exposed(part).items():
                assert samples <= documented, f"{family}: {sorted(samples - documented)}"
    assert generate.sidecar_series_names() <= documented


def test_every_series_name_in_the_sidecar_metrics_module_is_documented() -> None:
    """A family added under a new condition would escape the generator's made-up states:
    every `pg_*` / `pool_monitor_*` name written in `monitor/sidecar/metrics.py` must be in
    the reference."""
    source = Path(sidecar_metrics.__file__).read_text(encoding="utf-8")
    named = set(re.findall(r'"((?:pg|pool_monitor)_[a-z_]+)"', source))
    assert named, "the pattern found no series names: update this test"
    families = {f.name for part in generate.sidecar_families().values() for f, _ in part}
    assert named <= families, f"not rendered by docs/generate.py: {sorted(named - families)}"


def test_generator_meanings_only_fill_gaps() -> None:
    """Texts written in the generator are only for options whose help says nothing."""
    parser = generate.sidecar_config.build_parser()
    helps = {a.option_strings[-1]: a.help for a in parser._actions if a.option_strings}
    for flag in generate.OPTION_MEANING:
        assert flag in helps and not helps[flag], f"{flag} has help text now: drop ours"
    comments = generate.setting_comments()
    assert set(comments) == set(generate.library_config.SETTING_NAMES)


# -- links ------------------------------------------------------------------------------------

LINKED_FILES = sorted(
    {
        ROOT / "README.md",
        ROOT / "monitor" / "sidecar" / "README.md",
        ROOT / "dashboards" / "README.md",
        ROOT / "helm" / "README.md",
        *DOCS.rglob("*.md"),
    }
)

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def github_slug(heading: str) -> str:
    """The id GitHub gives a heading: its text (links reduced to their text, markup
    dropped), lower-cased, punctuation removed, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).lower()
    kept = []
    for char in text:
        category = unicodedata.category(char)
        if char in " -_" or category[0] in "LN" or category == "Mn":
            kept.append(char)
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(path.read_text(encoding="utf-8")):
        out.update(_HTML_ANCHOR.findall(line))
        match = _HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def relative_links(path: Path) -> list[str]:
    text = "\n".join(_prose(path.read_text(encoding="utf-8")))
    text = _CODE_SPAN.sub("", text)
    return [t for t in _LINK.findall(text) if not _SCHEME.match(t)]


def broken_links(path: Path) -> list[str]:
    problems = []
    for target in relative_links(path):
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.is_relative_to(ROOT):
            problems.append(f"{target}: outside the repository")
            continue
        if not resolved.exists():
            problems.append(f"{target}: no such file")
            continue
        if fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            problems.append(f"{target}: no heading #{fragment} in {resolved.relative_to(ROOT)}")
    return problems


@pytest.mark.parametrize("path", LINKED_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    problems = broken_links(path)
    assert not problems, f"{path.relative_to(ROOT)}: broken links:\n" + "\n".join(problems)


_MD_PATH = re.compile(r"`([\w./-]+\.md)`")


@pytest.mark.parametrize("path", LINKED_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_files_named_in_code_exist(path: Path) -> None:
    """A `path/to/FILE.md` written as code (not a link) names a file of the repository,
    relative to the document or to the repository's root: the README once sent readers to
    `../shared/DESIGN.md`, which is not in it."""
    missing = []
    for name in _MD_PATH.findall("\n".join(_prose(path.read_text(encoding="utf-8")))):
        candidates = [(path.parent / name).resolve(), (ROOT / name).resolve()]
        if not any(c.is_relative_to(ROOT) and c.exists() for c in candidates):
            missing.append(name)
    assert not missing, f"{path.relative_to(ROOT)} names missing files: {missing}"


def test_docs_exist_and_are_linked_from_the_index() -> None:
    index = DOCS / "README.md"
    linked = {(index.parent / t.partition("#")[0]).resolve() for t in relative_links(index)}
    pages = {p.resolve() for p in DOCS.rglob("*.md")} - {index.resolve()}
    assert pages, "docs/ has no pages"
    assert pages <= linked, f"not linked from docs/README.md: {sorted(pages - linked)}"


def test_readme_links_the_docs_and_no_missing_design_doc() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "shared/DESIGN.md" not in readme
    assert "docs/README.md" in relative_links(ROOT / "README.md")
    assert "docs/metrics.md" in relative_links(ROOT / "README.md")


def test_reading_alerts_guide_lists_every_alert() -> None:
    rules = (ROOT / "dashboards" / "rules" / "alerts.yml").read_text(encoding="utf-8")
    alerts = re.findall(r"- alert: (\w+)", rules)
    guide = (DOCS / "guides" / "reading-alerts.md").read_text(encoding="utf-8")
    assert alerts
    missing = [a for a in alerts if f"| {a} | [{a.lower()}](" not in guide]
    assert not missing, f"docs/guides/reading-alerts.md: add {missing} to 'Every alert'"


def test_slugs_follow_github() -> None:
    assert github_slug('Live holds: the board, the live document, staleness and "as of"') == (
        "live-holds-the-board-the-live-document-staleness-and-as-of"
    )
    assert github_slug("`db_client_connection_count`") == "db_client_connection_count"
    assert github_slug("Application locks (`monitor.lock`)") == "application-locks-monitorlock"
    assert github_slug("A. Depend on this chart") == "a-depend-on-this-chart"
