"""The built-in plugins (``handlers/``) use only what a third-party plugin can, and keep no module-level state.

Every module under ``handlers/`` is parsed with :mod:`ast` (nothing is imported) and checked against two rules.

Imports. From Nexus a plugin imports only the public top-level package: ``import nexus`` or ``from nexus import
NAME`` with NAME in ``nexus.__all__`` (so not a submodule such as ``from nexus import provider``). ``import
nexus.x`` and ``from nexus.x import ...`` are refused, ``nexus.handlers.*`` included. A relative import must stay
inside the module's own plugin package (``from .windows import Engine``); one that climbs out of it (``from
..settings import ...``, ``from ..places import ...``) is refused: a third-party plugin has no such neighbours.
Anything else (the standard library, numpy, scipy, anyio...) is the plugin's business.

Module-level state. State belongs to the objects the provider owns (handler instances, ``ctx.shared``), never to
a module, where two servers in one process would share it. Refused:

- a ``global`` statement anywhere (a function rebinding module state);
- a module-level name that is not a constant by its name (UPPER_CASE) or by its annotation (``Final``) bound to
  a container display or comprehension (``{...}``, ``[...]``, ``{x, ...}``) or to the result of any call (which
  may return anything mutable: ``registry = dict()``, ``log = make_logger()``); names bound to literals, other
  names, attributes and type expressions are fine;
- mutating a module-level name anywhere in its module, whatever its name: item assignment or deletion
  (``NAME[k] = v``, ``del NAME[k]``), attribute assignment (``NAME.x = v``) or a call of a mutating method
  (``NAME.append(...)``, ``update``, ``setdefault``, ``add``, ``pop``, ``clear``...). A function whose own local
  variable has the same name is not looking at the module's;
- a class attribute bound to a mutable container display or comprehension (one object shared by every
  instance: a registry in disguise).

So a constant schema dict (``_MESSAGE_PROPERTIES = {...}``) passes as long as nothing in its module writes to
it. What the rules cannot see: a module-level container handed to another module, or mutated through an alias.
Those would need running the code; the rules catch every way the built-in plugins ever kept state (a registry
keyed by bus epoch, mutated in place), and fail loudly on the next one.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

import nexus

HANDLERS: Final = Path(__file__).resolve().parent.parent / "handlers"
MUTATORS: Final = frozenset(
    {
        "append",
        "appendleft",
        "extend",
        "extendleft",
        "insert",
        "remove",
        "pop",
        "popleft",
        "popitem",
        "clear",
        "update",
        "setdefault",
        "add",
        "discard",
        "difference_update",
        "intersection_update",
        "symmetric_difference_update",
        "sort",
        "reverse",
        "rotate",
    }
)
CONTAINERS: Final = (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)


def modules() -> list[Path]:
    return sorted(HANDLERS.rglob("*.py"))


def _plugin_package(path: Path) -> tuple[str, ...]:
    """``("handlers", "<plugin>")`` for a module inside a plugin, ``("handlers",)`` for handlers/ itself."""
    parts = path.relative_to(HANDLERS.parent).with_suffix("").parts
    return parts[:2] if len(parts) > 2 else parts[:1]


def _package_of(path: Path) -> tuple[str, ...]:
    """The package a module's ``from . import`` refers to (for ``__init__.py``, the package itself)."""
    return path.relative_to(HANDLERS.parent).with_suffix("").parts[:-1]


def import_problems(tree: ast.Module, path: Path) -> Iterator[str]:
    """Imports that a third-party plugin could not make (see the module docstring)."""
    public = set(nexus.__all__)
    plugin = _plugin_package(path)
    package = _package_of(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("nexus."):
                    yield f"line {node.lineno}: import {alias.name} (only the top-level nexus is public)"
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                module = node.module or ""
                if module.startswith("nexus."):
                    yield f"line {node.lineno}: from {module} import ... (only the top-level nexus is public)"
                elif module == "nexus":
                    for alias in node.names:
                        if alias.name not in public:
                            yield f"line {node.lineno}: from nexus import {alias.name} (not in nexus.__all__)"
                continue
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = base + tuple((node.module or "").split(".")) if node.module else base
            if len(plugin) < 2 or target[: len(plugin)] != plugin:
                dots = "." * node.level
                yield f"line {node.lineno}: from {dots}{node.module or ''} import ... leaves the plugin's package"


def _constant_name(name: str) -> bool:
    return name.isupper() or name.strip("_") == ""


def _is_final(annotation: ast.expr | None) -> bool:
    if annotation is None:
        return False
    if isinstance(annotation, ast.Subscript):
        annotation = annotation.value
    return (isinstance(annotation, ast.Name) and annotation.id == "Final") or (
        isinstance(annotation, ast.Attribute) and annotation.attr == "Final"
    )


def _top_level(tree: ast.Module) -> Iterator[ast.stmt]:
    """Module-level statements, including those inside module-level if / try / with blocks."""
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop(0)
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []):
                    if isinstance(child, ast.ExceptHandler):
                        pending.extend(child.body)
                    else:
                        pending.append(child)


def _bindings(node: ast.stmt) -> Iterator[tuple[str, ast.expr | None, ast.expr | None]]:
    """``(name, value, annotation)`` of each plain name a module-level assignment binds."""
    if isinstance(node, ast.Assign):
        for target in node.targets:
            for name in ast.walk(target):
                if isinstance(name, ast.Name):
                    yield name.id, node.value, None
    elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        yield node.target.id, node.value, node.annotation


def _locals(function: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> set[str]:
    """Names a function binds itself (its parameters and assignments), which hide module-level ones."""
    names = {arg.arg for arg in ast.walk(function.args) if isinstance(arg, ast.arg)}
    body = function.body if isinstance(function.body, list) else [function.body]
    for statement in body:
        for node in ast.walk(statement):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return names


def _mutated_name(node: ast.AST) -> tuple[str, str] | None:
    """``(name, how)`` when ``node`` mutates the object a plain name refers to."""
    targets: list[ast.expr] = []
    if isinstance(node, (ast.Assign, ast.Delete)):
        targets = list(node.targets)
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        targets = [node.target]
    for target in targets:
        if isinstance(target, (ast.Subscript, ast.Attribute)) and isinstance(target.value, ast.Name):
            kind = "item" if isinstance(target, ast.Subscript) else "attribute"
            verb = "deleted" if isinstance(node, ast.Delete) else "assigned"
            return target.value.id, f"{kind} {verb}"
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in MUTATORS
        and isinstance(node.func.value, ast.Name)
    ):
        return node.func.value.id, f".{node.func.attr}() called"
    return None


def _mutations(tree: ast.Module, names: set[str]) -> Iterator[tuple[int, str, str]]:
    """Mutations of module-level ``names``, skipping functions where a local variable hides the name."""

    def visit(node: ast.AST, hidden: frozenset[str]) -> Iterator[tuple[int, str, str]]:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            hidden = hidden | _locals(node)
        found = _mutated_name(node)
        if found is not None and found[0] in names and found[0] not in hidden:
            yield getattr(node, "lineno", 0), found[0], found[1]
        for child in ast.iter_child_nodes(node):
            yield from visit(child, hidden)

    yield from visit(tree, frozenset())


def state_problems(tree: ast.Module) -> Iterator[str]:
    """Module-level mutable state (see the module docstring)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            yield f"line {node.lineno}: global {', '.join(node.names)}"
    variables: set[str] = set()
    for statement in _top_level(tree):
        for name, value, annotation in _bindings(statement):
            variables.add(name)
            if value is None or _constant_name(name) or _is_final(annotation):
                continue
            if isinstance(value, (*CONTAINERS, ast.Call)):
                yield f"line {statement.lineno}: module-level {name} = {ast.unparse(value)[:40]} is not a constant"
        if isinstance(statement, ast.ClassDef):
            for item in statement.body:
                for name, value, _ in _bindings(item):
                    if isinstance(value, CONTAINERS):
                        yield f"line {item.lineno}: class attribute {statement.name}.{name} is a mutable container"
    for line, name, how in _mutations(tree, variables):
        yield f"line {line}: module-level {name} mutated ({how})"


def problems(source: str, path: Path) -> list[str]:
    tree = ast.parse(source, filename=str(path))
    return [*import_problems(tree, path), *state_problems(tree)]


@pytest.mark.parametrize("path", modules(), ids=lambda path: str(path.relative_to(HANDLERS)))
def test_a_built_in_plugin_module_uses_only_the_public_api_and_keeps_no_module_state(path: Path) -> None:
    """Each module under handlers/ imports only nexus's public API and its own package, and keeps no state."""
    assert problems(path.read_text(), path) == []


def test_every_plugin_is_checked() -> None:
    """The four built-in plugins and their declarations are among the modules checked."""
    checked = {path.relative_to(HANDLERS).as_posix() for path in modules()}
    for plugin in ("analytics", "anomalies", "messaging", "places"):
        assert {f"{plugin}/plugin.py", f"{plugin}/specs.py"} <= checked


PLANTED = """
import nexus.provider
from nexus import Event, events
from nexus.bus.memory import MemoryBus
from ..settings import read_int
from .windows import Engine
from . import specs

_ENGINES: dict[str, object] = {}
registry = {}
log = make_logger()
LIMIT = 10
COLUMNS: Final = [1, 2]
alias = Engine

def acquire(key, engine):
    _ENGINES[key] = engine
    COLUMNS.append(3)

def release(key):
    del _ENGINES[key]

def shadowed():
    registry = {}
    registry["a"] = 1

def rebind():
    global LIMIT
    LIMIT = 11

class Handler:
    listeners = {}
    emits = (1, 2)
"""


def test_the_rules_catch_planted_violations() -> None:
    """Each kind of violation is reported with its line; allowed forms (constants, own package) are not."""
    found = problems(PLANTED, HANDLERS / "analytics" / "plugin.py")
    assert found == [
        "line 2: import nexus.provider (only the top-level nexus is public)",
        "line 3: from nexus import events (not in nexus.__all__)",
        "line 4: from nexus.bus.memory import ... (only the top-level nexus is public)",
        "line 5: from ..settings import ... leaves the plugin's package",
        "line 28: global LIMIT",
        "line 10: module-level registry = {} is not a constant",
        "line 11: module-level log = make_logger() is not a constant",
        "line 32: class attribute Handler.listeners is a mutable container",
        "line 17: module-level _ENGINES mutated (item assigned)",
        "line 18: module-level COLUMNS mutated (.append() called)",
        "line 21: module-level _ENGINES mutated (item deleted)",
    ]
