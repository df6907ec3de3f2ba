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

import hashlib
import hmac
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


class SearchIndex:
    def __init__(self, keys: KeyRing) -> None:
        self._keys = keys
        self._macs: dict[tuple[str, str], hmac.HMAC] = {}
        self._lock = threading.Lock()

    def _mac(self, rtype: str, code: str) -> hmac.HMAC:
        mac = self._macs.get((rtype, code))
        if mac is None:
            key = self._keys.index_subkey(f"search/{rtype}/{code}")
            mac = hmac.new(key, digestmod=hashlib.sha256)
            with self._lock:
                self._macs[(rtype, code)] = mac
        return mac

    def tags(self, rtype: str, code: str, terms: Iterable[bytes]) -> list[bytes]:
        base = self._mac(rtype, code)
        out = []
        for term in terms:
            mac = base.copy()
            mac.update(term)
            out.append(mac.digest()[:SEARCH_TAG_BYTES])
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
        for code, terms in index_terms(rtype, resource).items():
            if code in _NOT_INDEXED or code in skip:
                continue
            out.extend(self.tags(rtype, code, terms))
            values = sum(1 for t in terms if t.startswith(_STRING_EXACT))
            prefixes = sum(1 for t in terms if t.startswith(_STRING_PREFIX))
            padding = values * STRING_PREFIX_TERMS - prefixes
            if padding > 0:  # random tags match nothing; they only hide lengths
                noise = os.urandom(SEARCH_TAG_BYTES * padding)
                out.extend(noise[i : i + SEARCH_TAG_BYTES] for i in range(0, len(noise), SEARCH_TAG_BYTES))
        return out
