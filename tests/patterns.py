"""Deterministic, non-repeating test content shared by the disk image and integrity tests."""

from __future__ import annotations

import hashlib


def pattern(size: int, seed: int = 0) -> bytes:
    """``size`` bytes of SHA-512 output over ``"seed:counter"``; a different seed, other
    bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha512(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])
