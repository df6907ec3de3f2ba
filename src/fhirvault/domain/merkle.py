"""Merkle tree hashing, RFC 9162 (Certificate Transparency v2) §2.1.

Leaves are hashed as SHA-256(0x00 || data) and interior nodes as
SHA-256(0x01 || left || right), so a leaf can never pass for a node. The tree
over n leaves splits at the largest power of two below n; every node therefore
covers a range ``[i·2^k, min((i+1)·2^k, n))``, and the hashes of *complete*
aligned subtrees never change once written. That is what lets the log keep
those hashes (``NodeCache``) and build proofs without rereading every leaf.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Protocol

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below n (n ≥ 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class CompactTree:
    """The right edge of a growing tree: one hash per set bit of its size.

    Appending is O(1) amortised and computing the root O(log n), so the log can
    follow millions of entries in constant memory.
    """

    __slots__ = ("_stack", "size")

    def __init__(self, size: int = 0, stack: Sequence[bytes] = ()) -> None:
        # _stack[i] is the root of a complete subtree; sizes strictly decrease, and they
        # are the powers of two of the binary expansion of ``size``.
        if len(stack) != bin(size).count("1"):
            raise ValueError("compact range does not match the tree size")
        self.size = size
        self._stack = list(stack)

    def append(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        """Add a leaf hash; return the complete subtrees it finished as (level, index, hash)."""
        finished: list[tuple[int, int, bytes]] = []
        node = leaf
        level = 0
        index = self.size
        self.size += 1
        # Each trailing 1 bit of the old size is a subtree of that level to merge with.
        while index & 1:
            node = node_hash(self._stack.pop(), node)
            level += 1
            index >>= 1
            finished.append((level, index, node))
        self._stack.append(node)
        return finished

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        node = self._stack[-1]
        for left in reversed(self._stack[:-1]):
            node = node_hash(left, node)
        return node

    @property
    def stack(self) -> tuple[bytes, ...]:
        return tuple(self._stack)

    def copy(self) -> CompactTree:
        return CompactTree(self.size, self._stack)


class NodeSource(Protocol):
    def leaves(self, start: int, end: int) -> list[bytes]:
        """Leaf hashes of entries [start, end)."""

    def complete(self, level: int, index: int) -> bytes | None:
        """The stored hash of the complete subtree covering [index·2^level, (index+1)·2^level), if kept."""


def subtree_hash(source: NodeSource, start: int, end: int) -> bytes:
    """MTH of leaves [start, end), a node of some tree (start is a multiple of the split size)."""
    n = end - start
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return source.leaves(start, end)[0]
    if n & (n - 1) == 0 and start % n == 0:
        stored = source.complete(n.bit_length() - 1, start // n)
        if stored is not None:
            return stored
        if n <= 256:  # small enough: hash the leaves directly
            return _mth(source.leaves(start, end))
    k = _split(n)
    return node_hash(subtree_hash(source, start, start + k), subtree_hash(source, start + k, end))


def _mth(leaves: Sequence[bytes]) -> bytes:
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return node_hash(_mth(leaves[:k]), _mth(leaves[k:]))


def root_of(leaves: Sequence[bytes]) -> bytes:
    """MTH of a list of leaf hashes (for tests and small trees)."""
    return _mth(leaves) if leaves else EMPTY_ROOT


def consistency_proof(source: NodeSource, old_size: int, new_size: int) -> list[bytes]:
    """RFC 9162 §2.1.4.1: proof that the tree of ``old_size`` is a prefix of the one of ``new_size``."""
    if not 0 < old_size <= new_size:
        raise ValueError("consistency proofs need 0 < old_size <= new_size")

    def sub(m: int, start: int, end: int, whole: bool) -> list[bytes]:
        n = end - start
        if m == n:
            return [] if whole else [subtree_hash(source, start, end)]
        k = _split(n)
        if m <= k:
            return [*sub(m, start, start + k, whole), subtree_hash(source, start + k, end)]
        return [*sub(m - k, start + k, end, False), subtree_hash(source, start, start + k)]

    return sub(old_size, 0, new_size, True)


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> bool:
    """RFC 9162 §2.1.4.2."""
    if old_size > new_size or old_size <= 0:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # an exact power of two: the old root is a node of the new tree
        path.insert(0, old_root)
    if not path:
        return False
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root


def inclusion_proof(source: NodeSource, index: int, size: int) -> list[bytes]:
    """RFC 9162 §2.1.3.1: the audit path of leaf ``index`` in the tree of ``size``."""
    if not 0 <= index < size:
        raise ValueError("leaf index outside the tree")
    path: list[bytes] = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            path.append(subtree_hash(source, start + k, end))
            end = start + k
        else:
            path.append(subtree_hash(source, start, start + k))
            start += k
    path.reverse()
    return path


def verify_inclusion(index: int, size: int, leaf: bytes, root: bytes, proof: Sequence[bytes]) -> bool:
    """RFC 9162 §2.1.3.2."""
    if not 0 <= index < size:
        return False
    fn, sn = index, size - 1
    r = leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


class ListSource:
    """NodeSource over an in-memory list of leaf hashes (tests, small logs)."""

    def __init__(self, leaves: Sequence[bytes], complete: Callable[[int, int], bytes | None] | None = None) -> None:
        self._leaves = leaves
        self._complete = complete

    def leaves(self, start: int, end: int) -> list[bytes]:
        return list(self._leaves[start:end])

    def complete(self, level: int, index: int) -> bytes | None:
        return self._complete(level, index) if self._complete else None
