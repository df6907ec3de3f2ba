"""Key escrow: the root key file, exported for recovery on a new machine.

Without the root key a backup is noise, so the root key file (every key in it:
the active one and any not yet retired) is exported, kept apart from the
backups, in one or both forms:

* a **recovery file** encrypted under a passphrase: Argon2id (256 MiB, 3
  passes, 4 lanes; RFC 9106 territory, about a second here) derives an
  AES-256-GCM key; the instance id is bound as associated data;
* **M-of-N shares** (Shamir over GF(256)) for separate officers: any M rebuild
  the key file, fewer reveal nothing. Each share carries a checksum (a damaged
  share is named) and the set id (shares of different exports do not mix).

Re-export after every root key rotation: a new root key is not in older material.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass

import orjson
from argon2.low_level import Type, hash_secret_raw

from fhirvault.backup import shamir
from fhirvault.services.crypto import Aead, DecryptionError, associated_data

RECOVERY_FORMAT = "fhirvault-recovery"
SHARE_FORMAT = "fhirvault-recovery-share"
KEY_FILE_FORMAT = "fhirvault-root-key"
MIN_PASSPHRASE = 12


class EscrowError(ValueError):
    """Recovery material is wrong, damaged, incomplete or mismatched; the message says which."""


@dataclass(frozen=True)
class Argon2Params:
    time_cost: int = 3
    memory_kib: int = 256 * 1024
    parallelism: int = 4


STRONG = Argon2Params()


def check_key_file(raw: bytes) -> list[str]:
    """The root key ids in a key file's bytes; ``EscrowError`` if it is not one."""
    try:
        doc = json.loads(raw)
        if doc.get("format") != KEY_FILE_FORMAT or doc["active"] not in doc["keys"]:
            raise ValueError
        return sorted(doc["keys"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise EscrowError("the recovered bytes are not a fhirvault root key file") from None


def generate_passphrase() -> str:
    """About 130 bits, in groups easy to read aloud and type: ``ABCD-EFGH-…``."""
    raw = base64.b32encode(secrets.token_bytes(17)).decode().rstrip("=")
    return "-".join(raw[i:i + 4] for i in range(0, 24, 4))


def _derive(passphrase: str, salt: bytes, p: Argon2Params) -> bytes:
    return hash_secret_raw(passphrase.encode(), salt, time_cost=p.time_cost, memory_cost=p.memory_kib,
                           parallelism=p.parallelism, hash_len=32, type=Type.ID)


def export_passphrase(key_file: bytes, passphrase: str, instance_id: str, params: Argon2Params = STRONG) -> bytes:
    key_ids = check_key_file(key_file)
    if len(passphrase) < MIN_PASSPHRASE:
        raise EscrowError(f"the recovery passphrase must have at least {MIN_PASSPHRASE} characters")
    salt = secrets.token_bytes(16)
    sealed = Aead(_derive(passphrase, salt, params)).seal(key_file, associated_data(RECOVERY_FORMAT, instance_id))
    doc = {
        "format": RECOVERY_FORMAT, "version": 1, "instance_id": instance_id, "root_key_ids": key_ids,
        "kdf": {"name": "argon2id", "time_cost": params.time_cost, "memory_kib": params.memory_kib,
                "parallelism": params.parallelism, "salt": salt.hex()},
        "ciphertext": sealed.hex(),
    }
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"


def recover_passphrase(raw: bytes, passphrase: str) -> bytes:
    """The root key file's bytes; ``EscrowError`` on a wrong passphrase or a damaged file."""
    try:
        doc = orjson.loads(raw)
        if doc.get("format") != RECOVERY_FORMAT or doc.get("version") != 1:
            raise ValueError
        kdf = doc["kdf"]
        params = Argon2Params(int(kdf["time_cost"]), int(kdf["memory_kib"]), int(kdf["parallelism"]))
        salt = bytes.fromhex(kdf["salt"])
        sealed = bytes.fromhex(doc["ciphertext"])
        instance_id = str(doc["instance_id"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        raise EscrowError("not a fhirvault recovery file (or it is damaged)") from None
    if params.memory_kib > 4 * 1024 * 1024 or params.time_cost > 100:
        raise EscrowError("the recovery file asks for unreasonable Argon2 parameters")
    try:
        key_file = Aead(_derive(passphrase, salt, params)).open(sealed, associated_data(RECOVERY_FORMAT, instance_id))
    except DecryptionError:
        raise EscrowError("wrong recovery passphrase (or the recovery file was modified)") from None
    check_key_file(key_file)
    return key_file


def _share_check(set_id: str, index: int, data: bytes) -> str:
    return hashlib.sha256(associated_data("share", set_id, index, data)).hexdigest()[:16]


def _secret_check(set_id: str, secret: bytes) -> str:
    return hmac.new(secret, set_id.encode(), hashlib.sha256).hexdigest()[:16]


def export_shares(key_file: bytes, threshold: int, count: int, instance_id: str) -> list[bytes]:
    """``count`` share documents, any ``threshold`` of which rebuild the key file."""
    key_ids = check_key_file(key_file)
    try:
        shares = shamir.split(key_file, threshold, count)
    except ValueError as exc:
        raise EscrowError(str(exc)) from None
    set_id = secrets.token_hex(8)
    out = []
    for index, data in shares:
        doc = {
            "format": SHARE_FORMAT, "version": 1, "instance_id": instance_id, "root_key_ids": key_ids,
            "set": set_id, "threshold": threshold, "count": count, "index": index,
            "note": f"Share {index} of {count}; any {threshold} shares rebuild the fhirvault root key. "
                    "Keep it apart from the backups and from the other shares.",
            "share": data.hex(), "check": _share_check(set_id, index, data),
            "secret_check": _secret_check(set_id, key_file),
        }
        out.append(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    return out


def recover_shares(raws: list[bytes]) -> bytes:
    """The root key file's bytes from share documents; ``EscrowError`` names what is wrong."""
    docs = []
    for n, raw in enumerate(raws, 1):
        try:
            doc = orjson.loads(raw)
            if doc.get("format") != SHARE_FORMAT or doc.get("version") != 1:
                raise ValueError
            data = bytes.fromhex(doc["share"])
            index, threshold, set_id = int(doc["index"]), int(doc["threshold"]), str(doc["set"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise EscrowError(f"share #{n} is not a fhirvault recovery share (or it is damaged)") from None
        if not hmac.compare_digest(_share_check(set_id, index, data), str(doc.get("check", ""))):
            raise EscrowError(f"share #{n} (index {index}) is corrupted: its checksum does not match")
        docs.append((index, data, threshold, set_id, str(doc.get("secret_check", ""))))
    if not docs:
        raise EscrowError("no shares given")
    if len({d[3] for d in docs}) != 1:
        raise EscrowError("the shares come from different exports (set ids differ)")
    unique = {d[0]: d for d in docs}
    threshold = docs[0][2]
    if len(unique) < threshold:
        raise EscrowError(f"too few shares: {len(unique)} distinct given, {threshold} needed")
    chosen = list(unique.values())[:threshold]
    key_file = shamir.combine([(d[0], d[1]) for d in chosen])
    if not hmac.compare_digest(_secret_check(docs[0][3], key_file), docs[0][4]):
        raise EscrowError("the shares do not rebuild the key (a share was altered)")
    check_key_file(key_file)
    return key_file
