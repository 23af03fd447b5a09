"""Substitution: put a derivation's output into the store from a cache, checked.

The order is what makes a cache unable to hand out wrong bytes: fetch the metadata;
check its signature with the trusted keys and that it describes the derivation asked
for; stream the object into the store's ``tmp/`` while hashing it against the signed
hash and size; unpack it through the hardened tar reader; let the store check the
output's hash against the signed one and register it atomically. Any failure raises
:class:`SubstituteError` naming the cache and the derivation, and leaves nothing
registered (the temporary directory is removed).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from reprobuild.cache import archive
from reprobuild.cache.backend import Cache, CacheError
from reprobuild.cache.layout import (
    DEFAULT_PRIORITY,
    METADATA_LIMIT,
    VerifiedEntry,
    log_name,
    meta_name,
    object_name,
    read_cache_info,
    verify_entry,
)
from reprobuild.errors import ReprobuildError
from reprobuild.proof import records
from reprobuild.store import canon
from reprobuild.store.store import Store, StoreEntry

OnBytes = Callable[[int], None]
LOG_LIMIT = 64 << 20


class SubstituteError(CacheError):
    """A cache could not provide a derivation's output (the caller builds it instead)."""

    def __init__(self, cache: Cache, derivation_id: str, reason: str, *,
                 name: str | None = None, hint: str | None = None) -> None:
        label = f"{name} ({derivation_id})" if name else derivation_id
        super().__init__(f"cache {cache.url}: cannot substitute {label}: {reason}",
                         hint=hint)
        self.cache_url = cache.url
        self.derivation_id = derivation_id


@dataclass(frozen=True)
class Substituter:
    """A cache to substitute from, with its priority (lower is asked first)."""

    cache: Cache
    priority: int


def open_substituters(caches: Sequence[Cache]) -> tuple[list[Substituter], list[CacheError]]:
    """The caches in priority order (ties in the order given), and the ones that failed."""
    found: list[Substituter] = []
    failed: list[CacheError] = []
    for cache in caches:
        try:
            info = read_cache_info(cache)
        except CacheError as exc:
            failed.append(exc)
            continue
        found.append(Substituter(cache, info.priority if info else DEFAULT_PRIORITY))
    found.sort(key=lambda s: s.priority)  # stable: equal priorities keep their order
    return found, failed


def query(cache: Cache, derivation_id: str, keys: Mapping[str, Ed25519PublicKey], *,
          name: str | None = None) -> VerifiedEntry | None:
    """The cache's verified entry for ``derivation_id``; None when it has none."""
    try:
        data = cache.read_bytes(meta_name(derivation_id), limit=METADATA_LIMIT)
        if data is None:
            return None
        return verify_entry(data, keys, derivation_id=derivation_id)
    except ReprobuildError as exc:
        raise SubstituteError(cache, derivation_id, exc.message, name=name,
                              hint=exc.hint) from None


def fetch_into_store(store: Store, cache: Cache, verified: VerifiedEntry, *,
                     on_bytes: OnBytes | None = None) -> StoreEntry:
    """Download, check, unpack and register ``verified``'s output; call with the lock held."""
    with store.session():  # gc must not remove the work directory meanwhile
        return _fetch(store, cache, verified, on_bytes)


def _fetch(store: Store, cache: Cache, verified: VerifiedEntry, on_bytes: OnBytes | None
           ) -> StoreEntry:
    entry = verified.entry
    what = f"{cache.where(object_name(entry.object.blake3))}"
    work = store.new_build_dir("substitute")
    try:
        tar_path = os.path.join(work, "object.tar")
        with cache.open_read(object_name(entry.object.blake3)) as stream:
            archive.receive(_Counted(stream, on_bytes), entry.object, tar_path, what)
        output = archive.unpack(tar_path, work, what)
        os.unlink(tar_path)
        registered = store.register(
            entry.derivation_id, output, derivation=entry.derivation, inputs=entry.inputs,
            epoch=entry.epoch, expected_hash=entry.hash, fsverity_file=entry.fsverity_file,
            record=records.entry_record,
            extra={"substituted": {"cache": cache.url, "key": verified.signer}})
    except ReprobuildError as exc:
        raise SubstituteError(cache, entry.derivation_id, exc.message, name=entry.name,
                              hint=exc.hint) from None
    except OSError as exc:
        raise SubstituteError(cache, entry.derivation_id, f"cannot unpack: {exc}",
                              name=entry.name) from None
    finally:
        with contextlib.suppress(OSError):
            canon.remove_tree(work)
    if entry.log:
        _fetch_log(store, cache, entry.derivation_id)
    return registered


def _fetch_log(store: Store, cache: Cache, derivation_id: str) -> None:
    """The builder's log, for ``reprobuild log`` (not signed: it vouches for nothing)."""
    try:
        log = cache.read_bytes(log_name(derivation_id), limit=LOG_LIMIT)
    except CacheError:
        return
    if log is not None:
        # The log file is also the entry's lock, held by us: rewrite it, never replace it.
        fd = os.open(store.log_path(derivation_id), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC,
                     0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(log)
            f.truncate()


def substitute(store: Store, cache: Cache, derivation_id: str,
               keys: Mapping[str, Ed25519PublicKey], *, on_bytes: OnBytes | None = None
               ) -> StoreEntry | None:
    """Put ``derivation_id``'s output into ``store`` from ``cache``; None when the cache
    does not have it. Already valid entries are returned as they are."""
    with store.lock(derivation_id):
        present = store.lookup(derivation_id)
        if present is not None:
            return present
        verified = query(cache, derivation_id, keys)
        if verified is None:
            return None
        return fetch_into_store(store, cache, verified, on_bytes=on_bytes)


class _Counted:
    """A stream that reports each chunk's length (for progress)."""

    def __init__(self, stream: BinaryIO, on_bytes: OnBytes | None) -> None:
        self.stream = stream
        self.on_bytes = on_bytes

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if self.on_bytes is not None and data:
            self.on_bytes(len(data))
        return data


def from_any(store: Store, substituters: Sequence[Substituter], derivation_id: str,
             keys: Mapping[str, Ed25519PublicKey], warnings: list[SubstituteError], *,
             known: tuple[Substituter, VerifiedEntry] | None = None,
             on_bytes: OnBytes | None = None) -> tuple[StoreEntry, str | None] | None:
    """Substitute ``derivation_id`` from the first cache (priority order) that can.

    Call with the store lock held. ``known`` is an entry already found (tried first).
    Each failing cache adds a warning and the next one is asked. Returns the entry and
    the URL it came from (None: it was already in the store), or None.
    """
    present = store.lookup(derivation_id)
    if present is not None:
        return present, None
    tried: set[int] = set()
    if known is not None:
        tried.add(id(known[0]))
        try:
            return fetch_into_store(store, known[0].cache, known[1],
                                    on_bytes=on_bytes), known[0].cache.url
        except SubstituteError as exc:
            warnings.append(exc)
    for substituter in substituters:
        if id(substituter) in tried:
            continue
        try:
            verified = query(substituter.cache, derivation_id, keys)
            if verified is None:
                continue
            return fetch_into_store(store, substituter.cache, verified,
                                    on_bytes=on_bytes), substituter.cache.url
        except SubstituteError as exc:
            warnings.append(exc)
    return None
