"""Packaging: every package directory installs, inside the nexus namespace."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROOTS = {"nexus": "nexus", "gateway": "nexus.gateway", "handlers": "nexus.handlers"}


def _package_dirs() -> set[str]:
    found = set()
    for folder, dotted in ROOTS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((dotted, *relative)))
    return found


def test_every_package_directory_is_listed_for_installation() -> None:
    """A package directory missing from pyproject.toml would work in a checkout and vanish from a wheel."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    assert _package_dirs() == listed


def test_gateway_and_handlers_install_inside_the_nexus_namespace() -> None:
    """Nothing named 'gateway' or 'handlers' lands at the top of site-packages."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["setuptools"]["package-dir"] == {
        "nexus.gateway": "gateway",
        "nexus.handlers": "handlers",
    }
    import nexus.gateway
    import nexus.handlers

    assert Path(nexus.gateway.__file__).parent == ROOT / "gateway"
    assert Path(nexus.handlers.__file__).parent == ROOT / "handlers"
