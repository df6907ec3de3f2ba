"""`index_terms` gives, term for term, what it gave when the golden corpus was recorded.

The blind index of existing databases holds HMACs of these terms: any change to one term
would silently stop old rows from matching (the order of terms and parameters is checked
too). The corpus and its recorded output are data (see terms_corpus.py); index_terms is
also checked against param_terms, which evaluates one parameter at a time.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhirvault.domain.search.params import all_search_params
from fhirvault.domain.search.values import index_terms, param_terms


def _corpus_module() -> ModuleType:
    path = Path(__file__).with_name("terms_corpus.py")
    spec = importlib.util.spec_from_file_location("terms_corpus", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("terms_corpus", module)
    spec.loader.exec_module(module)
    return module


CORPUS_MODULE = _corpus_module()
CORPUS = list(CORPUS_MODULE.load())


def test_corpus_is_broad() -> None:
    types = {rtype for rtype, _, _ in CORPUS}
    codes = {(rtype, code) for rtype, _, expected in CORPUS for code in expected}
    every = {(rtype, code) for rtype, params in all_search_params().items() for code in params}
    assert types == set(all_search_params())
    assert len(CORPUS) > 2500
    assert len(codes) > 0.97 * len(every)


def test_index_terms_unchanged_on_the_corpus() -> None:
    diffs = []
    for i, (rtype, resource, expected) in enumerate(CORPUS):
        before = copy.deepcopy(resource)
        got = index_terms(rtype, resource)
        assert resource == before, "index_terms must not modify the resource"
        if got != expected or list(got) != list(expected):
            codes = sorted({c for c in got.keys() | expected.keys() if got.get(c) != expected.get(c)})
            diffs.append((i, rtype, codes[:5] or "order of codes"))
    assert not diffs, f"{len(diffs)} resources differ, first: {diffs[:5]}"


def test_second_call_is_the_same() -> None:
    """Caches (if any) give back the same terms, and callers may not change them."""
    for rtype, resource, expected in CORPUS[::7]:
        first = index_terms(rtype, resource)
        for terms in first.values():
            terms.append(b"caller's own list")
        assert index_terms(rtype, resource) == expected


def _one_by_one(rtype: str, resource: dict[str, Any]) -> dict[str, list[bytes]]:
    """index_terms as param_terms computes it, one parameter at a time (no shared work)."""
    out = {}
    for code, param in all_search_params()[rtype].items():
        terms = param_terms(param, resource)
        if terms is not None:
            out[code] = terms
    return out


def test_param_terms_agrees_with_index_terms() -> None:
    for rtype, resource, expected in CORPUS:
        assert _one_by_one(rtype, resource) == expected


TYPES = sorted(all_search_params())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(TYPES), st.integers(min_value=1000, max_value=10**9))
def test_index_terms_equals_per_parameter_terms_on_random_resources(rtype: str, seed: int) -> None:
    resource = CORPUS_MODULE.synthetic(rtype, seed)
    assert index_terms(rtype, resource) == _one_by_one(rtype, resource)


def test_skipped_parameters_are_left_out_only() -> None:
    for rtype, resource, expected in CORPUS[::5]:
        skip = frozenset(list(expected)[::2]) | {"_id"}
        assert index_terms(rtype, resource, skip=skip) == {
            c: t for c, t in expected.items() if c not in skip
        }
