from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fhirvault.services.crypto import Aead, DecryptionError, associated_data, derive_key, new_key

KEY = new_key()
AEAD = Aead(KEY)
ad_parts = st.lists(st.one_of(st.text(max_size=20), st.integers(0, 10**9), st.binary(max_size=20)), max_size=5)


@given(st.binary(max_size=4096), ad_parts)
def test_round_trip(plaintext: bytes, parts: list[object]) -> None:
    aad = associated_data(*parts)  # type: ignore[arg-type]
    blob = AEAD.seal(plaintext, aad)
    assert blob[0] == 1 and len(blob) == len(plaintext) + 29
    assert AEAD.open(blob, aad) == plaintext


@given(st.binary(min_size=1, max_size=512), st.data())
def test_any_flipped_bit_fails(plaintext: bytes, data: st.DataObject) -> None:
    aad = associated_data("resource", "t", "Patient", "1", 1, "k")
    blob = bytearray(AEAD.seal(plaintext, aad))
    i = data.draw(st.integers(0, len(blob) - 1))
    bit = data.draw(st.integers(0, 7))
    blob[i] ^= 1 << bit
    with pytest.raises(DecryptionError):
        AEAD.open(bytes(blob), aad)


@given(st.binary(max_size=256), st.text(max_size=10), st.text(max_size=10))
def test_swapped_associated_data_fails(plaintext: bytes, a: str, b: str) -> None:
    if a == b:
        return
    blob = AEAD.seal(plaintext, associated_data("Patient", a))
    with pytest.raises(DecryptionError):
        AEAD.open(blob, associated_data("Patient", b))


def test_associated_data_is_unambiguous() -> None:
    assert associated_data("ab", "c") != associated_data("a", "bc")
    assert associated_data(1) == associated_data("1")


def test_wrong_key_and_truncation_fail() -> None:
    blob = AEAD.seal(b"x", b"")
    with pytest.raises(DecryptionError):
        Aead(new_key()).open(blob, b"")
    with pytest.raises(DecryptionError):
        AEAD.open(blob[:10], b"")
    with pytest.raises(DecryptionError):
        AEAD.open(b"\x02" + blob[1:], b"")


def test_nonces_are_fresh() -> None:
    assert AEAD.seal(b"same", b"") != AEAD.seal(b"same", b"")


def test_derived_keys_differ_by_purpose() -> None:
    assert derive_key(KEY, "a") != derive_key(KEY, "b")
    assert derive_key(KEY, "a", ["x"]) == derive_key(KEY, "a", ["x"])
    with pytest.raises(ValueError):
        Aead(b"short")
