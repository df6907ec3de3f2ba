"""RFC 9162 Merkle tree: roots, compact ranges, consistency and inclusion proofs."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from fhirvault.domain import merkle
from fhirvault.domain.merkle import CompactTree, ListSource


def leaves(n: int) -> list[bytes]:
    return [merkle.leaf_hash(b"entry-%d" % i) for i in range(n)]


def test_known_answers_from_rfc_structure() -> None:
    # Empty tree is SHA-256 of nothing; one leaf is the leaf hash; three leaves split 2 + 1.
    assert merkle.root_of([]) == hashlib.sha256(b"").digest()
    a, b, c = leaves(3)
    assert merkle.root_of([a]) == a
    assert merkle.root_of([a, b, c]) == merkle.node_hash(merkle.node_hash(a, b), c)
    # Domain separation: a leaf hash is not the hash of the raw bytes.
    assert merkle.leaf_hash(b"x") != hashlib.sha256(b"x").digest()


@given(st.integers(min_value=0, max_value=300))
def test_compact_tree_root_matches_full_computation(n: int) -> None:
    tree = CompactTree()
    ls = leaves(n)
    for leaf in ls:
        tree.append(leaf)
    assert tree.size == n
    assert tree.root() == merkle.root_of(ls)
    clone = CompactTree(tree.size, tree.stack)
    assert clone.root() == tree.root()


def test_compact_tree_reports_finished_complete_subtrees() -> None:
    ls = leaves(8)
    tree = CompactTree()
    finished = []
    for leaf in ls:
        finished += tree.append(leaf)
    assert (3, 0, merkle.root_of(ls)) in finished
    assert (1, 3, merkle.root_of(ls[6:8])) in finished
    assert (2, 1, merkle.root_of(ls[4:8])) in finished


@settings(max_examples=200)
@given(st.integers(min_value=1, max_value=600), st.data())
def test_consistency_proofs_verify_and_detect_changes(n: int, data: st.DataObject) -> None:
    m = data.draw(st.integers(min_value=1, max_value=n))
    ls = leaves(n)
    src = ListSource(ls)
    proof = merkle.consistency_proof(src, m, n)
    old_root, new_root = merkle.root_of(ls[:m]), merkle.root_of(ls)
    assert merkle.verify_consistency(m, n, old_root, new_root, proof)
    # A rewritten history (one old leaf changed) is not consistent with the old root.
    i = data.draw(st.integers(min_value=0, max_value=m - 1))
    forged = list(ls)
    forged[i] = merkle.leaf_hash(b"forged")
    forged_src = ListSource(forged)
    if m < n or proof:
        forged_proof = merkle.consistency_proof(forged_src, m, n)
        assert not merkle.verify_consistency(m, n, old_root, merkle.root_of(forged), forged_proof)
    if proof:
        bad = list(proof)
        bad[0] = merkle.leaf_hash(b"noise")
        assert not merkle.verify_consistency(m, n, old_root, new_root, bad)


@settings(max_examples=200)
@given(st.integers(min_value=1, max_value=600), st.data())
def test_inclusion_proofs(n: int, data: st.DataObject) -> None:
    i = data.draw(st.integers(min_value=0, max_value=n - 1))
    ls = leaves(n)
    root = merkle.root_of(ls)
    proof = merkle.inclusion_proof(ListSource(ls), i, n)
    assert merkle.verify_inclusion(i, n, ls[i], root, proof)
    assert not merkle.verify_inclusion(i, n, merkle.leaf_hash(b"other"), root, proof)


def test_subtree_hash_uses_stored_complete_nodes() -> None:
    ls = leaves(1024)
    stored = {(9, 0): merkle.root_of(ls[:512])}
    calls = []

    class Src(ListSource):
        def leaves(self, start: int, end: int) -> list[bytes]:
            calls.append((start, end))
            return super().leaves(start, end)

    src = Src(ls, lambda level, index: stored.get((level, index)))
    assert merkle.subtree_hash(src, 0, 1000) == merkle.root_of(ls[:1000])
    assert all(start >= 512 for start, _ in calls)  # the stored left half was not recomputed
