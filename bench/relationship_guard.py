#!/usr/bin/env python3
"""Cost of the relationship-write checks of issue #11, per write (no server, pure functions).

* guard: what ``Repository._guard_relationships`` adds to a user's CareTeam update that changes a
  member (change detection, self-assignment, what the new version opens to its writer), with the
  writer's relationships already cached;
* references: ``patients_referenced`` on an Observation (every user write: all the patients it names).

Usage: python bench/relationship_guard.py [--n 20000]
"""

from __future__ import annotations

import argparse
import timeit

from fhirvault.domain.compartment import patients_referenced
from fhirvault.services.relationships import Reach, Relationships, relationship_change, self_added


class _Clock:
    def now_ms(self) -> int:
        return 1_790_000_000_000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    n = ap.parse_args().n
    rel = Relationships(lambda _t, _p: [], _Clock())
    reach = Reach({f"p{i}": "careteam" for i in range(500)}, frozenset({"Practitioner/a", "PractitionerRole/r1"}))
    old = {"resourceType": "CareTeam", "id": "t", "status": "active", "subject": {"reference": "Patient/p1"},
           "participant": [{"member": {"reference": "Practitioner/b"}}]}
    new = {**old, "participant": [*old["participant"], {"member": {"reference": "Practitioner/a"}}]}
    obs = {"resourceType": "Observation", "subject": {"reference": "Patient/p1"}, "status": "final",
           "performer": [{"reference": "Practitioner/a"}], "code": {"text": "x"}}

    def guard() -> None:
        relationship_change("CareTeam", old, new)
        self_added("CareTeam", old, new, reach.members)
        rel.granted("CareTeam", new, reach, "o")

    for name, fn in (("guard per CareTeam write", guard),
                     ("references per Observation write", lambda: patients_referenced("Observation", obs))):
        best = min(timeit.repeat(fn, number=n, repeat=3)) / n
        print(f"{name}: {best * 1e6:.1f} us")


if __name__ == "__main__":
    main()
