"""Fail when a pure core module has less than 95 % of its lines covered.

    python scripts/check_coverage.py coverage.json

Reads the JSON report of a coverage run (``pytest --cov --cov-report=json:coverage.json``, as bash scripts/test
writes it) and checks the modules whose behaviour is all pure logic, so every line of them can be reached by a
fast unit test. The whole product's gate is ``fail_under`` in pyproject.toml.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

CORE_MODULES = (
    "nexus/patterns.py",
    "nexus/events.py",
    "nexus/lifecycle.py",
    "nexus/detect.py",
    "nexus/errors.py",
    "nexus/resume.py",
)
MIN_LINE_PERCENT = 95.0


def line_percent(summary: dict[str, Any]) -> float:
    statements = int(summary["num_statements"])
    return 100.0 if statements == 0 else 100.0 * int(summary["covered_lines"]) / statements


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python scripts/check_coverage.py coverage.json", file=sys.stderr)
        return 2
    report = json.loads(Path(argv[0]).read_text())
    files: dict[str, Any] = report["files"]
    failed = False
    for module in CORE_MODULES:
        if module not in files:
            print(f"{module}: not measured", file=sys.stderr)
            failed = True
            continue
        percent = line_percent(files[module]["summary"])
        verdict = "ok" if percent >= MIN_LINE_PERCENT else f"below {MIN_LINE_PERCENT:.0f} %"
        print(f"{module}: {percent:.1f} % of lines ({verdict})")
        failed = failed or percent < MIN_LINE_PERCENT
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
