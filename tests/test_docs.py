"""The documents point at things that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = re.compile(r"`(test_\w+\.py)(?:::(test_\w+))?`")
"""A test named in backquotes: ``file::function`` (a file alone is refused: it proves nothing in particular)."""


def test_every_guarantee_names_test_functions_that_exist() -> None:
    """Each test named in docs/guarantees.md is a function (file::test) defined in the test file it names."""
    text = (ROOT / "docs" / "guarantees.md").read_text()
    references = REFERENCE.findall(text)
    assert len(references) > 30
    missing = []
    for filename, function in references:
        path = ROOT / "tests" / filename
        if not function:
            missing.append(f"{filename} (name the test functions, not the file)")
        elif not path.exists():
            missing.append(filename)
        elif not re.search(rf"^(?:async )?def {function}\(", path.read_text(), re.MULTILINE):
            missing.append(f"{filename}::{function}")
    assert missing == []


def test_every_guarantee_bullet_is_backed_by_a_test() -> None:
    """Every statement (bullet) in docs/guarantees.md names at least one test function."""
    text = (ROOT / "docs" / "guarantees.md").read_text()
    bullets = re.split(r"\n- ", text.split("\n## ", 1)[1])
    unbacked = [b.splitlines()[0] for b in bullets[1:] if not any(f for _, f in REFERENCE.findall(b))]
    assert unbacked == []


def test_readme_starts_with_the_two_setup_commands() -> None:
    """The README opens with the serve command and the test command that .ci/run calls."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2
    assert block[0].endswith("nexus serve")
    assert block[1] == "bash scripts/test"
    assert "bash scripts/test" in (ROOT / ".ci" / "run").read_text()


def test_no_file_refers_to_a_design_document_the_repository_lacks() -> None:
    """Docs, code and comments stand alone: none cites a design document (by file name or section) not shipped."""
    name = "DESIGN"
    assert not (ROOT / f"{name}.md").exists()
    pattern = re.compile(rf"{name}(?:\.md|\s*§)")
    folders = ("docs", "nexus", "gateway", "handlers", "tests", "benchmarks", "scripts", "protos")
    files = [ROOT / "README.md"] + [
        path
        for folder in folders
        for path in (ROOT / folder).rglob("*")
        if path.suffix in {".md", ".py", ".proto", ".js", ".html", ".toml"} and ".venv" not in path.parts
    ]
    offenders = [str(path.relative_to(ROOT)) for path in files if pattern.search(path.read_text(errors="replace"))]
    assert offenders == []
