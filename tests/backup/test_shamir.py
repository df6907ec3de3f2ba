"""Shamir M-of-N over GF(256): any M shares rebuild the secret, fewer do not."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhirvault.backup import shamir


@st.composite
def splits(draw: st.DrawFn) -> tuple[bytes, int, int, list[tuple[int, bytes]]]:
    secret = draw(st.binary(min_size=1, max_size=64))
    n = draw(st.integers(min_value=2, max_value=8))
    m = draw(st.integers(min_value=2, max_value=n))
    return secret, m, n, shamir.split(secret, m, n)


@settings(max_examples=200, deadline=None)
@given(splits(), st.randoms(use_true_random=False))
def test_any_threshold_shares_rebuild_the_secret(case: tuple[bytes, int, int, list[tuple[int, bytes]]],
                                                  rnd: object) -> None:
    secret, m, n, shares = case
    assert len(shares) == n and {x for x, _ in shares} == set(range(1, n + 1))
    chosen = rnd.sample(shares, rnd.randint(m, n))  # type: ignore[attr-defined]
    assert shamir.combine(chosen) == secret


@settings(max_examples=200, deadline=None)
@given(splits())
def test_fewer_shares_do_not_give_the_secret(case: tuple[bytes, int, int, list[tuple[int, bytes]]]) -> None:
    secret, m, _, shares = case
    if len(secret) < 8:  # a short secret can be hit by chance
        return
    for subset in itertools.combinations(shares, m - 1):
        if len(subset) >= 1:
            assert shamir.combine(list(subset)) != secret


@settings(max_examples=100, deadline=None)
@given(splits(), st.integers(min_value=0, max_value=63), st.integers(min_value=1, max_value=255))
def test_a_corrupted_share_gives_a_different_secret(case: tuple[bytes, int, int, list[tuple[int, bytes]]],
                                                    pos: int, flip: int) -> None:
    secret, m, _, shares = case
    x, data = shares[0]
    bad = bytearray(data)
    bad[pos % len(bad)] ^= flip
    assert shamir.combine([(x, bytes(bad)), *shares[1:m]]) != secret


def test_single_share_reveals_nothing_about_a_byte() -> None:
    # With threshold 2, share 1's first byte is uniform whatever the secret: count over many splits.
    counts = [0] * 256
    for _ in range(20_000):
        counts[shamir.split(b"\x00", 2, 2)[0][1][0]] += 1
    assert min(counts) > 20 and max(counts) < 140


def test_bad_parameters_and_duplicates_are_refused() -> None:
    with pytest.raises(ValueError):
        shamir.split(b"k", 1, 3)
    with pytest.raises(ValueError):
        shamir.split(b"k", 4, 3)
    shares = shamir.split(b"key", 2, 3)
    with pytest.raises(ValueError, match="distinct"):
        shamir.combine([shares[0], shares[0]])
