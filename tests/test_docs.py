"""The docs name everything the code declares as data: settings, measurement kinds,
vertical presets, error codes, scheduled jobs, CLI commands."""

from __future__ import annotations

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


def test_every_notification_path_is_documented() -> None:
    assert undocumented_notification_paths() == []


def test_every_feature_is_in_the_architecture_page() -> None:
    from opensense.app import FEATURES, STATUS_FEATURES

    text = (ROOT / "docs" / "architecture.md").read_text()
    for setup in (*FEATURES, *STATUS_FEATURES):
        name = setup.__module__.removeprefix("opensense.")
        assert f"| `{name}` |" in text, name
