"""CPU cost of blind-index term extraction and tagging, per resource, on carebundle patients.

Run: .venv/bin/python bench/index_terms.py [--patients 40] [--rounds 5] [--profile]

Measures in CPU time (time.process_time, best of --rounds) over the resources of --patients
carebundle patients (about 45 resources each, references made relative as after a
transaction):

    index_terms    fhirvault.domain.search.values.index_terms (plaintext terms)
    tags           SearchIndex.tags over those terms (HMAC-SHA256 per term, truncated)
    resource_tags  SearchIndex.resource_tags: both, plus the string-prefix padding

To compare two builds on the same data, run it with PYTHONPATH pointing at each build's src
(the first line says which fhirvault was imported), e.g.
``PYTHONPATH=/path/to/main/src .venv/bin/python bench/index_terms.py``.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import fhirvault
from fhirvault.domain.search.values import index_terms
from fhirvault.services.keys import KeyRing
from fhirvault.services.search_index import SearchIndex

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _synthetic


class _Keys:
    """The one KeyRing method SearchIndex uses, with a fixed test key."""

    def index_subkey(self, purpose: str) -> bytes:
        return hashlib.sha256(b"bench\x00" + purpose.encode()).digest()


def corpus(patients: int, seed: int, cache: Path) -> list[tuple[str, dict[str, Any]]]:
    path = _synthetic.ensure_cohort(cache, patients, seed)
    out: list[tuple[str, dict[str, Any]]] = []
    for _, body in _synthetic.iter_bundles(path, patients):
        entries = [e for e in json.loads(body).get("entry", []) if isinstance(e.get("resource"), dict)]
        urls: dict[str, str] = {}
        for e in entries:  # ids from the urn:uuid fullUrls, references Type/id: as stored
            r, url = e["resource"], e.get("fullUrl", "")
            r.setdefault("id", url.rsplit(":", 1)[-1])
            urls[json.dumps(url)] = json.dumps(f"{r['resourceType']}/{r['id']}")
        text = json.dumps([e["resource"] for e in entries])
        for old, new in urls.items():
            text = text.replace(old, new)
        out.extend((r["resourceType"], r) for r in json.loads(text))
    return out


def best_cpu(fn: Callable[[], object], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cache", type=Path, default=_synthetic.DEFAULT_CACHE)
    ap.add_argument("--profile", action="store_true", help="print a cProfile top 20 of index_terms")
    args = ap.parse_args()

    print(f"fhirvault from {Path(fhirvault.__file__).parent}")
    resources = corpus(args.patients, args.seed, args.cache)
    n = len(resources)
    index = SearchIndex(cast(KeyRing, _Keys()))
    all_terms = [(rtype, index_terms(rtype, r)) for rtype, r in resources]  # warm: tables, caches
    index.resource_tags(*resources[0])
    terms_count = sum(len(ts) for _, per in all_terms for ts in per.values())

    def run_terms() -> None:
        for rtype, r in resources:
            index_terms(rtype, r)

    def run_tags() -> None:
        for rtype, per in all_terms:
            for code, ts in per.items():
                index.tags(rtype, code, ts)

    def run_resource_tags() -> None:
        for rtype, r in resources:
            index.resource_tags(rtype, r)

    print(f"{n} resources of {args.patients} patients, {terms_count / n:.1f} terms each; "
          f"CPU time, best of {args.rounds}")
    t_terms = best_cpu(run_terms, args.rounds)
    t_tags = best_cpu(run_tags, args.rounds)
    t_all = best_cpu(run_resource_tags, args.rounds)
    for name, t in (("index_terms", t_terms), ("tags (HMAC)", t_tags), ("resource_tags", t_all)):
        print(f"  {name:<14} {n / t:>9,.0f} resources/s  {t / n * 1e6:>7.1f} µs/resource")
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(run_terms)
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
