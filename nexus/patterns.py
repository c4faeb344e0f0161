"""Subscription patterns and the token trie that matches them. Pure: no I/O, no asyncio.

A pattern has the four tokens of an event type, where ``*`` matches one whole token and a final ``>``
matches every remaining token (one or more): ``messaging:*:v1:*``, ``places:>``, ``>``.

:class:`PatternIndex` keeps patterns in a trie keyed by token, so matching one event type visits at most
three children per level (the literal token, ``*`` and ``>``) whatever the number of subscriptions.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator
from typing import Final, Generic, TypeVar

from nexus.errors import InvalidPattern, ResourceExhausted
from nexus.events import check_token, quote

STAR: Final = "*"
REST: Final = ">"

K = TypeVar("K", bound=Hashable)


DEFAULT_MAX_PATTERNS: Final = 256
"""Patterns one subscription may follow unless configured otherwise."""


def check_pattern_count(count: int, limit: int = DEFAULT_MAX_PATTERNS) -> None:
    """Refuse ``count`` patterns for one subscription over ``limit``, before any of them is parsed or indexed."""
    if count > limit:
        raise ResourceExhausted(f"{count} patterns in one subscription, over the limit of {limit}")


def parse_pattern(text: str) -> tuple[str, ...]:
    """Split and validate a pattern; raise :class:`InvalidPattern` naming the bad token."""
    if not isinstance(text, str):
        raise InvalidPattern(f"pattern must be a string, not {type(text).__name__}")
    tokens = tuple(text.split(":", 4))
    if len(tokens) > 4:
        raise InvalidPattern(f"invalid pattern {quote(text, 60)}: more than 4 ':'-separated tokens")
    for index, token in enumerate(tokens):
        if token == REST:
            if index != len(tokens) - 1:
                raise InvalidPattern(f"invalid pattern {quote(text, 60)}: '>' may only be the last token")
            continue
        if token == STAR:
            continue
        problem = check_token(index, token)
        if problem is not None:
            raise InvalidPattern(f"invalid pattern {quote(text, 60)}: {problem} (or '*' / '>')")
    if len(tokens) < 4 and tokens[-1] != REST:
        raise InvalidPattern(
            f"invalid pattern {quote(text, 60)}: {len(tokens)} tokens; a pattern has 4 tokens "
            "<service>:<action>:v<N>:<state>, or fewer ending in '>'"
        )
    return tokens


def validate_pattern(text: str) -> str:
    """Return ``text`` if it is a valid pattern, else raise :class:`InvalidPattern`."""
    parse_pattern(text)
    return text


def pattern_matches(pattern: str, event_type: str) -> bool:
    """Whether ``event_type`` matches ``pattern`` (the reference matcher; the index agrees with it)."""
    tokens = parse_pattern(pattern)
    parts = event_type.split(":")
    for index, token in enumerate(tokens):
        if token == REST:
            return len(parts) > index
        if index >= len(parts):
            return False
        if token != STAR and token != parts[index]:
            return False
    return len(parts) == len(tokens)


class _Node(Generic[K]):
    __slots__ = ("children", "keys", "rest_keys")

    def __init__(self) -> None:
        self.children: dict[str, _Node[K]] = {}
        self.keys: dict[K, int] = {}  # keys whose pattern ends exactly here, with a reference count
        self.rest_keys: dict[K, int] = {}  # keys whose pattern ends here with '>'


class PatternIndex(Generic[K]):
    """Maps patterns to keys (subscriptions) and finds the keys an event type matches.

    The same key may be added under several patterns and the same pattern several times (reference
    counted); :meth:`match` still returns each key once.
    """

    def __init__(self) -> None:
        self._root: _Node[K] = _Node()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, pattern: str, key: K) -> None:
        """Register ``key`` under ``pattern`` (validated)."""
        tokens = parse_pattern(pattern)
        node = self._root
        for token in tokens:
            if token == REST:
                node.rest_keys[key] = node.rest_keys.get(key, 0) + 1
                self._size += 1
                return
            node = node.children.setdefault(token, _Node())
        node.keys[key] = node.keys.get(key, 0) + 1
        self._size += 1

    def remove(self, pattern: str, key: K) -> bool:
        """Unregister one ``add(pattern, key)``; return whether it was there. Prunes empty branches."""
        tokens = parse_pattern(pattern)
        path: list[tuple[_Node[K], str]] = []
        node = self._root
        for token in tokens:
            if token == REST:
                if not _decrement(node.rest_keys, key):
                    return False
                break
            child = node.children.get(token)
            if child is None:
                return False
            path.append((node, token))
            node = child
        else:
            if not _decrement(node.keys, key):
                return False
        self._size -= 1
        for parent, token in reversed(path):
            child = parent.children[token]
            if child.children or child.keys or child.rest_keys:
                break
            del parent.children[token]
        return True

    def match(self, event_type: str) -> set[K]:
        """Every key with a pattern that ``event_type`` matches."""
        found: set[K] = set()
        parts = event_type.split(":")
        self._collect(self._root, parts, 0, found)
        return found

    def _collect(self, node: _Node[K], parts: list[str], index: int, found: set[K]) -> None:
        if index == len(parts):
            found.update(node.keys)
            return
        if node.rest_keys:
            found.update(node.rest_keys)
        child = node.children.get(parts[index])
        if child is not None:
            self._collect(child, parts, index + 1, found)
        star = node.children.get(STAR)
        if star is not None:
            self._collect(star, parts, index + 1, found)

    def patterns(self) -> Iterator[tuple[str, K]]:
        """Every (pattern, key) registered, once per key and pattern."""
        yield from self._walk(self._root, [])

    def _walk(self, node: _Node[K], prefix: list[str]) -> Iterator[tuple[str, K]]:
        if prefix:
            for key in node.keys:
                yield ":".join(prefix), key
        for key in node.rest_keys:
            yield ":".join([*prefix, REST]), key
        for token, child in node.children.items():
            yield from self._walk(child, [*prefix, token])


def _decrement(counts: dict[K, int], key: K) -> bool:
    count = counts.get(key)
    if count is None:
        return False
    if count <= 1:
        del counts[key]
    else:
        counts[key] = count - 1
    return True


class PatternSet:
    """A small set of validated patterns with a matcher; for filters that belong to one client."""

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self._index: PatternIndex[str] = PatternIndex()
        self._patterns: dict[str, int] = {}
        for pattern in patterns:
            self.add(pattern)

    def add(self, pattern: str) -> None:
        """Add ``pattern`` (validated)."""
        self._index.add(pattern, pattern)
        self._patterns[pattern] = self._patterns.get(pattern, 0) + 1

    def discard(self, pattern: str) -> None:
        """Remove every copy of ``pattern``."""
        parse_pattern(pattern)
        for _ in range(self._patterns.pop(pattern, 0)):
            self._index.remove(pattern, pattern)

    def __contains__(self, pattern: object) -> bool:
        return pattern in self._patterns

    def __iter__(self) -> Iterator[str]:
        return iter(self._patterns)

    def __len__(self) -> int:
        return len(self._patterns)

    def matches(self, event_type: str) -> bool:
        """Whether any pattern matches ``event_type``."""
        return bool(self._index.match(event_type))
