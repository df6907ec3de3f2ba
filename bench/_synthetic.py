"""Synthetic patient bundles for the ingest and search benchmarks, cached on disk.

The bundles are ``carebundle.generate_cohort(count=N, seed=S)``: Synthea-style
transaction Bundles of about 45 resources each (Patient, Practitioner,
Encounter, Conditions, Observations, DiagnosticReports, MedicationRequests,
AllergyIntolerance) whose references are ``urn:uuid`` fullUrls. Generating them
takes about 10 ms per patient, so they are generated once, serialised to
compact JSON and written to ``<cache>/carebundle-s<S>-n<N>.ndjson``: one line per
bundle, ``<number of entries>\\t<bundle JSON>``. The file is written under a
temporary name and renamed when complete, so an interrupted generation leaves
no half-written cache behind.

A cohort is prefix-stable (the first k bundles of ``count=N`` are the bundles of
``count=k``, same seed), so a request for N bundles is served from any complete
cache file of the same seed with at least N bundles.

To keep memory flat for large cohorts (``generate_cohort`` keeps every bundle
object alive: about 0.3 MB a patient), the cohort is generated in chunks with
the same per-index calls ``generate_cohort`` makes (``generate_bundle`` with the
profile drawn by the cohort chooser). The first bundles are compared with
``generate_cohort``'s; if carebundle's internals ever differ, generation falls
back to one ``generate_cohort`` call.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CACHE_NAME = re.compile(r"carebundle-s(-?\d+)-n(\d+)\.ndjson")
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "fhirvault-bench-cache"
CHUNK = 500  # bundles generated (and held in memory) at a time
VERIFY = 4  # bundles compared with carebundle.generate_cohort before using the chunked path

Log = Callable[[str], None]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cache_path(cache_dir: Path, count: int, seed: int) -> Path:
    return cache_dir / f"carebundle-s{seed}-n{count}.ndjson"


def find_cache(cache_dir: Path, count: int, seed: int) -> Path | None:
    """The smallest complete cache file of ``seed`` holding at least ``count`` bundles."""
    if not cache_dir.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for path in cache_dir.iterdir():
        m = CACHE_NAME.fullmatch(path.name)
        if m is None or int(m.group(1)) != seed:
            continue
        n = int(m.group(2))
        if n >= count and (best is None or n < best[0]):
            best = (n, path)
    return best[1] if best else None


def _serialise(bundle: Any) -> bytes:
    import carebundle

    compact: dict[str, Any] = {"indent": None}  # json.dumps' compact form (no newlines)
    text: str = carebundle.to_json(bundle, **compact)
    return text.encode()


def _entries(bundle: Any) -> int:
    return len(bundle.entry or ())


def _chunked_cohort(count: int, seed: int) -> Iterator[Any] | None:
    """Bundles of ``generate_cohort(count=count, seed=seed)``, CHUNK at a time; None if unsure."""
    try:
        import numpy as np
        from carebundle import generate as gen
        from carebundle.core.ids import stable_digest
    except ImportError:
        return None
    try:
        weights = dict(gen.DEFAULT_COHORT_PREVALENCE)
        keys = sorted(weights)
        total = sum(weights.values())
        chooser = np.random.default_rng([seed, stable_digest("cohort")])
        chosen = chooser.choice(len(keys), size=count, p=[weights[k] / total for k in keys])
    except (AttributeError, TypeError, ValueError):
        return None

    def one(index: int) -> Any:
        return gen.generate_bundle(
            profile=keys[int(chosen[index])],
            seed=seed,
            sex=("F", "M")[index % 2],
            index=index,
        )

    import carebundle

    n = min(count, VERIFY)
    try:
        reference = [_serialise(b) for b in carebundle.generate_cohort(count=n, seed=seed)]
        if [_serialise(one(i)) for i in range(n)] != reference:
            return None
    except (AttributeError, TypeError, ValueError):
        return None

    def bundles() -> Iterator[Any]:
        for start in range(0, count, CHUNK):
            chunk = [one(i) for i in range(start, min(count, start + CHUNK))]
            yield from chunk

    return bundles()


def generate(cache_dir: Path, count: int, seed: int, log: Log = _log) -> Path:
    """Generate the cohort into its cache file (overwriting) and return the path."""
    import carebundle

    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_path(cache_dir, count, seed)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    t0 = time.perf_counter()
    bundles = _chunked_cohort(count, seed)
    if bundles is None:
        log("note: generating the cohort in one carebundle.generate_cohort call (memory heavy)")
        bundles = iter(carebundle.generate_cohort(count=count, seed=seed))
    resources = 0
    size = 0
    try:
        with open(tmp, "wb") as fh:
            for i, bundle in enumerate(bundles, 1):
                n = _entries(bundle)
                body = _serialise(bundle)
                fh.write(b"%d\t%s\n" % (n, body))
                resources += n
                size += len(body)
                if i % 1000 == 0 or i == count:
                    el = time.perf_counter() - t0
                    log(
                        f"  generated {i:,}/{count:,} bundles, {resources:,} resources ({el:.0f} s)"
                    )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    el = time.perf_counter() - t0
    log(
        f"generated {count:,} bundles ({resources:,} resources, {size / 1e6:.0f} MB of JSON) "
        f"in {el:.1f} s -> {path}"
    )
    return path


def ensure_cohort(cache_dir: Path, count: int, seed: int, log: Log = _log) -> Path:
    """Path of a cache file holding at least ``count`` bundles of ``seed``, generating it if needed."""
    found = find_cache(cache_dir, count, seed)
    if found is not None:
        log(f"using cached bundles {found}")
        return found
    log(f"generating {count:,} carebundle patients (seed {seed}) into {cache_dir} ...")
    return generate(cache_dir, count, seed, log)


def iter_bundles(path: Path, count: int) -> Iterator[tuple[int, bytes]]:
    """The first ``count`` bundles of a cache file, as (number of entries, JSON body)."""
    with open(path, "rb") as fh:
        for i, line in enumerate(fh):
            if i >= count:
                return
            n, _, body = line.rstrip(b"\n").partition(b"\t")
            yield int(n), body


def load_bundles(path: Path, count: int) -> list[tuple[int, bytes]]:
    bundles = list(iter_bundles(path, count))
    if len(bundles) < count:
        raise RuntimeError(f"{path} holds {len(bundles)} bundles, {count} needed")
    return bundles
