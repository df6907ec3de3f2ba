"""Shamir secret sharing over GF(256), byte by byte (M-of-N).

Each byte of the secret is the constant term of its own random polynomial of
degree M-1; share ``x`` (1..N) holds the polynomials' values at ``x``. Any M
shares give the secret back by Lagrange interpolation at 0; fewer than M reveal
nothing about it. The field is GF(2^8) with the AES polynomial x^8+x^4+x^3+x+1.
"""

from __future__ import annotations

import secrets

_EXP = [0] * 512
_LOG = [0] * 256


def _init_tables() -> None:
    x = 1
    for i in range(255):
        _EXP[i] = x
        _LOG[x] = i
        # multiply by the generator 3: x*2 (reduced) xor x
        x2 = x << 1
        if x2 & 0x100:
            x2 ^= 0x11B
        x = x2 ^ x
    for i in range(255, 512):
        _EXP[i] = _EXP[i - 255]


_init_tables()


def _mul(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    return _EXP[_LOG[a] + _LOG[b]]


def _div(a: int, b: int) -> int:
    if b == 0:
        raise ZeroDivisionError
    if a == 0:
        return 0
    return _EXP[_LOG[a] + 255 - _LOG[b]]


def split(secret: bytes, threshold: int, count: int) -> list[tuple[int, bytes]]:
    """``count`` shares ``(x, data)``, any ``threshold`` of which rebuild ``secret``."""
    if not 2 <= threshold <= count <= 255:
        raise ValueError("need 2 <= threshold <= shares <= 255")
    coeffs = [[b] + [secrets.randbelow(256) for _ in range(threshold - 1)] for b in secret]
    shares = []
    for x in range(1, count + 1):
        out = bytearray()
        for poly in coeffs:
            y = 0
            for c in reversed(poly):  # Horner
                y = _mul(y, x) ^ c
            out.append(y)
        shares.append((x, bytes(out)))
    return shares


def combine(shares: list[tuple[int, bytes]]) -> bytes:
    """The secret from at least ``threshold`` distinct shares (with fewer: unrelated bytes)."""
    xs = [x for x, _ in shares]
    if len(set(xs)) != len(xs) or any(not 1 <= x <= 255 for x in xs):
        raise ValueError("shares must have distinct indexes between 1 and 255")
    lengths = {len(d) for _, d in shares}
    if len(lengths) != 1:
        raise ValueError("shares have different lengths")
    # Lagrange basis at 0: l_i = prod_{j != i} x_j / (x_j - x_i); subtraction is xor.
    basis = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = _mul(num, xj)
                den = _mul(den, xj ^ xi)
        basis.append(_div(num, den))
    out = bytearray(lengths.pop())
    for (_, data), li in zip(shares, basis, strict=True):
        for k, y in enumerate(data):
            out[k] ^= _mul(y, li)
    return bytes(out)
