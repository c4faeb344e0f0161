"""Log template mining: variable parts masked, then Drain's fixed-depth parse tree. Pure: no I/O.

**Masking.** Before mining, variable parts of a line are replaced by typed placeholders, in this order:
URLs ``<URL>``, e-mail addresses ``<EMAIL>``, UUIDs ``<UUID>``, date-times ``<TIME>`` (ISO 8601) and times
of day, MAC addresses ``<MAC>``, IPv4 addresses with an optional port and IPv6 addresses ``<IP>``, file paths
``<PATH>`` (``/var/log/x.log``, ``./run``, ``C:\\Temp``), hexadecimal numbers and long hex ids ``<HEX>``, and
numbers ``<NUM>`` (also inside identifiers: ``blk_-1608`` becomes ``blk_<NUM>``).

**Drain** (He, Zhu, Zheng, Lyu: "Drain: An Online Log Parsing Approach with Fixed Depth Tree", ICWS 2017),
as Drain3 implements it: the masked line is split on whitespace; the first tree level is the token count, the
next ``depth - 2`` levels the leading tokens (a token with a digit, or any token once a node has
``max_children`` children, goes to the wildcard child ``<*>``); a leaf holds templates. The line joins the
leaf's template with the highest similarity (the share of positions whose template token equals the line's,
wildcards not counted; ties go to the template with more wildcards) when it reaches ``similarity``, and the
positions that differ become ``<*>``; otherwise it founds a new template.

Memory: at most ``max_templates`` templates (least recently matched evicted first, and removed from the tree),
each about 100 bytes plus its tokens; lines are cut at ``max_line_chars`` characters and ``max_tokens``
tokens first. With the defaults (1,000 templates) a miner takes at most a few hundred kilobytes.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections import OrderedDict
from collections.abc import Iterable
from typing import Final

WILDCARD: Final = "<*>"

_MASKS: Final[tuple[tuple[re.Pattern[str], str], ...]] = tuple(
    (re.compile(pattern), placeholder)
    for pattern, placeholder in (
        # Bounded repetitions before a literal keep every pattern linear on hostile lines ("a-a-a-...").
        (r"\b[A-Za-z][A-Za-z0-9+.\-]{0,31}://[^\s\"'<>]+", "<URL>"),
        (r"\b[\w.+\-]{1,64}@[A-Za-z0-9\-]{1,63}(?:\.[A-Za-z0-9\-]{1,63}){1,8}\b", "<EMAIL>"),
        (r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b", "<UUID>"),
        (
            r"\b\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?)?(?:Z|[+\-]\d{2}:?\d{2})?(?![\w:])",
            "<TIME>",
        ),
        (r"(?<![\w:.])\d{1,2}:\d{2}(?::\d{2})?(?:[.,]\d+)?(?![\w:])", "<TIME>"),
        (r"(?<![\w:\-])(?:[0-9A-Fa-f]{2}[:\-]){5}[0-9A-Fa-f]{2}(?![\w:\-])", "<MAC>"),
        (r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?::\d{1,5})?(?![\w.])", "<IP>"),
        (
            r"(?<![\w:])(?:(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}"
            r"|(?:[0-9A-Fa-f]{1,4}:){1,6}(?::[0-9A-Fa-f]{1,4}){1,6}"
            r"|(?:[0-9A-Fa-f]{1,4}:){1,7}:|::(?:[0-9A-Fa-f]{1,4}:){0,6}[0-9A-Fa-f]{1,4})(?![\w:])",
            "<IP>",
        ),
        (r"(?<![\w/.:<>])(?:\.{1,2}|~)?(?:/[\w.@%+~\-]+)+/?", "<PATH>"),
        (r"\b[A-Za-z]:\\[^\s\"']*", "<PATH>"),
        (r"\b0[xX][0-9a-fA-F]+\b", "<HEX>"),
        (r"\b(?=[a-fA-F]*\d)(?=\d*[a-fA-F])[0-9a-fA-F]{8,}\b", "<HEX>"),
        (r"(?:(?<![\w.])[+\-])?\d+(?:\.\d+)*", "<NUM>"),
    )
)


def mask(line: str) -> str:
    """``line`` with its variable parts replaced by ``<URL>``, ``<IP>``, ``<NUM>``, ... placeholders."""
    for pattern, placeholder in _MASKS:
        line = pattern.sub(placeholder, line)
    return line


def _has_digit(token: str) -> bool:
    return any(ch.isdigit() for ch in token)


@dataclasses.dataclass(slots=True)
class Template:
    """One mined template: its id, its tokens (``<*>`` for parameters) and how many lines matched it."""

    template_id: int
    tokens: list[str]
    size: int = 1
    path: tuple[str, ...] = ()
    """The tree keys leading to the leaf that holds it (fixed when the template was created)."""

    @property
    def text(self) -> str:
        return " ".join(self.tokens)


@dataclasses.dataclass(slots=True)
class Match:
    """The result of mining one line."""

    template: Template
    created: bool
    """True when the line founded a new template."""
    changed: bool
    """True when the line generalised an existing template."""


class _Node:
    __slots__ = ("children", "template_ids")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.template_ids: list[int] = []


class Drain:
    """Drain's online parse tree over masked lines.

    ``depth`` (>= 3) counts the root and the length level; ``similarity`` (0..1) is the threshold to join a
    template; ``max_children`` bounds a node's children; ``max_templates`` bounds memory (LRU).
    """

    def __init__(
        self,
        *,
        depth: int = 4,
        similarity: float = 0.4,
        max_children: int = 100,
        max_templates: int = 1000,
        max_line_chars: int = 10_000,
        max_tokens: int = 256,
    ) -> None:
        if depth < 3:
            raise ValueError(f"depth must be at least 3, got {depth}")
        if not 0.0 <= similarity <= 1.0:
            raise ValueError(f"similarity must be from 0 to 1, got {similarity}")
        if max_children < 2:
            raise ValueError(f"max_children must be at least 2, got {max_children}")
        if max_templates < 1:
            raise ValueError(f"max_templates must be at least 1, got {max_templates}")
        self.max_node_depth = depth - 2
        self.similarity = similarity
        self.max_children = max_children
        self.max_templates = max_templates
        self.max_line_chars = max_line_chars
        self.max_tokens = max_tokens
        self._root = _Node()
        self._templates: OrderedDict[int, Template] = OrderedDict()
        self._next_id = 1

    def __len__(self) -> int:
        return len(self._templates)

    @property
    def templates(self) -> Iterable[Template]:
        """Every template, least recently matched first."""
        return self._templates.values()

    def get(self, template_id: int) -> Template | None:
        """The template with this id, if still kept."""
        return self._templates.get(template_id)

    def tokenize(self, line: str) -> list[str]:
        """The masked tokens of a line, cut to ``max_line_chars`` and ``max_tokens``."""
        tokens = mask(line[: self.max_line_chars]).split()
        if len(tokens) > self.max_tokens:
            tokens = [*tokens[: self.max_tokens - 1], WILDCARD]
        return tokens

    def add(self, line: str) -> Match:
        """Mine one line: the template it joins (generalising it when needed) or founds."""
        tokens = self.tokenize(line)
        template = self._tree_search(tokens)
        if template is None:
            template = Template(self._next_id, tokens)
            self._next_id += 1
            self._templates[template.template_id] = template
            self._add_to_tree(template)
            while len(self._templates) > self.max_templates:
                _, evicted = self._templates.popitem(last=False)
                self._remove_from_tree(evicted)
            return Match(template, created=True, changed=False)
        self._templates.move_to_end(template.template_id)
        template.size += 1
        merged = [old if old == new else WILDCARD for old, new in zip(template.tokens, tokens, strict=True)]
        changed = merged != template.tokens
        if changed:
            template.tokens = merged
        return Match(template, created=False, changed=changed)

    def match(self, line: str) -> Template | None:
        """The template a line would join, without learning from it."""
        return self._tree_search(self.tokenize(line))

    # --- the tree -----------------------------------------------------------------------------------------

    def _tree_search(self, tokens: list[str]) -> Template | None:
        node = self._root.children.get(str(len(tokens)))
        if node is None:
            return None
        depth = 1
        for token in tokens:
            if depth >= self.max_node_depth or depth == len(tokens):
                break
            child = node.children.get(token)
            if child is None:
                child = node.children.get(WILDCARD)
            if child is None:
                return None
            node = child
            depth += 1
        return self._fast_match(node.template_ids, tokens)

    def _fast_match(self, template_ids: list[int], tokens: list[str]) -> Template | None:
        best: Template | None = None
        best_similarity = -1.0
        best_params = -1
        for template_id in template_ids:
            template = self._templates.get(template_id)
            if template is None:
                continue
            similarity, params = _similarity(template.tokens, tokens)
            if similarity > best_similarity or (similarity == best_similarity and params > best_params):
                best, best_similarity, best_params = template, similarity, params
        if best is not None and best_similarity >= self.similarity:
            return best
        return None

    def _add_to_tree(self, template: Template) -> None:
        length_key = str(len(template.tokens))
        node = self._root.children.setdefault(length_key, _Node())
        path = [length_key]
        depth = 1
        for token in template.tokens:
            if depth >= self.max_node_depth or depth >= len(template.tokens):
                break
            if token in node.children:
                key = token
            elif _has_digit(token):
                key = WILDCARD
            elif WILDCARD in node.children:
                key = token if len(node.children) < self.max_children else WILDCARD
            elif len(node.children) + 1 < self.max_children:
                key = token
            else:
                key = WILDCARD
            node = node.children.setdefault(key, _Node())
            path.append(key)
            depth += 1
        node.template_ids = [tid for tid in node.template_ids if tid in self._templates]
        node.template_ids.append(template.template_id)
        template.path = tuple(path)

    def _remove_from_tree(self, template: Template) -> None:
        nodes = [self._root]
        for key in template.path:
            child = nodes[-1].children.get(key)
            if child is None:
                return
            nodes.append(child)
        leaf = nodes[-1]
        if template.template_id in leaf.template_ids:
            leaf.template_ids.remove(template.template_id)
        for parent, key, node in zip(reversed(nodes[:-1]), reversed(template.path), reversed(nodes[1:]), strict=True):
            if node.children or node.template_ids:
                break
            del parent.children[key]


def _similarity(template: list[str], tokens: list[str]) -> tuple[float, int]:
    """Drain's sequence similarity: equal non-wildcard positions over the length, and the wildcard count."""
    if not template:
        return 1.0, 0
    params = template.count(WILDCARD)
    same = sum(map(operator.eq, template, tokens))  # in C: this loop runs for every template of a leaf
    if params and WILDCARD in tokens:
        same -= sum(1 for expected, token in zip(template, tokens, strict=True) if expected == token == WILDCARD)
    return same / len(template), params
