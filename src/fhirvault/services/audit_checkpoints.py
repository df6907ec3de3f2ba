"""Signed checkpoints of the audit log's Merkle tree, and their publication to witnesses.

The checkpointer follows the committed audit entries (it reads, never writes,
the entries), keeps the tree's right edge in memory, stores the hashes of
complete subtrees of 256 leaves and more (so proofs never reread the whole
log), and every ``checkpoint_interval`` signs the tree head with Ed25519. Every
``witness_interval`` (and on shutdown) the checkpoint also goes to the
witnesses — places the database administrator cannot rewrite — with a
consistency proof from the previous witnessed checkpoint kept in the log.

The signed text follows the transparency-log checkpoint layout (origin, size,
base64 root hash) plus the time, so standard tooling can read it.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fhirvault.domain import merkle
from fhirvault.domain.merkle import CompactTree
from fhirvault.ports import (
    AuditCheckpoint,
    Clock,
    Leadership,
    LostLeadership,
    ResourceStore,
    StoreUnavailable,
)
from fhirvault.services.audit import leaf_data

log = logging.getLogger("fhirvault.audit")

SIGNING_SECRET = "audit-signing"  # noqa: S105 - the name of a stored secret, not a secret
NODE_MIN_LEVEL = 8  # keep complete subtrees of 256 leaves and more: 1/128 of the entries
_READ_BATCH = 20_000


# -- signatures -------------------------------------------------------------------------
def checkpoint_body(origin: str, size: int, root: bytes, ts_ms: int) -> bytes:
    return f"{origin}\n{size}\n{base64.b64encode(root).decode()}\n{ts_ms}\n".encode()


class CheckpointVerifier:
    def __init__(self, origin: str, public_key: bytes) -> None:
        self.origin = origin
        self.public_key = public_key
        self.key_id = hashlib.sha256(public_key).hexdigest()[:16]
        self._pub = Ed25519PublicKey.from_public_bytes(public_key)

    def valid(self, size: int, root: bytes, ts_ms: int, key_id: str, signature: bytes) -> bool:
        if key_id != self.key_id:
            return False
        try:
            self._pub.verify(signature, checkpoint_body(self.origin, size, root, ts_ms))
        except InvalidSignature:
            return False
        return True

    def checkpoint_valid(self, cp: AuditCheckpoint) -> bool:
        return self.valid(cp.size, cp.root, cp.ts_ms, cp.key_id, cp.signature)


class CheckpointSigner(CheckpointVerifier):
    """Ed25519 over the checkpoint text; the seed is a service secret wrapped by the root key."""

    def __init__(self, origin: str, seed: bytes) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(seed[:32])
        super().__init__(origin, self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    def sign(self, size: int, root: bytes, ts_ms: int) -> bytes:
        return self._key.sign(checkpoint_body(self.origin, size, root, ts_ms))


def origin_for(instance_id: str) -> str:
    return f"fhirvault-audit/{instance_id}"


# -- witnesses -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class WitnessedCheckpoint:
    origin: str
    size: int
    root: bytes
    ts_ms: int
    key_id: str
    signature: bytes

    def to_json(self) -> bytes:
        return orjson.dumps({"origin": self.origin, "size": self.size, "root": base64.b64encode(self.root).decode(),
                             "ts_ms": self.ts_ms, "key_id": self.key_id,
                             "signature": base64.b64encode(self.signature).decode()})

    @staticmethod
    def from_json(raw: bytes) -> WitnessedCheckpoint:
        doc: dict[str, Any] = orjson.loads(raw)
        return WitnessedCheckpoint(str(doc["origin"]), int(doc["size"]), base64.b64decode(doc["root"]),
                                   int(doc["ts_ms"]), str(doc["key_id"]), base64.b64decode(doc["signature"]))


class Witness(Protocol):
    @property
    def name(self) -> str: ...

    def publish(self, checkpoint: WitnessedCheckpoint) -> None:
        """Hand the checkpoint to the witness; raise OSError if it could not be delivered."""

    def read(self) -> list[WitnessedCheckpoint] | None:
        """What the witness holds, oldest first; None for write-only witnesses (syslog)."""


# -- the tree over stored entries -------------------------------------------------------
class StoreNodes:
    """merkle.NodeSource over the store: leaves recomputed from the entries, big subtrees stored."""

    def __init__(self, store: ResourceStore) -> None:
        self._store = store

    def leaves(self, start: int, end: int) -> list[bytes]:
        rows = self._store.audit_rows(after_seq=start, limit=end - start)
        if len(rows) != end - start or (rows and rows[0].seq != start + 1):
            raise LookupError("audit entries missing")
        return [merkle.leaf_hash(leaf_data(r)) for r in rows]

    def complete(self, level: int, index: int) -> bytes | None:
        return self._store.audit_node(level, index) if level >= NODE_MIN_LEVEL else None


def compact_tree_at(nodes: merkle.NodeSource, size: int) -> CompactTree:
    """The right edge of the tree of ``size`` leaves, from stored subtrees (and ≤ 255 leaves)."""
    stack: list[bytes] = []
    start = 0
    for bit in reversed(range(size.bit_length())):
        width = 1 << bit
        if size & width:
            stack.append(merkle.subtree_hash(nodes, start, start + width))
            start += width
    return CompactTree(size, stack)


def encode_proof(proof: Sequence[bytes]) -> bytes:
    return b"".join(proof)


def decode_proof(raw: bytes) -> list[bytes]:
    return [raw[i : i + merkle.HASH_SIZE] for i in range(0, len(raw), merkle.HASH_SIZE)]


class AuditCheckpointer:
    def __init__(self, store: ResourceStore, signer: CheckpointSigner, clock: Clock,
                 witnesses: Sequence[Witness] = (), *, checkpoint_interval_s: float = 10.0,
                 witness_interval_s: float = 60.0, leadership: Leadership | None = None) -> None:
        self._store = store
        self._leadership = leadership  # None: this process is the only one
        self._leading = False
        self._signer = signer
        self._clock = clock
        self._witnesses = list(witnesses)
        self._checkpoint_interval = checkpoint_interval_s
        self._witness_interval = witness_interval_s
        self._nodes = StoreNodes(store)
        self._lock = threading.Lock()
        self._checkpointed: AuditCheckpoint | None = None
        self._tree: CompactTree | None = None  # loaded on the first step (the log may be damaged)
        self._witnessed: AuditCheckpoint | None = None
        self._last_checkpoint_at = time.monotonic()
        self._last_witness_at = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.witness_failures = 0
        # (entries newly covered by the tree, seconds the oldest of them waited) / each signed checkpoint
        self.on_entries: list[Callable[[int, float], None]] = []
        self.on_checkpoint: list[Callable[[AuditCheckpoint], None]] = []

    def _last_witnessed(self) -> AuditCheckpoint | None:
        found: AuditCheckpoint | None = None
        after = 0
        while True:
            cps = self._store.audit_checkpoints(after_size=after, limit=1000)
            if not cps:
                return found
            found = next((cp for cp in reversed(cps) if cp.witnessed), found)
            after = cps[-1].size

    def _load(self) -> CompactTree:
        if self._tree is None:
            latest = self._store.latest_audit_checkpoint()
            self._tree = compact_tree_at(self._nodes, latest.size) if latest else CompactTree()
            self._checkpointed = latest
            self._witnessed = self._last_witnessed()
        return self._tree

    @property
    def tree_size(self) -> int:
        return self._tree.size if self._tree is not None else 0

    @property
    def latest(self) -> AuditCheckpoint | None:
        return self._checkpointed

    # -- one step ---------------------------------------------------------------------
    def catch_up(self) -> list[tuple[int, int, bytes]]:
        """Extend the in-memory tree over the committed entries; return the finished big subtrees."""
        tree = self._load()
        finished: list[tuple[int, int, bytes]] = []
        while True:
            rows = self._store.audit_rows(after_seq=tree.size, limit=_READ_BATCH)
            if not rows:
                return finished
            for row in rows:
                if row.seq != tree.size + 1:
                    raise LookupError(f"audit entry {tree.size + 1} is missing")
                finished += [n for n in tree.append(merkle.leaf_hash(leaf_data(row))) if n[0] >= NODE_MIN_LEVEL]
            lag = max(0.0, (self._clock.now_ms() - min(r.ts_ms for r in rows)) / 1000)
            for cb in self.on_entries:
                cb(len(rows), lag)

    def step(self, *, force: bool = False, witness: bool | None = None) -> AuditCheckpoint | None:
        """Catch up, and write (and maybe witness) a signed checkpoint when one is due.

        A forced step (shutdown, tools, tests) first takes the checkpointer's role, which the
        write's fence then checks: it fails with LostLeadership where another process holds it."""
        if force and not self._leads():
            raise LostLeadership("audit-checkpoints")
        with self._lock:
            finished = self.catch_up()
            tree = self._load()
            now = time.monotonic()
            size = tree.size
            grew = size > (self._checkpointed.size if self._checkpointed else 0)
            due = force or now - self._last_checkpoint_at >= self._checkpoint_interval
            if not grew or not due:
                if finished:
                    self._store.write_sync("audit.nodes", lambda tx: tx.add_audit_nodes(finished))
                return None
            to_witness = bool(self._witnesses) and (
                witness if witness is not None else now - self._last_witness_at >= self._witness_interval)
            root = tree.root()
            ts_ms = self._clock.now_ms()
            proof_from, proof = 0, b""
            if to_witness:
                # The proof is built from the stored subtrees, so write the new ones first.
                if finished:
                    self._store.write_sync("audit.nodes", lambda tx: tx.add_audit_nodes(finished))
                    finished = []
                if self._witnessed is not None:
                    proof_from = self._witnessed.size
                    proof = encode_proof(merkle.consistency_proof(self._nodes, proof_from, size))
            cp = AuditCheckpoint(size, ts_ms, root, self._signer.key_id, self._signer.sign(size, root, ts_ms),
                                 to_witness, proof_from, proof)
            nodes = finished

            def write(tx: Any) -> None:
                if self._leadership is not None:  # a former leader that has not noticed yet fails here
                    self._leadership.fence(tx, "audit-checkpoints")
                if nodes:
                    tx.add_audit_nodes(nodes)
                tx.add_audit_checkpoint(cp)

            self._store.write_sync("audit.checkpoint", write)
            self._checkpointed = cp
            self._last_checkpoint_at = now
            for cb in self.on_checkpoint:
                cb(cp)
            if to_witness:
                self._last_witness_at = now
                self._witnessed = cp
                self._publish(cp)
            return cp

    def _publish(self, cp: AuditCheckpoint) -> None:
        witnessed = WitnessedCheckpoint(self._signer.origin, cp.size, cp.root, cp.ts_ms, cp.key_id, cp.signature)
        for w in self._witnesses:
            try:
                w.publish(witnessed)
            except OSError as exc:
                self.witness_failures += 1
                log.error("audit witness unavailable", extra={"witness": w.name, "error": type(exc).__name__})

    # -- background thread ------------------------------------------------------------
    def _leads(self) -> bool:
        """One checkpointer per cluster: only the process holding the role signs checkpoints."""
        if self._leadership is None:
            return True
        leading = self._leadership.lead("audit-checkpoints")
        if leading and not self._leading:
            with self._lock:
                self._tree = None  # taking over: reload from the checkpoints the previous leader wrote
        self._leading = leading
        return leading

    def start(self, poll_s: float = 1.0) -> None:
        def run() -> None:
            while not self._stop.wait(poll_s):
                try:
                    if self._leads():
                        self.step()
                except (LostLeadership, StoreUnavailable) as exc:  # another process takes over / reconnecting
                    log.warning("audit checkpoint skipped", extra={"error": type(exc).__name__})
                except Exception:  # keep checkpointing; the verifier reports what is wrong
                    log.exception("audit checkpoint failed")

        self._thread = threading.Thread(target=run, name="fhirvault-audit-checkpoints", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and write a final, witnessed checkpoint (shutdown)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if not self._leads():
            return  # another process is the checkpointer
        try:
            self.step(force=True, witness=True)
        except Exception:
            log.exception("final audit checkpoint failed")
