"""Search execution over the blind index: plan → candidates → decrypt → verify → page.

Candidates come from the store as resources whose tags satisfy every indexed
criterion (AND of ORs). Each candidate is decrypted and checked against the
exact FHIR predicate of *every* criterion before it is paged or counted, so a
tag collision or a forged index row never reaches the client and totals are
exact. Results are ordered by the resource's creation key (``rk``), which
updates do not change: a ``next`` link (a cursor on ``rk`` and a snapshot of
the highest ``rk`` when the search began) never repeats or skips a resource
because of concurrent writes.

Limits (documented in the CapabilityStatement and docs/search.md):
``SCAN_CAP`` resources of a type when no criterion can use the index,
``VERIFY_CAP`` candidates decrypted for one request, ``SORT_CAP`` matches
sorted in memory for ``_sort`` on anything but ``_id``/creation order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from fhirvault.domain import errors
from fhirvault.domain.search.match import matches
from fhirvault.domain.search.params import SearchParam
from fhirvault.domain.search.query import (
    AnyCriterion,
    ChainCriterion,
    Criterion,
    SortKey,
    TokenValue,
    id_criterion,
    reference_criterion,
)
from fhirvault.domain.search.values import RefItem, extract
from fhirvault.ports import ResourceStore, SearchQuery, StoredVersion
from fhirvault.services.search_index import SearchIndex

SCAN_CAP = 10_000
VERIFY_CAP = 20_000
SORT_CAP = 1_000
INCLUDE_CAP = 1_000
CHAIN_CAP = 1_000
_CHUNK = 256


def _nothing(rtype: str) -> Criterion:
    """A criterion no resource matches (an empty OR of ids)."""
    return id_criterion(rtype, [])


class TooCostly(errors.OperationOutcomeError):
    def __init__(self, message: str) -> None:
        super().__init__(400, [errors.Issue("error", "too-costly", message)])


class Visibility(Protocol):
    """What the caller may see (services/access.py): checked for every candidate, so that pages, totals,
    chains and ``_has`` never count or reveal a resource the caller may not read."""

    def before(self, version: StoredVersion) -> bool:
        """A cheap check on routing data (the compartment of the data key) before decrypting."""
        ...

    def after(self, rtype: str, resource: dict[str, Any], version: StoredVersion) -> bool:
        """The full decision on the decrypted resource."""
        ...


@dataclass(slots=True)
class Match:
    rk: int
    version: StoredVersion
    body: bytes
    resource: dict[str, Any]


@dataclass(slots=True)
class Found:
    matches: list[Match]
    exhausted: bool  # no further match exists after the last one returned
    verified: int  # candidates decrypted


class SearchEngine:
    def __init__(self, store: ResourceStore, index: SearchIndex, open_version: Callable[[StoredVersion], bytes],
                 tenant: str) -> None:
        self._store = store
        self._index = index
        self._open = open_version
        self._tenant = tenant

    # -- criteria --------------------------------------------------------------
    def resolve(self, rtype: str, criteria: tuple[AnyCriterion, ...],
                visible: Visibility | None = None) -> list[Criterion] | None:
        """Plain criteria for ``rtype``: chains and ``_has`` become OR-lists of ids.

        None means a sub-search matched nothing, so the whole search matches nothing.
        Sub-searches run over what ``visible`` lets the caller see: a chain through a resource
        the caller may not read cannot reveal it.
        """
        out: list[Criterion] = []
        for c in criteria:
            if isinstance(c, Criterion):
                out.append(c)
                continue
            if isinstance(c, ChainCriterion):
                ids = self._ids(c.target_type, (c.inner,), visible)
                if not ids:
                    return None
                out.append(reference_criterion(c.name, c.param, [f"{c.target_type}/{i}" for i in ids]))
                continue
            # HasCriterion: the ids that source resources matching `inner` point to through `param`
            sources = self.find(c.source_type, self._resolved_or_empty(c.source_type, (c.inner,), visible),
                                limit=CHAIN_CAP + 1, visible=visible)
            if len(sources.matches) > CHAIN_CAP:
                raise TooCostly(f"_has matches more than {CHAIN_CAP} {c.source_type} resources: narrow it.")
            ids = sorted({item.id for m in sources.matches for item in extract(c.param, m.resource)
                          if isinstance(item, RefItem) and item.type == rtype and item.id and item.base is None})
            if not ids:
                return None
            out.append(id_criterion(rtype, ids))
        return out

    def _resolved_or_empty(self, rtype: str, criteria: tuple[AnyCriterion, ...],
                           visible: Visibility | None) -> list[Criterion]:
        resolved = self.resolve(rtype, criteria, visible)
        if resolved is None:  # a criterion that matches nothing: a reference to no resource
            return [_nothing(rtype)]
        return resolved

    def _ids(self, rtype: str, criteria: tuple[AnyCriterion, ...], visible: Visibility | None) -> list[str]:
        resolved = self.resolve(rtype, criteria, visible)
        if resolved is None:
            return []
        found = self.find(rtype, resolved, limit=CHAIN_CAP + 1, visible=visible)
        if len(found.matches) > CHAIN_CAP:
            raise TooCostly(f"A chained parameter matches more than {CHAIN_CAP} {rtype} resources: narrow it.")
        return [m.version.id for m in found.matches]

    @staticmethod
    def id_filter(criteria: list[Criterion]) -> tuple[str, ...] | None:
        """``_id`` is routing data (in clear): it filters in SQL, not through tags."""
        ids: set[str] | None = None
        for c in criteria:
            if c.param.code != "_id" or c.modifier is not None:
                continue
            values = {v.code for v in c.values if isinstance(v, TokenValue) and v.system is None and v.code}
            if len(values) != len(c.values):
                continue
            ids = values if ids is None else ids & values
        return tuple(sorted(ids)) if ids is not None else None

    def tag_groups(self, rtype: str, criteria: list[Criterion]) -> tuple[tuple[bytes, ...], ...]:
        groups = []
        for c in criteria:
            if c.param.code == "_id":
                continue  # not indexed: see id_filter
            terms = c.query_terms()
            if terms is not None:
                groups.append(tuple(self._index.tags(rtype, c.param.code, terms)))
        return tuple(groups)

    # -- candidates and verification ------------------------------------------
    def _candidates(self, rtype: str, groups: tuple[tuple[bytes, ...], ...], ids: tuple[str, ...] | None,
                    after: int | None, before: int | None, descending: bool) -> Iterator[tuple[int, StoredVersion]]:
        if any(not g for g in groups) or (ids is not None and not ids):
            return  # a criterion with no possible value: nothing matches
        if not groups and ids is None and self._store.count_current(self._tenant, rtype) > SCAN_CAP:
            raise TooCostly(
                f"This search would scan more than {SCAN_CAP} {rtype} resources: add a criterion the index can "
                "use (not :not, :missing, ne, uri :below, or a one-letter string)."
            )
        while True:
            batch = self._store.search(SearchQuery(self._tenant, (rtype,), groups, after, before, descending, _CHUNK,
                                                   ids))
            yield from batch
            if len(batch) < _CHUNK:
                return
            if descending:
                before = batch[-1][0]
            else:
                after = batch[-1][0]

    def find(self, rtype: str, criteria: list[Criterion], *, limit: int, after: int | None = None,
             before: int | None = None, descending: bool = False, visible: Visibility | None = None) -> Found:
        """Up to ``limit`` verified matches in rk order, strictly after/before the cursors.

        With ``visible``, a resource the caller may not see is skipped as if it did not match."""
        groups = self.tag_groups(rtype, criteria)
        found: list[Match] = []
        verified = 0
        exhausted = True
        for rk, version in self._candidates(rtype, groups, self.id_filter(criteria), after, before, descending):
            if len(found) >= limit:
                exhausted = False
                break
            if visible is not None and not visible.before(version):
                continue
            verified += 1
            if verified > VERIFY_CAP:
                raise TooCostly(f"This search would decrypt more than {VERIFY_CAP} candidates: narrow it.")
            body = self._open(version)
            resource = orjson.loads(body)
            if all(matches(c, rtype, resource) for c in criteria) and (
                    visible is None or visible.after(rtype, resource, version)):
                found.append(Match(rk, version, body, resource))
        return Found(found, exhausted, verified)

    def references_from(self, m: Match, param: SearchParam) -> list[RefItem]:
        return [i for i in extract(param, m.resource) if isinstance(i, RefItem)]


# -- orchestration helpers used by the repository -----------------------------------

@dataclass(slots=True)
class SearchOutcome:
    matches: list[Match]
    includes: list[Match]
    total: int | None
    next_after: int | None  # cursor for the next page (creation order)
    prev_before: int | None  # cursor for the previous page
    next_offset: int | None  # for sorted results
    prev_offset: int | None
    snapshot: int
    warnings: list[errors.Issue]


def _sort_value(item: Any) -> Any:
    """A comparable key for one extracted value (first of the resource's values is used)."""
    if isinstance(item, str):
        return item.casefold()
    for attr in ("lo", "code", "relative", "value", "url"):
        value = getattr(item, attr, None)
        if value is not None:
            return value
    return str(item)


def sort_matches(found: list[Match], keys: tuple[SortKey, ...]) -> list[Match]:
    """Stable multi-key sort; resources without a value sort last in either direction."""
    ordered = sorted(found, key=lambda m: m.rk)
    for key in reversed(keys):
        with_value: list[tuple[Any, Match]] = []
        without: list[Match] = []
        for m in ordered:
            items = extract(key.param, m.resource)
            if items:
                values = [_sort_value(i) for i in items]
                try:
                    with_value.append((max(values) if key.descending else min(values), m))
                except TypeError:
                    with_value.append((str(values[0]), m))
            else:
                without.append(m)
        try:
            with_value.sort(key=lambda p: p[0], reverse=key.descending)
        except TypeError:  # mixed kinds of values: fall back to text order
            with_value.sort(key=lambda p: str(p[0]), reverse=key.descending)
        ordered = [m for _, m in with_value] + without
    return ordered
