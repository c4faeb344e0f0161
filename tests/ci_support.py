"""Whether the suite runs in CI, where a test may not be skipped for want of a tool (one rule for every test)."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """True when ``CI`` is set to anything but empty, ``0`` or ``false`` (CI systems set ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test, or fail it in CI (CI runs every test: a missing tool must not silently vanish there)."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set, so this test may not be skipped: bash scripts/test installs it)")
    pytest.skip(reason)
