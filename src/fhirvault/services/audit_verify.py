"""``fhirvault audit verify``: recompute the audit log's Merkle tree and check everything against it.

One pass over the entries, in order:
- positions are contiguous (a gap is a deleted entry);
- each entry of this tenant authenticates under the audit key *at its position*
  (the AEAD binds seq and time), so a modified, forged, replayed or moved entry
  is named exactly — and when a moved entry authenticates at another position,
  the report says which one it was;
- its blind-index tags are the ones its content implies (the search index was not
  doctored to hide it);
- the tree over the entries matches every signed checkpoint (Ed25519, our key);
- every witnessed checkpoint — held where the DBA cannot rewrite it — is signed
  by us and matches the tree: a log truncated, rolled back to an older copy, or
  replaced by a shorter consistent one shows up here; the consistency proofs
  stored with witnessed checkpoints verify.

``verify_recent`` is the start-up check the server's readiness waits for: the same
checks over the entries after the last witnessed (or last fully verified) signed
checkpoint, once the subtree hashes stored for that checkpoint rebuild its signed
root. Older entries are left to the full pass, which the server runs in the
background right after (services/audit_monitor.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fhirvault.domain import merkle
from fhirvault.domain.merkle import CompactTree
from fhirvault.ports import AuditCheckpoint, AuditRow, ResourceStore
from fhirvault.services.audit import AuditTrail, leaf_data
from fhirvault.services.audit_checkpoints import (
    CheckpointVerifier,
    StoreNodes,
    WitnessedCheckpoint,
    compact_tree_at,
    decode_proof,
)
from fhirvault.services.crypto import DecryptionError

_BATCH = 20_000
_MAX_PROBLEMS = 50
_MOVE_WINDOW = 64  # positions tried when an entry does not open where it stands


@dataclass
class VerifyReport:
    entries: int = 0
    checkpoints: int = 0
    witnessed: int = 0
    tree_size: int = 0
    root: bytes = merkle.EMPTY_ROOT
    first_bad_seq: int | None = None
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    since: int = 0  # entries 1..since were not re-read (verify_recent: covered by that signed checkpoint)
    verified_checkpoint: int = 0  # the largest checkpoint size the entries were found to match

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, message: str, seq: int | None = None) -> None:
        if seq is not None and (self.first_bad_seq is None or seq < self.first_bad_seq):
            self.first_bad_seq = seq
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(message)

    def summary(self) -> str:
        if self.ok:
            scope = f" after the checkpoint at {self.since}" if self.since else ""
            return (f"audit log OK: {self.entries} entries{scope}, {self.checkpoints} signed checkpoints, "
                    f"{self.witnessed} witnessed checkpoints verified in {self.seconds:.1f} s")
        return f"audit log FAILED: {self.problems[0]}"

    def to_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "entries": self.entries, "checkpoints": self.checkpoints,
                "witnessed": self.witnessed, "tree_size": self.tree_size, "root": self.root.hex(),
                "first_bad_seq": self.first_bad_seq, "problems": self.problems, "seconds": round(self.seconds, 3),
                "since": self.since}


def _moved_from(trail: AuditTrail, row: AuditRow) -> int | None:
    for delta in range(1, _MOVE_WINDOW + 1):
        for seq in (row.seq + delta, row.seq - delta):
            if seq > 0:
                try:
                    trail.decrypt(seq, row.ts_ms, row.blob)
                except DecryptionError:
                    continue
                return seq
    return None


class _Pass:
    def __init__(self, report: VerifyReport, trail: AuditTrail | None, wanted: set[int]) -> None:
        self.report = report
        self.trail = trail
        self.tree = CompactTree()
        self.wanted = wanted
        self.roots: dict[int, bytes] = {}
        self.expected = 1

    def entry(self, row: AuditRow) -> None:
        report, trail = self.report, self.trail
        if row.seq != self.expected:
            if row.seq > self.expected:
                report.problem(f"entries {self.expected}..{row.seq - 1} are missing (deleted)", self.expected)
            else:
                report.problem(f"entry {row.seq} appears out of order", row.seq)
            self.expected = row.seq
        if trail is not None and row.tenant == trail.tenant:
            try:
                doc = trail.decrypt(row.seq, row.ts_ms, row.blob)
            except DecryptionError:
                origin = _moved_from(trail, row)
                if origin is None:
                    report.problem(f"entry {row.seq} does not authenticate: modified or forged", row.seq)
                else:
                    report.problem(f"entry {row.seq} holds entry {origin}'s sealed record: entries were "
                                   "reordered, deleted or inserted and renumbered", row.seq)
            else:
                if trail.tags_from(doc) != row.tags:
                    report.problem(f"entry {row.seq}: its search-index tags were altered", row.seq)
        self.tree.append(merkle.leaf_hash(leaf_data(row)))
        self.expected += 1
        if self.tree.size in self.wanted:
            self.roots[self.tree.size] = self.tree.root()


def _checkpoints(store: ResourceStore) -> list[AuditCheckpoint]:
    checkpoints: list[AuditCheckpoint] = []
    after = 0
    while batch := store.audit_checkpoints(after_size=after, limit=10_000):
        checkpoints += batch
        after = batch[-1].size
    return checkpoints


def _wanted(checkpoints: Sequence[AuditCheckpoint], witnesses: Sequence[tuple[str, Sequence[WitnessedCheckpoint]]]
            ) -> set[int]:
    wanted = {cp.size for cp in checkpoints} | {cp.proof_from for cp in checkpoints if cp.proof_from}
    return wanted | {w.size for _, ws in witnesses for w in ws}


def _read_entries(store: ResourceStore, state: _Pass, after: int, progress: Callable[[int], None] | None) -> None:
    while rows := store.audit_rows(after_seq=after, limit=_BATCH):
        for row in rows:
            state.entry(row)
        after = rows[-1].seq
        if progress is not None:
            progress(after)
    report = state.report
    report.entries = report.tree_size = state.tree.size
    report.root = state.tree.root()


def verify_log(store: ResourceStore, trail: AuditTrail | None, verifier: CheckpointVerifier,
               witnesses: Sequence[tuple[str, Sequence[WitnessedCheckpoint]]] = (),
               progress: Callable[[int], None] | None = None) -> VerifyReport:
    """The full pass: every entry, every checkpoint, every witnessed checkpoint."""
    started = time.perf_counter()
    report = VerifyReport()
    checkpoints = _checkpoints(store)
    state = _Pass(report, trail, _wanted(checkpoints, witnesses))
    _read_entries(store, state, 0, progress)
    _check_checkpoints(report, state, verifier, checkpoints, witnesses)
    report.seconds = time.perf_counter() - started
    return report


def verify_recent(store: ResourceStore, trail: AuditTrail | None, verifier: CheckpointVerifier,
                  witnesses: Sequence[tuple[str, Sequence[WitnessedCheckpoint]]] = (),
                  verified_size: int = 0) -> VerifyReport:
    """The start-up pass: what follows the last witnessed checkpoint (or the last one a full pass matched,
    ``verified_size``), against everything signed or witnessed after it; a full pass when there is none.

    The stored subtree hashes must rebuild the anchor's signed root, so the tree it extends is the signed
    one; whether the entries before it still hash to those subtrees is the full pass's job.
    """
    started = time.perf_counter()
    checkpoints = _checkpoints(store)
    anchor = next((cp for cp in reversed(checkpoints)
                   if (cp.witnessed or cp.size <= verified_size) and verifier.checkpoint_valid(cp)), None)
    if anchor is None:
        return verify_log(store, trail, verifier, witnesses)
    report = VerifyReport(since=anchor.size)
    state = _Pass(report, trail, _wanted(checkpoints, witnesses))
    try:
        state.tree = compact_tree_at(StoreNodes(store), anchor.size)
    except LookupError:  # the few entries not covered by a stored subtree are gone
        state.tree = CompactTree()
    if state.tree.size != anchor.size or state.tree.root() != anchor.root:
        # Entries or stored subtree hashes before it were changed or deleted: the full pass names them.
        return verify_log(store, trail, verifier, witnesses)
    state.expected = anchor.size + 1
    state.roots[anchor.size] = anchor.root
    _read_entries(store, state, anchor.size, None)
    report.entries = state.tree.size - anchor.size
    _check_checkpoints(report, state, verifier, checkpoints, witnesses, since=anchor.size)
    report.seconds = time.perf_counter() - started
    return report


def _check_checkpoints(report: VerifyReport, state: _Pass, verifier: CheckpointVerifier,
                       checkpoints: Sequence[AuditCheckpoint],
                       witnesses: Sequence[tuple[str, Sequence[WitnessedCheckpoint]]], since: int = 0) -> None:
    """Checkpoints and witnesses against the tree; those below ``since`` only against the signed checkpoints."""
    size = state.tree.size
    good = since  # the largest size whose checkpoint matched
    for cp in checkpoints:
        if cp.size < since:
            continue
        report.checkpoints += 1
        if not verifier.checkpoint_valid(cp):
            report.problem(f"checkpoint at size {cp.size}: signature invalid (forged, or another deployment's)")
            continue
        if cp.size > size:
            report.problem(f"log truncated: a signed checkpoint covers {cp.size} entries, the log has {size} "
                           f"(entries {size + 1}..{cp.size} deleted)", size + 1)
            continue
        if state.roots.get(cp.size) != cp.root:
            report.problem(f"checkpoint at size {cp.size} does not match the entries: an entry in "
                           f"{good + 1}..{cp.size} was changed",
                           good + 1 if report.first_bad_seq is None else None)
        else:
            good = cp.size
        if cp.witnessed and cp.proof_from and cp.proof_from >= since:
            old = state.roots.get(cp.proof_from)
            if old is None or not merkle.verify_consistency(cp.proof_from, cp.size, old, cp.root,
                                                            decode_proof(cp.proof)):
                report.problem(f"consistency proof {cp.proof_from} -> {cp.size} does not verify")
    report.verified_checkpoint = good
    known = {cp.size: cp for cp in checkpoints}
    for name, held in witnesses:
        for w in held:
            report.witnessed += 1
            if w.origin != verifier.origin or not verifier.valid(w.size, w.root, w.ts_ms, w.key_id, w.signature):
                report.problem(f"witness {name}: checkpoint at size {w.size} is not signed by this deployment")
                continue
            # below ``since``: the signed checkpoint stands for the tree (the full pass rebuilds it)
            root = state.roots.get(w.size) if w.size >= since else known[w.size].root if w.size in known else None
            if w.size > size:
                report.problem(f"log truncated or rolled back: witness {name} holds a checkpoint of {w.size} "
                               f"entries (time {w.ts_ms}), the log has {size}", size + 1)
            elif root != w.root and (w.size >= since or w.size in known):
                report.problem(f"log rewritten: the tree at size {w.size} differs from the one witness {name} "
                               "holds")
            elif w.size not in known:
                report.problem(f"checkpoint at size {w.size} (held by witness {name}) was removed from the log")


def verify_data_dir(settings: object, witness_specs: Sequence[str] = ()) -> VerifyReport:
    """Verify the audit log of a data directory (opens the store, keys and configured witnesses)."""
    from fhirvault.adapters.witness import open_witness
    from fhirvault.config import Settings
    from fhirvault.container import build

    assert isinstance(settings, Settings)
    container = build(settings)
    try:
        specs = list(dict.fromkeys([*settings.audit_witness_specs, *witness_specs]))
        held: list[tuple[str, Sequence[WitnessedCheckpoint]]] = []
        for spec in specs:
            contents = open_witness(spec).read()
            if contents is not None:
                held.append((spec, contents))
        return verify_log(container.store, container.audit, container.audit_signer, held)
    finally:
        container.close()
