"""A pure-Python radix tree in the style of SGLang's `radix_cache.py` (node objects, children
keyed by first token, keys as lists, split on partial match): the baseline RadixIndex is
measured against. Only match_prefix and insert, the operations the benchmark times."""

from __future__ import annotations


class _Node:
    __slots__ = ("children", "key", "last_access", "parent", "value")

    def __init__(self, key: list[int], value: int, parent: _Node | None) -> None:
        self.key = key
        self.value = value
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.last_access = 0


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PyRadix:
    def __init__(self) -> None:
        self.root = _Node([], 0, None)
        self.clock = 0
        self.size = 0

    def _split(self, node: _Node, k: int) -> _Node:
        top = _Node(node.key[:k], node.value, node.parent)
        top.last_access = node.last_access
        assert node.parent is not None
        node.parent.children[top.key[0]] = top
        node.key = node.key[k:]
        node.parent = top
        top.children[node.key[0]] = node
        return top

    def match_prefix(self, tokens: list[int]) -> int:
        self.clock += 1
        node, i = self.root, 0
        while i < len(tokens) and tokens[i] in node.children:
            child = node.children[tokens[i]]
            k = _common(child.key, tokens[i:])
            child.last_access = self.clock
            if k < len(child.key):
                node = self._split(child, k)
                i += k
                break
            node, i = child, i + k
        return i

    def insert(self, tokens: list[int], value: int) -> int:
        self.clock += 1
        node, i = self.root, 0
        while i < len(tokens) and tokens[i] in node.children:
            child = node.children[tokens[i]]
            k = _common(child.key, tokens[i:])
            child.last_access = self.clock
            if k < len(child.key):
                child = self._split(child, k)
            node, i = child, i + k
        if i < len(tokens):
            leaf = _Node(tokens[i:], value, node)
            leaf.last_access = self.clock
            node.children[tokens[i]] = leaf
            self.size += len(tokens) - i
        return i
