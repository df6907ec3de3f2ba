"""Blind search index: plaintext terms (from the domain) → truncated HMAC tags.

Each (tenant, resource type, search parameter) has its own HMAC-SHA256 key,
derived from the tenant's index key, so equal values under different
parameters or types give unrelated tags, and tags mean nothing without the
key. Tags are truncated to ``SEARCH_TAG_BYTES``: collisions only add
candidates, which are decrypted and verified before anything reaches a client.

String values are indexed by their normalised prefixes (for FHIR's
"starts with" matching). The number of prefix tags a value yields is padded
with random tags to a fixed count, so the index does not reveal how long a
name or an address is.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from collections.abc import Iterable

from fhirvault.domain.search.params import search_params
from fhirvault.domain.search.values import STRING_PREFIX_TERMS, index_terms, param_terms
from fhirvault.ports import SEARCH_TAG_BYTES
from fhirvault.services.keys import KeyRing

_STRING_PREFIX = b"s|"
# _id is routing data kept in clear: searched in SQL, so unique per-resource tags are not written.
_NOT_INDEXED = frozenset({"_id"})
_STRING_EXACT = b"x|"


_BLOCK = 64  # SHA-256's block size: HMAC pads its key to it (RFC 2104)
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


def _hmac_pads(key: bytes) -> tuple[hashlib._Hash, hashlib._Hash]:
    """SHA-256 states after HMAC's inner and outer key blocks (RFC 2104).

    HMAC(key, m) = SHA-256(outer state + SHA-256(inner state + m)): copying these two
    states per term takes about half the time of copying an hmac.HMAC (a Python object).
    """
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    return hashlib.sha256(key.translate(_IPAD)), hashlib.sha256(key.translate(_OPAD))


@functools.cache
def _string_codes(rtype: str) -> frozenset[str]:
    return frozenset(code for code, param in search_params(rtype).items() if param.type == "string")


class SearchIndex:
    def __init__(self, keys: KeyRing) -> None:
        self._keys = keys
        self._macs: dict[tuple[str, str], tuple[hashlib._Hash, hashlib._Hash]] = {}
        self._lock = threading.Lock()

    def _mac(self, rtype: str, code: str) -> tuple[hashlib._Hash, hashlib._Hash]:
        mac = self._macs.get((rtype, code))
        if mac is None:
            mac = _hmac_pads(self._keys.index_subkey(f"search/{rtype}/{code}"))
            with self._lock:
                self._macs[(rtype, code)] = mac
        return mac

    def tags(self, rtype: str, code: str, terms: Iterable[bytes]) -> list[bytes]:
        """HMAC-SHA256 of each term under the parameter's key, truncated."""
        inner, outer = self._mac(rtype, code)
        inner_copy, outer_copy = inner.copy, outer.copy
        out = []
        for term in terms:
            h = inner_copy()
            h.update(term)
            o = outer_copy()
            o.update(h.digest())
            out.append(o.digest()[:SEARCH_TAG_BYTES])
        return out

    def param_tags(self, rtype: str, code: str, resource: dict[str, object]) -> list[bytes]:
        """The tags of one parameter (``_lastUpdated`` is computed inside the write, once stamped)."""
        param = search_params(rtype).get(code)
        terms = param_terms(param, resource) if param is not None else None
        return self.tags(rtype, code, terms) if terms else []

    def resource_tags(self, rtype: str, resource: dict[str, object], *,
                      skip: frozenset[str] = frozenset()) -> list[bytes]:
        """The tags a resource version is indexed under (string prefixes padded)."""
        out: list[bytes] = []
        strings = _string_codes(rtype)
        for code, terms in index_terms(rtype, resource, skip=_NOT_INDEXED | skip).items():
            out.extend(self.tags(rtype, code, terms))
            if code not in strings:  # only string parameters have s| and x| terms
                continue
            values = sum(1 for t in terms if t.startswith(_STRING_EXACT))
            prefixes = sum(1 for t in terms if t.startswith(_STRING_PREFIX))
            padding = values * STRING_PREFIX_TERMS - prefixes
            if padding > 0:  # random tags match nothing; they only hide lengths
                noise = os.urandom(SEARCH_TAG_BYTES * padding)
                out.extend(noise[i : i + SEARCH_TAG_BYTES] for i in range(0, len(noise), SEARCH_TAG_BYTES))
        return out
