"""Node.js for the tests that check Nexus against JavaScript tools (``tests/node/*.mjs``, the TypeScript worker,
packages from npm installed by ``scripts/test`` into ``node_modules``).

Without ``node`` or a package a test is skipped, except with ``CI`` set, where it fails: the check must not
silently vanish there.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from nats_support import unavailable

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "node"


def node_with(*packages: str) -> str:
    """The path of ``node``, once it and every npm package in ``packages`` are installed."""
    node = shutil.which("node")
    if node is None:
        unavailable("node is not installed: this check needs Node.js")
    for package in packages:
        if not (REPO / "node_modules" / package / "package.json").is_file():
            unavailable(f"{package} is missing from node_modules: run 'npm ci' in {REPO}")
    return node


async def run_script(node: str, script: str, *args: str, limit_s: float = 60.0) -> tuple[int, str, str]:
    """Run ``tests/node/<script>`` with ``args`` without blocking the event loop: exit code, stdout, stderr.
    ``limit_s`` only guards against a stuck process."""
    process = await asyncio.create_subprocess_exec(
        node,
        str(SCRIPTS / script),
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), limit_s)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()
