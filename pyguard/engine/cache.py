"""A token-prefix cache of key/value states: a radix tree over token ids, bounded in bytes.

The key/value cache of position p depends on nothing but tokens 0..p, so the state after any
prefix of a cached sequence can be restored exactly and a prompt only needs its tokens after the
longest cached prefix. Each node holds the cache of its edge's tokens (children share their
parent's positions, so a policy prefix is stored once for every conversation under it). When the
arrays exceed the budget, least recently used leaves go first (a parent is always used at least
as recently as its children, so the tree stays whole).
"""

from __future__ import annotations

import numpy as np

from .model import State


class _Node:
    __slots__ = ("ids", "kv", "children", "parent", "used")

    def __init__(self, ids: np.ndarray, kv: np.ndarray | None, parent: "_Node | None"):
        self.ids = ids  # int64 [n]: the edge's tokens
        self.kv = kv  # [n_layers, 2, n_kv_heads, n, head_dim]: their cache (None at the root)
        self.children: dict[int, _Node] = {}  # by first token
        self.parent = parent
        self.used = 0


def _common(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two id arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PrefixCache:
    """States of token sequences, looked up by longest common prefix; at most `budget` bytes
    of arrays (0: nothing is kept). Not thread-safe: its guard serializes calls."""

    def __init__(self, budget: int):
        self.budget = budget
        self.bytes = 0
        self._root = _Node(np.empty(0, np.int64), None, None)
        self._clock = 0

    def _walk(self, ids: np.ndarray) -> tuple[list[tuple[_Node, int]], int]:
        """(the path of (node, tokens of its edge matched) along ids' longest cached prefix,
        the last node's previous use). Only the last node may be matched in part. Marks the
        path used; insert gives the unmatched part of a split edge back its previous use."""
        self._clock += 1
        node, pos, path, before = self._root, 0, [], 0
        while pos < len(ids):
            child = node.children.get(int(ids[pos]))
            if child is None:
                break
            n = _common(child.ids, ids[pos:])
            before, child.used = child.used, self._clock
            path.append((child, n))
            pos += n
            if n < len(child.ids):
                break
            node = child
        return path, before

    def restore(self, state: State, ids: np.ndarray, limit: int) -> int:
        """Fill an empty state with the cache of ids' longest cached prefix, at most `limit`
        tokens; returns its length (the state's position)."""
        pos = 0
        for node, n in self._walk(ids)[0]:
            n = min(n, limit - pos)
            if n <= 0:
                break
            state.kv[:, :, :, pos : pos + n] = node.kv[:, :, :, :n]
            pos += n
        state.pos = pos
        return pos

    def insert(self, ids: np.ndarray, state: State) -> None:
        """Keep the state's cache of the positions of ids (a prefix of what the state holds)."""
        if self.budget <= 0:
            return
        path, before = self._walk(ids)
        pos = sum(n for _, n in path)
        if pos < len(ids):
            parent = self._root
            if path:
                parent, n = path[-1]
                if n < len(parent.ids):
                    parent = self._split(parent, n, before)
            leaf = _Node(ids[pos:].copy(), state.kv[:, :, :, pos : len(ids)].copy(), parent)
            leaf.used = self._clock
            parent.children[int(leaf.ids[0])] = leaf
            self.bytes += leaf.kv.nbytes
        self._evict()

    def _split(self, node: _Node, n: int, lower_used: int) -> _Node:
        """Cut node's edge after n tokens; returns the upper part, used now, while the lower
        part, which the request did not reach, keeps lower_used (its use before). Both parts
        are copies, so evicting one frees its memory."""
        upper = _Node(node.ids[:n].copy(), node.kv[:, :, :, :n].copy(), node.parent)
        upper.used, node.used = node.used, lower_used
        node.parent.children[int(upper.ids[0])] = upper
        node.ids, node.kv, node.parent = node.ids[n:].copy(), node.kv[:, :, :, n:].copy(), upper
        upper.children[int(node.ids[0])] = node
        return upper

    def _evict(self) -> None:
        while self.bytes > self.budget:
            leaves, stack = [], [self._root]
            while stack:
                node = stack.pop()
                stack += node.children.values()
                if not node.children and node is not self._root:
                    leaves.append(node)
            leaf = min(leaves, key=lambda x: x.used)
            del leaf.parent.children[int(leaf.ids[0])]
            self.bytes -= leaf.kv.nbytes

    def __len__(self) -> int:
        """Number of cached tokens (positions held, shared ones once)."""
        n, stack = 0, [self._root]
        while stack:
            node = stack.pop()
            n += len(node.ids)
            stack += node.children.values()
        return n
