"""Blind-index tags are HMAC-SHA256 of each term, truncated: the same tags old databases hold."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, cast

import pytest

from fhirvault.domain.search.values import STRING_PREFIX_TERMS, index_terms
from fhirvault.ports import SEARCH_TAG_BYTES
from fhirvault.services.keys import KeyRing
from fhirvault.services.search_index import SearchIndex


class _Keys:
    def __init__(self, length: int) -> None:
        self.length = length

    def index_subkey(self, purpose: str) -> bytes:
        seed = hashlib.sha512(purpose.encode()).digest() * 4
        return seed[: self.length]


def _index(length: int = 32) -> tuple[SearchIndex, _Keys]:
    keys = _Keys(length)
    return SearchIndex(cast(KeyRing, keys)), keys


def _reference(keys: _Keys, rtype: str, code: str, term: bytes) -> bytes:
    key = keys.index_subkey(f"search/{rtype}/{code}")
    return hmac.new(key, term, hashlib.sha256).digest()[:SEARCH_TAG_BYTES]


TERMS = [b"", b"tc|final", b"x|" + "Müller".encode(), b"u|" + b"http://x.org/" * 20, bytes(range(256))]


@pytest.mark.parametrize("key_length", [0, 1, 16, 32, 63, 64, 65, 200])
def test_tags_are_truncated_hmac_sha256(key_length: int) -> None:
    index, keys = _index(key_length)
    for code in ("code", "name"):
        got = index.tags("Observation", code, TERMS)
        assert got == [_reference(keys, "Observation", code, t) for t in TERMS]
    assert index.tags("Observation", "code", []) == []
    # the cached key state is not consumed by a call
    assert index.tags("Observation", "code", TERMS[1:2]) == [_reference(keys, "Observation", "code", TERMS[1])]


PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "p1",
    "meta": {"lastUpdated": "2024-01-02T03:04:05Z"},
    "name": [{"family": "Nguyễn", "given": ["Zoë", "Jo"]}],
    "gender": "female",
    "birthDate": "1970-05",
    "managingOrganization": {"reference": "Organization/o1"},
}


def test_resource_tags_are_the_tags_of_index_terms_plus_padding() -> None:
    index, keys = _index()
    skip = frozenset({"_lastUpdated"})
    got = index.resource_tags("Patient", PATIENT, skip=skip)
    pos = 0
    seen = set()
    for code, terms in index_terms("Patient", PATIENT).items():
        if code in {"_id", "_lastUpdated"}:
            continue
        seen.add(code)
        expected = [_reference(keys, "Patient", code, t) for t in terms]
        assert got[pos : pos + len(expected)] == expected, code
        pos += len(expected)
        exact = sum(t.startswith(b"x|") for t in terms)
        prefixes = sum(t.startswith(b"s|") for t in terms)
        padding = max(0, exact * STRING_PREFIX_TERMS - prefixes)
        noise = got[pos : pos + padding]
        assert len(noise) == padding and all(len(t) == SEARCH_TAG_BYTES for t in noise)
        pos += padding
    assert pos == len(got)
    assert {"name", "family", "given", "gender", "birthdate", "organization"} <= seen
    # "Jo" has 2 of the 5 prefix lengths: the name parameters are padded
    assert len(got) > sum(len(t) for c, t in index_terms("Patient", PATIENT).items() if c not in {"_id", "_lastUpdated"})
