"""The docs name everything the code declares as data: settings, measurement kinds,
vertical presets, error codes, scheduled jobs, CLI commands."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from opensense.alarms.engine import RULE_KINDS
from opensense.alarms.paths import PATHS
from opensense.cli import build_parser
from opensense.errors import CODES
from opensense.jobs import JOBS
from opensense.kinds import KINDS
from opensense.presets import VERTICALS
from opensense.settings import SETTINGS

ROOT = Path(__file__).resolve().parents[1]


def docs_text() -> str:
    return "\n".join(
        p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    )


@pytest.mark.parametrize("env", [s.env for s in SETTINGS])
def test_every_setting_is_documented(env: str) -> None:
    assert f"`{env}`" in (ROOT / "docs" / "settings.md").read_text()


@pytest.mark.parametrize("name", list(KINDS))
def test_every_measurement_kind_is_documented(name: str) -> None:
    assert f"`{name}`" in docs_text()


@pytest.mark.parametrize("name", list(VERTICALS))
def test_every_vertical_is_documented(name: str) -> None:
    assert f"`{name}`" in docs_text()


@pytest.mark.parametrize("code", list(CODES))
def test_every_error_code_is_documented(code: str) -> None:
    assert f"`{code}`" in (ROOT / "docs" / "api.md").read_text()


@pytest.mark.parametrize("name", [j.name for j in JOBS])
def test_every_job_is_documented(name: str) -> None:
    assert f"`{name}`" in (ROOT / "docs" / "storage.md").read_text()


def test_every_cli_command_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:  # type: ignore[union-attr]
        assert f"opensense {name}" in readme, name


def test_every_status_condition_and_component_is_documented() -> None:
    from opensense.status.cadence import CLASSES
    from opensense.status.components import COMPONENTS
    from opensense.status.conditions import CONDITIONS

    text = (ROOT / "docs" / "status.md").read_text()
    for cond in CONDITIONS:
        row = next((ln for ln in text.splitlines() if ln.startswith(f"| `{cond.name}` |")), None)
        assert row is not None, cond.name
        assert f"| {cond.klass} |" in row, cond.name
    for comp in COMPONENTS:
        assert f"`{comp.id}`" in text, comp.id
    for name in CLASSES:
        assert f"| {name} |" in text, name


@pytest.mark.parametrize("name", list(RULE_KINDS))
def test_every_rule_kind_is_documented(name: str) -> None:
    text = (ROOT / "docs" / "alarms.md").read_text()
    assert f"`{name}`" in text
    for p in RULE_KINDS[name].params:
        assert f"`{p.name}`" in text, (name, p.name)


def undocumented_rule_kinds() -> list[str]:
    """The rule kinds (and their params) docs/alarms.md does not name, as declared now."""
    text = (ROOT / "docs" / "alarms.md").read_text()
    return [
        f"{k.name}.{p}" if p else k.name
        for k in RULE_KINDS.values()
        for p in ("", *(x.name for x in k.params))
        if f"`{p or k.name}`" not in text
    ]


def undocumented_notification_paths() -> list[str]:
    """The notification paths without their row in docs/alarms.md's paths table."""
    text = (ROOT / "docs" / "alarms.md").read_text()
    return [p for p in PATHS if not any(ln.startswith(f"| `{p}` |") for ln in text.splitlines())]


def undocumented_report_templates() -> list[str]:
    """The report templates without their row in docs/reports.md's templates table."""
    from opensense.reports.templates import TEMPLATES

    text = (ROOT / "docs" / "reports.md").read_text()
    return [
        t for t in TEMPLATES if not any(ln.startswith(f"| `{t}` |") for ln in text.splitlines())
    ]


def test_every_report_template_is_documented() -> None:
    assert undocumented_report_templates() == []


def test_every_notification_path_is_documented() -> None:
    assert undocumented_notification_paths() == []


def test_every_feature_is_in_the_architecture_page() -> None:
    from opensense.app import FEATURES, STATUS_FEATURES

    text = (ROOT / "docs" / "architecture.md").read_text()
    for setup in (*FEATURES, *STATUS_FEATURES):
        name = setup.__module__.removeprefix("opensense.")
        assert f"| `{name}` |" in text, name


# The product reference is docs/product.md; nothing cites the notes it was first
# written from, which live outside the repository. Each pattern is a citation form
# that was in use; "seed" in its other sense (a random seed, a hypothesis seed, a
# loop variable) must not match. Built from pieces so this file does not match itself.
_REF = "PRODUCT" + r"\.md"
_SEED = "(?<![a-z])se" + "eds?"  # no letter before it; `_` may be (snake_case names)
OUTSIDE_CITATIONS = [
    re.compile(_REF),  # docs/product.md, lower case, is the project's own page
    re.compile(rf"{_SEED}/", re.I),  # seeds/incident-response.txt
    re.compile(rf"{_SEED}'s\b", re.I),  # the seed's table
    re.compile(rf"\bthe[\s_]+{_SEED}\b", re.I),  # (the seed: "..."), the_seed_cadence
    re.compile(rf"[(;]\s*{_SEED}:", re.I),  # (seed: TLS 1.3 only)
    re.compile(
        rf"{_SEED}[ _-](architecture|incident|default|minimum|page|table|cadence"
        r"|threshold|classes|p[012]\b)",
        re.I,
    ),
    re.compile("security-" + r"architecture\.md|incident-" + r"response\.txt"),
    re.compile(r"\.\./(shared|se" + r"eds|reference)\b|/work/"),
]


def tracked_files() -> list[Path]:
    """The repository's files: git's list in a checkout, else a walk (a copy of the
    tree without .git, as the mutation tests make)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout
        return [ROOT / n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", ".opensense", "__pycache__", "build", "node_modules"}
        return [
            p
            for p in ROOT.rglob("*")
            if p.is_file()
            and not any(part in skip or part.endswith(("_cache", ".egg-info")) for part in p.parts)
        ]


def outside_citations(text: str) -> list[str]:
    return [m.group(0) for rx in OUTSIDE_CITATIONS for m in rx.finditer(text)]


def test_the_citation_patterns_catch_each_form_and_spare_random_seeds() -> None:
    cited = [
        "The contract is " + "PRODUCT.md's (Ingest, Errors, Reads)",
        "(se" + "eds/incident-response.txt, Response timelines)",
        "Every data class of the se" + "ed's retention table",
        "resolved automatically (the\nse" + "ed: Mark resolved before it is)",
        "# /etc/caddy/Caddyfile (se" + "ed: TLS 1.3 only, Let's Encrypt)",
        "(deploy/opensense.env; se" + "ed: root:root 0400)",
        "(se" + "eds: Sent from infrastructure independent of the SaaS)",
        "Months of raw measurements kept (se" + "ed minimum 13).",
        "the lost rows; say so, se" + "ed P0)",
        "For a clustered EMQX (the broker of the se" + "ed architecture)",
        "se" + "ed_minimum: int | None = None",
        "def test_conditions_cover_the_se" + "ed_thresholds():",
        "See `../se" + "eds/security-" + "architecture.md`",
        "/work/" + "shared/reference",
    ]
    for text in cited:
        assert outside_citations(text), text
    random_seeds = [
        "def simulated(setpoint: float, swing: float, ts: datetime, seed: int) -> float:",
        "v = setpoint + swing * math.sin(t / 2400 * 2 * math.pi + seed)",
        "for seed, (local_id, _, sp, sw) in enumerate(DEVICES):",
        '"seed": 20261124,',
        "r = rom(0x0D00 + seed)",
        "random.seed(7)  # a fixed seed, so the run repeats",
        "See docs/product.md#incident-classes and [product.md](product.md#retention).",
    ]
    for text in random_seeds:
        assert not outside_citations(text), text


def test_no_file_cites_notes_outside_the_repository() -> None:
    me = Path(__file__).resolve()
    found = []
    for path in tracked_files():
        if path.resolve() == me or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # binary
        for rx in OUTSIDE_CITATIONS:  # over the whole text: a citation may wrap a line
            for m in rx.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                found.append(f"{path.relative_to(ROOT)}:{line}: {m.group(0)!r}")
    assert not found, "cite docs/product.md instead:\n" + "\n".join(sorted(found))


def test_markdown_links_stay_inside_the_repository() -> None:
    found = []
    for path in tracked_files():
        if path.suffix != ".md" or not path.is_file():
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL or an anchor on the same page
            dest = (path.parent / target.split("#")[0]).resolve()
            if not dest.is_relative_to(ROOT) or not dest.exists():
                found.append(f"{path.relative_to(ROOT)}: {target}")
    assert not found, found


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown page's headings."""
    return {
        re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        for m in re.finditer(r"^#+ (.+)$", page.read_text(), re.M)
    }


def test_every_cited_section_exists() -> None:
    """`docs/product.md#retention` in a comment and `[x](product.md#retention)` in a
    page name a heading that is there: a renamed section breaks its citations here."""
    found = []
    for path in tracked_files():
        if path.suffix not in {".md", ".py", ".sql", ".toml", ""} or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        cites = [(ROOT / p, a) for p, a in re.findall(r"\b(docs/[\w-]+\.md)#([\w-]+)", text)]
        if path.suffix == ".md":
            cites += [
                ((path.parent / p).resolve(), a)
                for p, a in re.findall(r"\]\(([\w./-]+\.md)#([\w-]+)\)", text)
            ]
        for page, anchor in cites:
            if not page.exists() or anchor not in anchors(page):
                found.append(f"{path.relative_to(ROOT)}: {page.name}#{anchor}")
    assert not found, found
