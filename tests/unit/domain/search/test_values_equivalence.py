"""`index_terms` gives, term for term, what it gave when the golden corpus was recorded.

The blind index of existing databases holds HMACs of these terms: any change to one term
(or to a parameter's term order, which the tag padding follows) would silently stop old rows
from matching. The corpus and its recorded output are data (see terms_corpus.py).
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

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


CORPUS = list(_corpus_module().load())


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


@pytest.mark.parametrize("rtype", ["Patient", "Observation", "Encounter", "Condition"])
def test_param_terms_agrees_with_index_terms(rtype: str) -> None:
    params = all_search_params()[rtype]
    for t, resource, expected in CORPUS:
        if t != rtype:
            continue
        for code, param in params.items():
            assert param_terms(param, resource) == expected.get(code), code


def test_skipped_parameters_are_left_out_only() -> None:
    for rtype, resource, expected in CORPUS[::5]:
        skip = frozenset(list(expected)[::2]) | {"_id"}
        assert index_terms(rtype, resource, skip=skip) == {
            c: t for c, t in expected.items() if c not in skip
        }
