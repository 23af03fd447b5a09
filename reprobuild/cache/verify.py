"""``reprobuild cache verify``: re-hash every object of a cache and check every entry.

An object is rotten when its bytes no longer hash to its name; an entry is bad when its
metadata does not parse (or, given trusted keys, is not signed by one) or names an
object the cache does not hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from reprobuild.cache.backend import Cache
from reprobuild.cache.layout import (
    METADATA_LIMIT,
    is_hex64,
    object_name,
    parse_entry,
    verify_entry,
)
from reprobuild.errors import ReprobuildError
from reprobuild.proof import signing

CHUNK = 1 << 20
OBJECT_SUFFIX = ".tar.zst"


@dataclass(frozen=True)
class Problem:
    name: str  # the blob, e.g. objects/HASH.tar.zst or meta/ID.json
    message: str


@dataclass(frozen=True)
class CacheVerifyReport:
    objects: int
    entries: int
    problems: tuple[Problem, ...]


def _check_object(cache: Cache, name: str) -> Problem | None:
    expected = name[:-len(OBJECT_SUFFIX)] if name.endswith(OBJECT_SUFFIX) else ""
    where = f"objects/{name}"
    if not is_hex64(expected):
        return Problem(where, "not an object name (BLAKE3.tar.zst)")
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    try:
        with cache.open_read(where) as stream:
            while chunk := stream.read(CHUNK):
                hasher.update(chunk)
    except ReprobuildError as exc:
        return Problem(where, f"cannot be read: {exc.message}")
    actual = hasher.hexdigest()
    if actual != expected:
        return Problem(where, f"rotten: its bytes hash to blake3 {actual}")
    return None


def _check_entry(cache: Cache, name: str, objects: set[str],
                 keys: Mapping[str, Ed25519PublicKey] | None) -> Problem | None:
    where = f"meta/{name}"
    derivation_id = name[:-len(".json")] if name.endswith(".json") else ""
    try:
        data = cache.read_bytes(where, limit=METADATA_LIMIT)
        if data is None:
            return Problem(where, "vanished while verifying")
        if keys is not None:
            entry = verify_entry(data, keys, derivation_id=derivation_id).entry
        else:
            entry = parse_entry(signing.parse_envelope(data, what=where).payload)
            if entry.derivation_id != derivation_id:
                return Problem(where, f"describes derivation {entry.derivation_id}")
    except ReprobuildError as exc:
        return Problem(where, exc.message)
    if object_name(entry.object.blake3)[len("objects/"):] not in objects:
        return Problem(where, f"its object {object_name(entry.object.blake3)} is missing")
    return None


def verify_cache(cache: Cache, keys: Mapping[str, Ed25519PublicKey] | None = None, *,
                 jobs: int = 4) -> CacheVerifyReport:
    """Check every object and entry of ``cache``, ``jobs`` at a time."""
    object_names = cache.list("objects")
    entry_names = cache.list("meta")
    present = set(object_names)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        found = list(pool.map(lambda n: _check_object(cache, n), object_names))
        found += list(pool.map(lambda n: _check_entry(cache, n, present, keys), entry_names))
    problems = tuple(p for p in found if p is not None)
    return CacheVerifyReport(len(object_names), len(entry_names), problems)
