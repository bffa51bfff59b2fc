"""Every third-party module the tests, the benchmarks and the bench rig import is a
declared dependency: of the project, or of its `test` extra. A module that only
arrives through another package (hypothesis through schemathesis, yarl through
aiohttp) breaks the day that package stops pulling it in."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["tests", "tools/bench", "hil"]
FIRST_PARTY = {"opensense", "opensense_contract", "opensense_gateway", "tests", "tools"}
# Imported only on a path the suite never takes, each with the reason; installed by
# whoever takes that path
OPTIONAL = {
    # tools/bench/report: a candidate engine for a comparison run by hand; the suite
    # runs that bench with --only reportlab --only haccp_monthly
    "weasyprint",
}
# Modules of the MicroPython unix port, imported by the cases that run under it
MICROPYTHON_BUILTINS = {"vfs", "micropython", "machine", "network"}
# Where a script finds local modules: beside itself, the firmware (put on the
# MicroPython path by the firmware fixtures and benches, with its pinned dependencies
# and the test helpers of tests/firmware)
LOCAL_DIRS = [ROOT, ROOT / "firmware", ROOT / "tests" / "firmware"]  # ROOT: hil, tools


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    return {_norm(re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0]) for r in reqs}


def firmware_deps() -> set[str]:
    """Top-level names of the firmware's pinned dependencies (firmware/deps.lock)."""
    names = set()
    for line in (ROOT / "firmware" / "deps.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            names.add(line.split()[-1].split("/")[0].removesuffix(".py"))
    return names


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def is_local(name: str, path: Path) -> bool:
    # a script inside a package importing that package by name (tools/bench/_lib's
    # workers, run as scripts, import `_lib.publisher`)
    if path.parent.name == name and (path.parent / "__init__.py").exists():
        return True
    for d in [path.parent, *LOCAL_DIRS]:
        if (d / f"{name}.py").exists() or (d / name / "__init__.py").exists():
            return True
    return False


def third_party_imports() -> dict[str, set[str]]:
    """module -> the files importing it, for every module that is neither the
    standard library nor ours."""
    fw = firmware_deps()
    out: dict[str, set[str]] = {}
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT)
            under_mp = rel.parts[:2] == ("tests", "firmware")
            for name in imports(path):
                if (
                    name in sys.stdlib_module_names
                    or name in FIRST_PARTY
                    or name in OPTIONAL
                    or is_local(name, path)
                    or (under_mp and (name in MICROPYTHON_BUILTINS or name in fw))
                ):
                    continue
                out.setdefault(name, set()).add(str(rel))
    return out


def test_every_imported_test_dependency_is_declared() -> None:
    dists = packages_distributions()
    wanted = declared()
    missing = {}
    for name, files in third_party_imports().items():
        providers = {_norm(d) for d in dists.get(name, [])}
        if not providers & wanted:
            missing[name] = (sorted(providers) or ["(not installed)"], sorted(files)[:3])
    assert not missing, (
        "imported but not declared in pyproject's dependencies or its `test` extra "
        f"(module: (distributions, files)): {missing}"
    )


def test_the_scan_sees_third_party_imports() -> None:
    """The check above can only fail if the scan finds the imports at all."""
    found = third_party_imports()
    assert {"pytest", "psycopg", "aiohttp"} <= found.keys(), sorted(found)
    assert "opensense" not in found and "sense" not in found and "os" not in found
