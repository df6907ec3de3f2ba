"""Key escrow: recovery file under a passphrase, M-of-N shares, and their failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fhirvault.adapters.keyfile import KeyFileProvider
from fhirvault.backup.escrow import (
    Argon2Params,
    EscrowError,
    export_passphrase,
    export_shares,
    generate_passphrase,
    recover_passphrase,
    recover_shares,
)

QUICK = Argon2Params(time_cost=1, memory_kib=8 * 1024, parallelism=1)  # unit tests only


@pytest.fixture
def key_file(tmp_path: Path) -> bytes:
    KeyFileProvider.create(tmp_path / "root.key")
    return (tmp_path / "root.key").read_bytes()


def test_passphrase_round_trip_with_strong_defaults(key_file: bytes) -> None:
    phrase = generate_passphrase()
    assert len(phrase) >= 24
    doc = export_passphrase(key_file, phrase, "inst1")
    parsed = json.loads(doc)
    assert parsed["kdf"]["name"] == "argon2id" and parsed["kdf"]["memory_kib"] >= 256 * 1024
    assert key_file not in doc and json.loads(key_file)["keys"].popitem()[1].encode() not in doc
    assert recover_passphrase(doc, phrase) == key_file


def test_wrong_passphrase_is_a_clear_error(key_file: bytes) -> None:
    doc = export_passphrase(key_file, "correct horse battery", "inst1", QUICK)
    with pytest.raises(EscrowError, match="wrong recovery passphrase"):
        recover_passphrase(doc, "correct horse batterY")


def test_tampered_recovery_file_and_short_passphrase(key_file: bytes) -> None:
    doc = json.loads(export_passphrase(key_file, "correct horse battery", "inst1", QUICK))
    doc["instance_id"] = "other"
    with pytest.raises(EscrowError, match=r"wrong recovery passphrase|modified"):
        recover_passphrase(json.dumps(doc).encode(), "correct horse battery")
    with pytest.raises(EscrowError, match="not a fhirvault recovery file"):
        recover_passphrase(b"{}", "correct horse battery")
    with pytest.raises(EscrowError, match="at least 12"):
        export_passphrase(key_file, "short", "inst1", QUICK)


def test_shares_any_m_recover(key_file: bytes) -> None:
    shares = export_shares(key_file, 3, 5, "inst1")
    assert len(shares) == 5
    for s in shares:
        assert key_file not in s
    assert recover_shares([shares[4], shares[0], shares[2]]) == key_file
    assert recover_shares(shares) == key_file


def test_too_few_corrupted_or_mixed_shares_are_refused(key_file: bytes) -> None:
    shares = export_shares(key_file, 3, 5, "inst1")
    with pytest.raises(EscrowError, match="too few shares: 2 distinct given, 3 needed"):
        recover_shares([shares[0], shares[1]])
    with pytest.raises(EscrowError, match="too few"):
        recover_shares([shares[0], shares[0], shares[1]])
    doc = json.loads(shares[1])
    data = bytearray(bytes.fromhex(doc["share"]))
    data[5] ^= 0xFF
    doc["share"] = data.hex()
    with pytest.raises(EscrowError, match=r"share #2 \(index 2\) is corrupted"):
        recover_shares([shares[0], json.dumps(doc).encode(), shares[2]])
    other = export_shares(key_file, 3, 5, "inst1")
    with pytest.raises(EscrowError, match="different exports"):
        recover_shares([shares[0], shares[1], other[2]])
    with pytest.raises(EscrowError, match="not a fhirvault recovery share"):
        recover_shares([b"garbage", shares[1], shares[2]])


def test_a_share_altered_with_a_recomputed_checksum_is_detected(key_file: bytes) -> None:
    import hashlib

    from fhirvault.services.crypto import associated_data

    shares = export_shares(key_file, 2, 3, "inst1")
    doc = json.loads(shares[0])
    data = bytearray(bytes.fromhex(doc["share"]))
    data[0] ^= 1
    doc["share"] = data.hex()
    doc["check"] = hashlib.sha256(associated_data("share", doc["set"], doc["index"], bytes(data))).hexdigest()[:16]
    with pytest.raises(EscrowError, match="do not rebuild the key"):
        recover_shares([json.dumps(doc).encode(), shares[1]])
