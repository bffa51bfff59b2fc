"""Deploy: the env file's mode is checked at start, the unit and Caddyfile say what
docs/operations.md says, rollback is one command, and migrations stay additive so
the previous release runs on the new schema."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from opensense import db
from opensense.envfile import apply_env_file, parse

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def test_env_file_parse() -> None:
    assert parse("# c\n\nA=1\nexport B = 'two words'\nC=\"x=y\"\n") == {
        "A": "1",
        "B": "two words",
        "C": "x=y",
    }
    with pytest.raises(ValueError, match="line 1"):
        parse("not a pair\n")


def test_env_file_mode_is_checked(tmp_path: Path) -> None:
    f = tmp_path / "opensense.env"
    f.write_text("OPENSENSE_LOG_LEVEL=DEBUG\n")
    f.chmod(0o644)
    env = {"OPENSENSE_ENV_FILE": str(f)}
    warnings = apply_env_file(env)
    assert len(warnings) == 1 and "accessible by group and others (mode 0644)" in warnings[0]
    assert env["OPENSENSE_LOG_LEVEL"] == "DEBUG"
    f.chmod(0o400)
    env = {"OPENSENSE_ENV_FILE": str(f), "OPENSENSE_LOG_LEVEL": "INFO"}
    assert apply_env_file(env) == [] and env["OPENSENSE_LOG_LEVEL"] == "INFO"  # env wins
    f.chmod(0o640)
    assert "accessible by group (mode 0640)" in apply_env_file({"OPENSENSE_ENV_FILE": str(f)})[0]


def test_server_start_warns_about_a_readable_env_file(tmp_path: Path) -> None:
    f = tmp_path / "opensense.env"
    f.write_text(
        f"OPENSENSE_DATABASE_URL=postgresql://nobody@127.0.0.1:1/x\nOPENSENSE_STATE_DIR={tmp_path}\n"
    )
    f.chmod(0o604)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENSENSE_")}
    env["OPENSENSE_ENV_FILE"] = str(f)
    r = subprocess.run(
        [sys.executable, "-m", "opensense.cli", "db", "url"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0
    assert r.stdout.strip() == "postgresql://nobody@127.0.0.1:1/x"  # read from the file
    assert f"env file {f} is accessible by others (mode 0604)" in r.stderr
    f.chmod(0o400)
    r = subprocess.run(
        [sys.executable, "-m", "opensense.cli", "db", "url"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "env file" not in r.stderr


def test_unit_reads_the_env_file_and_tells_the_server() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "opensense.service")
    svc = unit["Service"]
    assert svc["EnvironmentFile"] == "/etc/opensense/opensense.env"
    assert svc["Environment"] == f"OPENSENSE_ENV_FILE={svc['EnvironmentFile']}"
    assert svc["ExecStart"].endswith("opensense serve") and svc["User"] != "root"
    assert "db migrate" in svc["ExecStartPre"]
    env = parse((DEPLOY / "opensense.env").read_text())
    from opensense.settings import SETTINGS

    known = {s.env for s in SETTINGS}
    assert set(env) <= known, set(env) - known


def test_caddy_speaks_tls13_only() -> None:
    text = (DEPLOY / "Caddyfile").read_text()
    protocols = re.findall(r"^\s*protocols\s+(.*)$", text, re.M)
    assert protocols == ["tls1.3"]
    assert "tls1.2" not in text and "reverse_proxy 127.0.0.1:8080" in text


def test_rollback_is_one_command(tmp_path: Path) -> None:
    env = {**os.environ, "OPENSENSE_ROOT": str(tmp_path), "SYSTEMCTL": "true", "SKIP_VENV": "1"}
    script = str(DEPLOY / "release.sh")
    for v in ("v1", "v2"):
        src = tmp_path / f"src-{v}"
        src.mkdir()
        (src / "VERSION").write_text(v)
        subprocess.run([script, "install", v, str(src)], env=env, check=True, capture_output=True)
    assert (tmp_path / "current" / "VERSION").read_text() == "v2"
    r = subprocess.run([script, "rollback"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "rolled back" in r.stdout
    assert (tmp_path / "current" / "VERSION").read_text() == "v1"
    assert (tmp_path / "previous" / "VERSION").read_text() == "v2"
    ops = (ROOT / "docs" / "operations.md").read_text()
    assert "release.sh rollback" in ops


# --- migrations are additive ---------------------------------------------------------

FORBIDDEN = [
    (r"\bDROP\s+COLUMN\b", "drops a column the previous release reads"),
    (r"\bRENAME\b", "renames something the previous release names"),
    (r"\bALTER\s+COLUMN\s+\S+\s+(SET\s+DATA\s+)?TYPE\b", "changes a column's type"),
    (r"\bALTER\s+COLUMN\s+\S+\s+SET\s+NOT\s+NULL\b", "makes an existing column NOT NULL"),
    (r"\bDROP\s+(TABLE|VIEW|TYPE)\b(?!\s+IF\s+EXISTS\s+\w+_new\b)", "drops a table, view or type"),
    (r"(^|;)\s*TRUNCATE\b", "throws data away"),
]
ADD_NOT_NULL = re.compile(
    r"\bADD\s+COLUMN\s+[^,;]*\bNOT\s+NULL\b(?![^,;]*\bDEFAULT\b)", re.I | re.S
)


def additive_violations(sql_text: str) -> list[str]:
    """Why `sql_text` would break the previous release on the new schema."""
    text = re.sub(r"--[^\n]*", "", sql_text)
    text = re.sub(r"\$\$.*?\$\$", "$$ $$", text, flags=re.S)  # function bodies
    out = [why for pat, why in FORBIDDEN if re.search(pat, text, re.I | re.M)]
    if ADD_NOT_NULL.search(text):
        out.append("adds a NOT NULL column without a DEFAULT (the previous release's INSERTs fail)")
    return out


@pytest.mark.parametrize(
    "bad",
    [
        "ALTER TABLE devices DROP COLUMN model;",
        "ALTER TABLE devices RENAME COLUMN name TO title;",
        "ALTER TABLE devices ALTER COLUMN cadence_s TYPE bigint;",
        "ALTER TABLE devices ALTER COLUMN fw_version SET NOT NULL;",
        "ALTER TABLE devices ADD COLUMN colour text NOT NULL;",
        "DROP TABLE rules;",
    ],
)
def test_the_check_catches_breaking_migrations(bad: str) -> None:
    assert additive_violations(bad)


def test_the_check_allows_additive_ones() -> None:
    assert not additive_violations(
        "ALTER TABLE devices ADD COLUMN colour text NOT NULL DEFAULT 'blue';\n"
        "ALTER TABLE devices ADD COLUMN note text;\nCREATE TABLE x (id int NOT NULL);\n"
        "CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE 'DROP COLUMN'; END $$;"
    )


@pytest.mark.parametrize("number,name,text", db.migration_files(), ids=lambda x: str(x)[:20])
def test_every_migration_is_additive(number: int, name: str, text: str) -> None:
    assert additive_violations(text) == [], name


# --- the previous release runs on the new schema --------------------------------------


def _previous_release(dest: Path) -> str | None:
    """Export `server/` as it was just before the newest migration was added (the
    release a rollback goes back to); None when there is no git history to ask."""
    if shutil.which("git") is None:
        return None
    newest = db.migration_files()[-1][1]
    rev = subprocess.run(
        [
            "git",
            "-C",
            str(ROOT),
            "log",
            "--diff-filter=A",
            "--format=%H",
            "-1",
            "--",
            f"server/opensense/db/migrations/{newest}",
        ],
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not rev:
        return None  # not committed yet, or no history (a source tarball)
    parent = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{rev}~1^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if parent.returncode != 0:
        return None  # a shallow clone ends at that commit: its parent is not here
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", f"{rev}^", "server"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return rev


@pytest.mark.db
def test_the_previous_release_runs_on_the_new_schema(new_database: Any, tmp_path: Path) -> None:
    rev = _previous_release(tmp_path)
    if rev is None:
        pytest.skip("no git history to find the previous release in")
    dsn = new_database()  # every migration of this release applied
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENSENSE_")}
    env.update(
        PYTHONPATH=str(tmp_path / "server"),
        OPENSENSE_DATABASE_URL=dsn,
        OPENSENSE_STATE_DIR=str(tmp_path / "state"),
        OPENSENSE_MQTT="off",
        OPENSENSE_BCRYPT_ROUNDS="4",
    )

    def old(*args: str) -> str:
        r = subprocess.run(
            [sys.executable, "-m", "opensense.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, (args, r.stderr[-2000:])
        return r.stdout

    where = subprocess.run(
        [sys.executable, "-c", "import opensense; print(opensense.__file__)"],
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    assert where.startswith(str(tmp_path)), where  # really the old code
    assert "up to date" in old("db", "status")
    acc = json.loads(old("account", "create", "--name", "Old", "--email", "o@example.com"))
    site = json.loads(old("site", "create", "--account", acc["account_id"], "--name", "Shop"))
    dev = json.loads(
        old(
            "device",
            "create",
            "--account",
            acc["account_id"],
            "--site",
            site["id"],
            "--local-id",
            "fridge01",
        )
    )
    old("device", "rotate-token", dev["id"], "--account", acc["account_id"])
    assert len(json.loads(old("device", "list", "--account", acc["account_id"]))) == 1
