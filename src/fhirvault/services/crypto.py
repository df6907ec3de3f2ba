"""Authenticated encryption of everything fhirvault writes.

Envelope: ``version byte || 96-bit random nonce || AES-256-GCM(ciphertext+tag)``.
The associated data binds a blob to where it belongs (tenant, type, id,
version, key id), so a row copied to another place, another version or another
key fails to decrypt instead of being served. Associated data is encoded with
length prefixes so that no two different tuples encode to the same bytes.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

ENVELOPE_V1 = 1
NONCE_BYTES = 12
KEY_BYTES = 32
_HEADER = 1 + NONCE_BYTES
_TAG_BYTES = 16


class DecryptionError(Exception):
    """A blob failed authentication: wrong key, wrong context, or tampered bytes."""


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


_LENGTH = struct.Struct(">I").pack


def associated_data(*parts: str | bytes | int) -> bytes:
    """Length-prefixed parts (4-byte big-endian length each): no two different lists give the same bytes."""
    out: list[bytes] = []
    for part in parts:
        raw = part.encode() if isinstance(part, str) else str(part).encode() if isinstance(part, int) else part
        out.append(_LENGTH(len(raw)))
        out.append(raw)
    return b"".join(out)


class Aead:
    """AES-256-GCM bound to one key. Cheap to keep around; thread-safe."""

    __slots__ = ("_aes",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError("AES-256-GCM needs a 32-byte key")
        self._aes = AESGCM(key)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return bytes((ENVELOPE_V1,)) + nonce + self._aes.encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        if len(blob) < _HEADER + _TAG_BYTES or blob[0] != ENVELOPE_V1:
            raise DecryptionError("unknown or truncated envelope")
        try:
            return self._aes.decrypt(blob[1:_HEADER], blob[_HEADER:], aad)
        except InvalidTag:
            raise DecryptionError("authentication failed") from None


def derive_key(secret: bytes, purpose: str, context: Iterable[str] = ()) -> bytes:
    """HKDF-SHA256 sub-key for one purpose, so one secret never serves two uses."""
    info = associated_data("fhirvault", purpose, *context)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)
