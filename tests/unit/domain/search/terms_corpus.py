"""The corpus of the search-term equivalence test (test_values_equivalence.py) and its generator.

`data/terms_golden.ndjson.gz` holds one resource a line with the `index_terms` output it
had when the file was generated: ``{"t": type, "dec": bool, "r": resource, "terms": {code:
[term, ...]}}`` (terms are UTF-8 text; ``dec``: parse the resource's decimals as Decimal, as
some callers do). The file is data: the test never regenerates it. Regenerate it only when
the term scheme changes on purpose (the blind index of existing databases then needs a
reindex), with ``python tests/unit/domain/search/terms_corpus.py`` from the repository root
(PYTHONPATH=<a build's src> records that build's terms).

The corpus: carebundle patients (references relative, or left as ``urn:uuid``), the vendored
FHIR XML examples, and for every R4 resource type synthetic resources that put edge-case
values (partial dates, time zones, leap seconds, comparators, low > high ranges, accents,
ligatures, combining marks, long strings, contained and absolute references, empty
arrays...) on the compiled paths of its search parameters.
"""

from __future__ import annotations

import gzip
import json
import random
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

GOLDEN = Path(__file__).resolve().parent / "data" / "terms_golden.ndjson.gz"
ROOT = Path(__file__).resolve().parents[4]
XML_EXAMPLES = ROOT / "tests" / "data" / "fhir-r4-xml"


def load() -> Iterator[tuple[str, dict[str, Any], dict[str, list[bytes]]]]:
    """(resource type, resource, expected index_terms) of every corpus line."""
    with gzip.open(GOLDEN, "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            resource = json.loads(json.dumps(row["r"]), parse_float=Decimal) if row["dec"] else row["r"]
            expected = {code: [t.encode() for t in terms] for code, terms in row["terms"].items()}
            yield row["t"], resource, expected


# ---------------------------------------------------------------- generator (not used by tests)

STRINGS = [
    "", "a", "Ab", "abc", "Smith", "smith-jones", "O'Brien", "Müller", "MÜLLER", "Straße",
    "ﬁnance ﬂow", "e\u0301cole", "İstanbul", "ǅemal", "Ωμέγα", "日本語テキスト", "😀 smile",
    "  spaced -- out__x  ", "A_B", "123", "x" * 300, "Ünïcödé " * 40, "\u00bd half", "Å",
    "http://example.org/fhir/ValueSet/x|1.2", "urn:oid:1.2.3.4", "-", "__", "ab\ncd",
]
CODES = ["active", "final", "8867-4", "male", "A", "a|b", "", "Ünï", "x" * 80, "1"]
SYSTEMS = [None, "http://loinc.org", "http://snomed.info/sct", "urn:oid:2.16.840.1", "", "ñ"]
DATES = [
    "2020", "2020-02", "2020-12", "2020-02-29", "2019-02-29", "2021-13", "2020-12-31T23:59:59+14:00",
    "2020-01-01T00:00:00-05:30", "2020-06-15T12:30:00.123456Z", "2016-12-31T23:59:60Z",
    "2020-06-15T12:30:00.1Z", "0000", "1800-01-01", "1899-12-31", "2300-01-01", "2999-12-31T23:59:59Z",
    "garbage", "2020-01-01T10:00", "2020-01-01T10:00Z", "2020-01-01T24:00:00Z", "2020-01-01T10:00:00+15:00",
    "2021-03-04T05:06:07.999999999999Z", "2012-01-01T00:00:00Z", "2015-02-07T13:28:17.239+02:00",
]
NUMBERS: list[Any] = [0, -0.0, 1, -1, 1.5, 0.1, 1e39, -1e39, -1e-45, 3.4028235e38, 12345678901234567890,
                      True, "5", 72.0, 100.25, -273.15, 1e-7, 2**53 + 1]
COMPARATORS = [None, "<", "<=", ">", ">=", "ad", ""]
REFS = [
    "Patient/123", "Patient/123/_history/2", "Observation/abc.def-1", "http://ex.org/fhir/Observation/abc",
    "http://ex.org/fhir/Patient/p1/_history/3", "https://ex.org/Practitioner/pr1", "urn:uuid:4c1e7e5a-0000",
    "urn:oid:1.2.3", "#c1", "#c2", "#", "Foo/1", "patient/1", "", "Patient/" + "x" * 70,
    "http://ex.org/fhir/metadata", "Organization/o1", "Group/g1", "Device/d1", "Location/l1",
]
CANONICALS = ["http://x.org/sd|2.0", "http://x.org/sd", "http://x.org/sd|", "urn:uuid:1|", "", "http://ä.org/x"]


def _pick(rng: random.Random, pool: list[Any]) -> Any:
    return pool[rng.randrange(len(pool))]


def _coding(rng: random.Random) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if (s := _pick(rng, SYSTEMS)) is not None:
        out["system"] = s
    if rng.random() < 0.85:
        out["code"] = _pick(rng, CODES)
    if rng.random() < 0.3:
        out["display"] = _pick(rng, STRINGS)
    return out


def _quantity(rng: random.Random) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if rng.random() < 0.9:
        out["value"] = _pick(rng, NUMBERS)
    if (c := _pick(rng, COMPARATORS)) is not None:
        out["comparator"] = c
    for key, pool in (("unit", ["mg", "kg", "mm[Hg]", "", "µg"]), ("system", SYSTEMS), ("code", CODES)):
        if rng.random() < 0.6 and (v := _pick(rng, pool)) is not None:
            out[key] = v
    return out


def _period(rng: random.Random) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if rng.random() < 0.7:
        out["start"] = _pick(rng, DATES)
    if rng.random() < 0.7:
        out["end"] = _pick(rng, DATES)
    return out


def _value(rng: random.Random, value_type: str) -> Any:
    """A random value of a FHIR data type (sometimes of the wrong JSON type)."""
    if rng.random() < 0.04:
        return _pick(rng, [None, [], {}, 7, "stray", [None], True])
    if value_type in ("date", "dateTime", "instant"):
        return _pick(rng, DATES)
    if value_type == "Period":
        return _period(rng)
    if value_type == "Timing":
        out: dict[str, Any] = {}
        if rng.random() < 0.7:
            out["event"] = [_pick(rng, DATES) for _ in range(rng.randrange(4))]
        if rng.random() < 0.6:
            out["repeat"] = {"boundsPeriod": _period(rng)}
        return out
    if value_type in ("decimal", "integer"):
        return _pick(rng, NUMBERS)
    if value_type in ("Quantity", "SimpleQuantity", "Age", "Duration", "Count", "Distance"):
        return _quantity(rng)
    if value_type == "Money":
        return {"value": _pick(rng, NUMBERS), "currency": _pick(rng, ["EUR", "USD", ""])}
    if value_type == "Range":
        return {k: _quantity(rng) for k in ("low", "high") if rng.random() < 0.75}
    if value_type == "HumanName":
        return {
            "family": _pick(rng, STRINGS),
            "given": [_pick(rng, STRINGS) for _ in range(rng.randrange(3))],
            "prefix": [_pick(rng, STRINGS)] if rng.random() < 0.3 else [],
            "suffix": [_pick(rng, STRINGS)] if rng.random() < 0.2 else [],
            "text": _pick(rng, STRINGS),
        }
    if value_type == "Address":
        return {
            "line": [_pick(rng, STRINGS) for _ in range(rng.randrange(3))],
            "city": _pick(rng, STRINGS), "district": _pick(rng, STRINGS), "state": _pick(rng, STRINGS),
            "postalCode": _pick(rng, ["75001", "SW1A 1AA", "", "12345-6789"]),
            "country": _pick(rng, ["FR", "UK", "Deutschland", ""]),
        }
    if value_type == "CodeableConcept":
        cc: dict[str, Any] = {"coding": [_coding(rng) for _ in range(rng.randrange(4))]}
        if rng.random() < 0.4:
            cc["text"] = _pick(rng, STRINGS)
        return cc
    if value_type == "Coding":
        return _coding(rng)
    if value_type == "Identifier":
        ident: dict[str, Any] = {"value": _pick(rng, CODES + STRINGS[:6])}
        if (s := _pick(rng, SYSTEMS)) is not None:
            ident["system"] = s
        if rng.random() < 0.4:
            ident["type"] = {"coding": [_coding(rng) for _ in range(rng.randrange(3))]}
        return ident
    if value_type == "ContactPoint":
        return {"system": _pick(rng, ["phone", "email", "fax"]), "value": _pick(rng, ["+33 1 23", "a@b.c", ""])}
    if value_type == "boolean":
        return _pick(rng, [True, False, "true"])
    if value_type == "Reference":
        ref: dict[str, Any] = {}
        if rng.random() < 0.85:
            ref["reference"] = _pick(rng, REFS)
        if rng.random() < 0.25:
            ref["identifier"] = {k: v for k, v in (("system", _pick(rng, SYSTEMS)), ("value", _pick(rng, CODES)))
                                 if v is not None}
        if rng.random() < 0.2:
            ref["type"] = _pick(rng, ["Patient", "http://hl7.org/fhir/StructureDefinition/Patient", "", "Group"])
        return ref
    if value_type == "canonical":
        return _pick(rng, CANONICALS)
    if value_type in ("uri", "url", "oid", "uuid"):
        return _pick(rng, [*CANONICALS, "urn:oid:1.2", "http://x.org/a b"])
    if value_type in ("code", "id"):
        return _pick(rng, CODES)
    return _pick(rng, STRINGS)


def _fill(rng: random.Random, node: dict[str, Any], steps: tuple[Any, ...], leaf: Any) -> list[Any]:
    """Put values along `steps` under `node` (arrays or not, filters met or not); the leaf nodes set."""
    if not steps:
        return [node]
    step, rest = steps[0], steps[1:]
    existing = node.get(step.key)
    made: list[Any] = []
    if existing is None:
        count = rng.choice([1, 1, 1, 2, 3, 0])
        for _ in range(count):
            child: Any = leaf() if not rest else {}
            if isinstance(child, dict) and step.filters and rng.random() < 0.8:
                for f, lit in step.filters:
                    child[f] = lit
            made.append(child)
        if count == 0:
            node[step.key] = []
            return []
        node[step.key] = made if count > 1 or rng.random() < 0.5 else made[0]
    else:
        made = existing if isinstance(existing, list) else [existing]
    if not rest:
        return made
    out: list[Any] = []
    for child in made:
        if isinstance(child, dict):
            out.extend(_fill(rng, child, rest, leaf))
    return out


def synthetic(rtype: str, seed: int) -> dict[str, Any]:
    from fhirvault.domain.search.params import search_params

    rng = random.Random(f"{rtype}/{seed}")
    res: dict[str, Any] = {"resourceType": rtype, "id": f"s{seed}"}
    if rng.random() < 0.5:
        res["contained"] = [
            {"resourceType": _pick(rng, ["Patient", "Practitioner", "Organization", "Group"]), "id": cid}
            for cid in ("c1", "c2") if rng.random() < 0.7
        ]
    if rng.random() < 0.3:
        res["extension"] = [{"url": "http://x.org/ext", "valueString": _pick(rng, STRINGS)}]
    for param in search_params(rtype).values():
        for path in param.paths:
            if rng.random() < 0.35:
                continue
            if path.truthy is not None:
                for steps in path.truthy:
                    if rng.random() < 0.5:
                        _fill(rng, res, steps, lambda: _pick(rng, [True, False, "2020-01-01", {}]))
                continue
            vt = path.value_type
            if path.components:
                for focus in _fill(rng, res, path.steps, dict):
                    if not isinstance(focus, dict):
                        continue
                    for comp in path.components:
                        for cpath in comp:
                            if rng.random() < 0.8:
                                cvt = cpath.value_type
                                _fill(rng, res if cpath.rooted else focus, cpath.steps, lambda t=cvt: _value(rng, t))
                continue
            if path.steps:
                _fill(rng, res, path.steps, lambda t=vt: _value(rng, t))
    return res


def _carebundle(count: int, seed: int) -> Iterator[dict[str, Any]]:
    import carebundle

    for i, bundle in enumerate(carebundle.generate_cohort(count=count, seed=seed)):
        body = json.loads(carebundle.to_json(bundle))
        entries = [e for e in body.get("entry", []) if isinstance(e.get("resource"), dict)]
        for e in entries:  # ids from the urn:uuid fullUrls
            e["resource"].setdefault("id", e.get("fullUrl", "").rsplit(":", 1)[-1])
        text = json.dumps([e["resource"] for e in entries])
        if i % 2 == 0:  # half the patients as stored after a transaction: relative references
            for e in entries:
                r = e["resource"]
                text = text.replace(json.dumps(e.get("fullUrl", "")), json.dumps(f"{r['resourceType']}/{r['id']}"))
        yield from json.loads(text)


def _xml_examples() -> Iterator[dict[str, Any]]:
    from fhirvault.fhir.xml import xml_to_json

    for path in sorted(XML_EXAMPLES.glob("*.xml")):
        yield json.loads(xml_to_json(path.read_bytes()))


def generate() -> None:
    from fhirvault.domain import r4
    from fhirvault.domain.search.values import index_terms

    rows: list[tuple[dict[str, Any], bool]] = []
    rows += [(r, False) for r in _carebundle(24, 11)]
    rows += [(r, False) for r in _xml_examples()]
    for rtype in sorted(r4.resource_types()):
        for seed in range(12):
            rows.append((synthetic(rtype, seed), seed % 4 == 3))
    GOLDEN.parent.mkdir(exist_ok=True)
    with gzip.GzipFile(GOLDEN, "wb", mtime=0) as fh:
        for resource, dec in rows:
            # the JSON round trip is what load() gives back (floats, or Decimals when dec)
            text = json.dumps(resource, ensure_ascii=False, sort_keys=True)
            back = json.loads(text, parse_float=Decimal) if dec else json.loads(text)
            terms = index_terms(back["resourceType"], back)
            row = {"t": back["resourceType"], "dec": dec, "r": json.loads(text),
                   "terms": {c: [t.decode() for t in ts] for c, ts in terms.items()}}
            fh.write(json.dumps(row, ensure_ascii=False, sort_keys=False).encode() + b"\n")
    import fhirvault

    print(f"index_terms of {fhirvault.__file__}", file=sys.stderr)
    print(f"{len(rows)} resources -> {GOLDEN} ({GOLDEN.stat().st_size:,} bytes)", file=sys.stderr)


if __name__ == "__main__":
    sys.path.append(str(ROOT / "src"))  # PYTHONPATH first: the build whose terms are recorded
    generate()
