"""No block of code is written twice in the programs (issue 12): a run of six or more
lines that stands, to the letter, in two places of `server/`, `gateway/` or
`tools/bench/` fails here, so that a change factors it into one function instead.

Lines are compared as tokens: indentation, spacing, comments, blank lines, import
statements, a class's field declarations and lines of lone brackets do not count (so a copy moved into another
block or re-commented is still a copy); the lines of a multi-line string (SQL) count
one by one. Copies that only share a shape (the same code with other names, as in
data tables, OpenAPI literals or two route handlers) are not looked for: whether they
are the same logic needs judgement, and that is left to review.
"""

from __future__ import annotations

import ast
import io
import os
import tokenize
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = ("server", "gateway", "tools/bench")
MIN_LINES = 6
_SKIP = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
_BRACKETS = set("()[]{},:;")

Place = tuple[str, int, int]  # file, first line, last line


def code_lines(source: str) -> list[tuple[int, str]]:
    """(line number, the line's tokens joined by one space) for every line that counts."""
    passed_over: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        skip: list[ast.stmt] = []
        if isinstance(node, ast.Import | ast.ImportFrom):
            skip = [node]
        elif isinstance(node, ast.ClassDef):
            # a class's field declarations are data: two row types with the same
            # columns share a shape, not logic to factor
            skip = [s for s in node.body if isinstance(s, ast.AnnAssign)]
        for s in skip:
            passed_over.update(range(s.lineno, (s.end_lineno or s.lineno) + 1))
    parts: dict[int, list[str]] = defaultdict(list)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in _SKIP or tok.start[0] in passed_over:
            continue
        for k, piece in enumerate(tok.string.split("\n")):  # a multi-line string, line by line
            if piece.strip():
                parts[tok.start[0] + k].append(" ".join(piece.split()))
    return [(n, " ".join(p)) for n, p in sorted(parts.items()) if not set("".join(p)) <= _BRACKETS]


def repeated_runs(files: dict[str, str], min_lines: int = MIN_LINES) -> list[tuple[Place, Place]]:
    """Pairs of places where `min_lines` or more counted lines are the same, longest
    stretch each (a pair is named once, not once per line of it)."""
    lines = {name: code_lines(src) for name, src in files.items()}
    windows: dict[tuple[str, ...], list[tuple[str, int]]] = defaultdict(list)
    for name, ls in lines.items():
        for i in range(len(ls) - min_lines + 1):
            windows[tuple(t for _, t in ls[i : i + min_lines])].append((name, i))
    found: list[tuple[Place, Place]] = []
    covered: set[tuple[str, int, str, int]] = set()
    for places in windows.values():
        for a, (fa, ia) in enumerate(places):
            for fb, ib in places[a + 1 :]:
                if (fa, ia, fb, ib) in covered or (fa == fb and ib - ia < min_lines):
                    continue  # inside a pair already named, or a run overlapping itself
                la, lb = lines[fa], lines[fb]
                n = min_lines
                while (
                    ia + n < len(la)
                    and ib + n < len(lb)
                    and la[ia + n][1] == lb[ib + n][1]
                    and not (fa == fb and ia + n >= ib)
                ):
                    n += 1
                covered.update((fa, ia + k, fb, ib + k) for k in range(n))
                found.append(
                    (
                        (fa, la[ia][0], la[ia + n - 1][0]),
                        (fb, lb[ib][0], lb[ib + n - 1][0]),
                    )
                )
    return found


def program_files() -> dict[str, str]:
    out = {}
    for tree in TREES:
        # os.walk does not enter links: gateway/opensense_contract is the server's
        # contract package (a symlink), not a second copy of it
        for folder, dirs, names in os.walk(ROOT / tree):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
            for name in names:
                path = Path(folder, name)
                if name.endswith(".py") and not path.is_symlink():
                    out[str(path.relative_to(ROOT))] = path.read_text(encoding="utf-8")
    return out


def test_no_block_is_written_twice() -> None:
    files = program_files()
    assert any(f.startswith("gateway/") for f in files)
    assert any(f.startswith("tools/bench/") for f in files)
    found = repeated_runs(files)
    shown = "\n".join(f"{a[0]}:{a[1]}-{a[2]} ~ {b[0]}:{b[1]}-{b[2]}" for a, b in found)
    assert not found, f"the same lines stand in two places; make them one function:\n{shown}"


BLOCK = """
async def stop(self) -> None:
    if self._task:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
    await self.flush()
"""


def test_a_planted_copy_is_found() -> None:
    # the same lines indented deeper, with a comment and a blank line in between
    moved = "\n".join("        " + line if line else "" for line in BLOCK.splitlines())
    moved = moved.replace("try:", "try:  # a comment\n")
    files = {
        "a.py": "import asyncio\n\n\nclass A:\n"
        + "\n".join("    " + x for x in BLOCK.splitlines()),
        "b.py": "import asyncio\n\n\nclass B:\n    class C:\n" + moved,
    }
    found = repeated_runs(files)
    assert len(found) == 1
    (fa, first_a, last_a), (fb, _, _) = found[0]
    assert (fa, fb) == ("a.py", "b.py")
    assert last_a - first_a + 1 == 8  # the whole block, `def` to `flush`, as one pair


def test_within_one_file_and_in_a_multi_line_string() -> None:
    sql = '"""\nSELECT a\nFROM t\nWHERE b = 1\nAND c = 2\nAND d = 3\nORDER BY a\n"""'
    src = f"X = {sql}\n\n\ndef f():\n    return 1\n\n\nY = {sql}\n"
    assert len(repeated_runs({"q.py": src})) == 1


def test_short_copies_and_same_shape_pass() -> None:
    five = "def f():\n    a = 1\n    b = 2\n    c = a + b\n    return c * 2\n"
    assert repeated_runs({"a.py": five, "b.py": five}) == []
    renamed = BLOCK.replace("_task", "_job").replace("flush", "drain")
    assert repeated_runs({"a.py": BLOCK, "b.py": renamed}) == []
    # import lists and lone brackets are not code to factor
    imports = "from x import (\n" + "".join(f"    n{i},\n" for i in range(8)) + ")\n"
    assert repeated_runs({"a.py": imports, "b.py": imports}) == []
    # nor are the fields of two row types with the same columns
    fields = "".join(f"    c{i}: int\n" for i in range(8))
    rows = {"a.py": f"class A:\n{fields}", "b.py": f"class B:\n{fields}"}
    assert repeated_runs(rows) == []
