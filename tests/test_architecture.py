"""The layering docs/architecture.md describes, checked from the source: who may import whom, no import circles,
and one exception tree.

Imports are read with ``ast`` from every module, including those under ``if TYPE_CHECKING:`` and inside
functions: a circle that only type checking or a late import hides is still a circle.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import nexus
from nexus.errors import NexusError

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"nexus": ROOT / "nexus", "nexus.gateway": ROOT / "gateway", "nexus.handlers": ROOT / "handlers"}
BUS_IMPLEMENTATIONS = ("nexus.bus.memory", "nexus.bus.nats")


def module_files() -> dict[str, Path]:
    """Every module of the installed tree, by its dotted name (``gateway/x.py`` is ``nexus.gateway.x``)."""
    found: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            if "v1" in path.relative_to(folder).parts[:1] and package == "nexus":
                continue  # generated stubs
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if package == "nexus" and parts[:1] in (["gateway"], ["handlers"]):
                continue
            found[name] = path
    return found


MODULES = module_files()


def imports_of(name: str) -> set[str]:
    """The nexus modules ``name`` imports (absolute and relative, at any depth of the file)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module]
            targets += [f"{module}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def test_the_module_list_sees_the_tree() -> None:
    """The checks below read every layer (a guard against a list that silently finds nothing)."""
    for expected in ("nexus.node", "nexus.bus.nats", "nexus.gateway.link", "nexus.handlers.places.plugin"):
        assert expected in MODULES


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("nexus.gateway")))
def test_the_gateway_adapts_a_node_only(name: str) -> None:
    """No gateway module imports the provider, the gRPC adapter or a bus implementation."""
    forbidden = [
        target
        for target in GRAPH[name]
        if target in ("nexus.provider", "nexus.node_local")
        or target.startswith(("nexus.grpc", *BUS_IMPLEMENTATIONS))
    ]
    assert forbidden == []


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("nexus.grpc")))
def test_the_grpc_adapter_adapts_a_node_only(name: str) -> None:
    """The gRPC servicer and its conversions import neither the provider nor a bus implementation."""
    assert [t for t in GRAPH[name] if t == "nexus.provider" or t.startswith(BUS_IMPLEMENTATIONS)] == []


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("nexus.bus")))
def test_buses_do_not_read_the_application_settings(name: str) -> None:
    """Nothing under nexus/bus/ imports nexus.config (a bus takes its own settings object)."""
    assert "nexus.config" not in GRAPH[name]


def test_the_core_never_imports_an_adapter() -> None:
    """The pure core (grammar, patterns, detection, lifecycle, history, resume points, errors) imports no I/O
    layer."""
    core = (
        "nexus.events",
        "nexus.patterns",
        "nexus.detect",
        "nexus.lifecycle",
        "nexus.history",
        "nexus.resume",
        "nexus.errors",
    )
    for name in core:
        assert not {t for t in GRAPH[name] if t.startswith(("nexus.grpc", "nexus.gateway", "nexus.bus"))}, name


def _cycles() -> list[list[str]]:
    """Every import circle among nexus's own modules (one path per circle found by a depth-first search)."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
    return cycles


def test_no_import_circles() -> None:
    """No module imports one that imports it back, however many steps away (TYPE_CHECKING imports count)."""
    circles = [c for c in _cycles() if not (len(c) == 2 and c[0] == "nexus" and c[1].startswith("nexus."))]
    assert circles == []


def test_every_exception_is_a_nexus_error() -> None:
    """Every exception class Nexus defines is in the NexusError tree, so one table maps each to a status."""
    outside = []
    for info in pkgutil.walk_packages(nexus.__path__, "nexus."):
        if info.name.startswith(("nexus.v1", "nexus.handlers", "nexus.gateway")):
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, BaseException) and not issubclass(cls, NexusError):
                outside.append(f"{module.__name__}.{cls.__name__}")
    assert outside == []
