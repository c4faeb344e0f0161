"""Node.js for tests: the ``node`` binary and the npm packages ``scripts/test`` installs into node_modules.

Without them a test is skipped, or fails when ``CI`` is set (the cross-language checks must not vanish there).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from nats_support import unavailable

REPO = Path(__file__).resolve().parents[1]


def node_with(*packages: str) -> str:
    """The path of ``node``, once it and every npm package in ``packages`` are installed."""
    node = shutil.which("node")
    if node is None:
        unavailable("node is not installed: the cross-language checks need Node.js")
    for package in packages:
        if not (REPO / "node_modules" / package / "package.json").is_file():
            unavailable(f"{package} is missing from node_modules: run 'npm ci' in {REPO}")
    return node
