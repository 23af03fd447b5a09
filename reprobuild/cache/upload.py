"""Copying store entries to a cache: object first, log and record, signed metadata last.

An entry the cache already has (its metadata exists) is skipped; an object the cache
already has (another derivation with the same output) is not sent again. Entries are
uploaded in parallel; a failure of one does not stop the others, and all are reported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from reprobuild.cache import archive
from reprobuild.cache.backend import Cache, CacheError
from reprobuild.cache.layout import (
    CACHE_INFO,
    CacheEntry,
    CacheInfo,
    cache_info_bytes,
    log_name,
    meta_name,
    object_name,
    read_cache_info,
    record_name,
    sign_entry,
)
from reprobuild.errors import ReprobuildError, StoreError
from reprobuild.store import canon
from reprobuild.store.store import Store

OnEvent = Callable[[str, str, int], None]
"""Called with (derivation id, "uploaded" | "skipped", object bytes sent)."""


@dataclass
class UploadReport:
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[CacheError] = field(default_factory=list)
    bytes_sent: int = 0


def ensure_cache_info(cache: Cache, priority: int | None) -> CacheInfo:
    """The cache's info, written first when the cache is new (or ``priority`` changes)."""
    info = read_cache_info(cache)
    if info is None or (priority is not None and info.priority != priority):
        info = CacheInfo(priority if priority is not None else
                         (info.priority if info else CacheInfo().priority))
        cache.write_bytes(CACHE_INFO, cache_info_bytes(info))
    return info


def entry_epoch(output: str) -> int:
    """The epoch the output was canonicalised with (its mtime, as the store set it)."""
    return int(os.lstat(output).st_mtime_ns // 1_000_000_000)


def upload_one(store: Store, cache: Cache, derivation_id: str, key: Ed25519PrivateKey
               ) -> int:
    """Upload one valid store entry; the number of object bytes sent (0: already there)."""
    entry = store.lookup(derivation_id)
    meta = store.metadata(derivation_id)
    if entry is None or meta is None:
        raise StoreError(f"derivation {derivation_id} is not in the store {store.root}",
                         hint="build it first, or copy it --from a cache")
    with store.session():  # gc must not remove the work directory meanwhile
        work = store.new_build_dir("upload")
        try:
            object_path = os.path.join(work, "object.tar.zst")
            epoch = entry_epoch(entry.path)
            info = archive.pack(entry.path, epoch, object_path)
            sent = 0
            if not cache.exists(object_name(info.blake3)):
                cache.write_file(object_name(info.blake3), object_path)
                sent = info.size
        finally:
            canon.remove_tree(work)
    log = store.log_path(derivation_id)
    has_log = os.path.isfile(log) and os.path.getsize(log) > 0
    if has_log:
        cache.write_file(log_name(derivation_id), log)
    record = _record(store, derivation_id)
    if record is not None:
        cache.write_file(record_name(derivation_id), store.record_path(derivation_id))
    # Last: a reader never sees metadata whose object is missing.
    cache.write_bytes(meta_name(derivation_id), sign_entry(CacheEntry(
        derivation_id=derivation_id, derivation=meta["derivation"],
        inputs=meta.get("inputs", {}), hash=entry.hash, type=entry.type,
        fsverity=entry.fsverity, fsverity_file=meta.get("fsverity_file"), epoch=epoch,
        object=info, record=record, log=has_log), key))
    return sent


def _record(store: Store, derivation_id: str) -> dict[str, Any] | None:
    try:
        with open(store.record_path(derivation_id), "rb") as f:
            record: dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        return None
    return record


def upload(store: Store, cache: Cache, derivation_ids: Sequence[str],
           key: Ed25519PrivateKey, *, jobs: int = 4, priority: int | None = None,
           on_event: OnEvent | None = None) -> UploadReport:
    """Upload each entry the cache does not hold yet, ``jobs`` at a time."""
    report = UploadReport()
    ensure_cache_info(cache, priority)

    def one(derivation_id: str) -> None:
        try:
            if cache.exists(meta_name(derivation_id)):
                report.skipped.append(derivation_id)
                if on_event:
                    on_event(derivation_id, "skipped", 0)
                return
            sent = upload_one(store, cache, derivation_id, key)
        except ReprobuildError as exc:
            report.failures.append(CacheError(
                f"cache {cache.url}: cannot upload {derivation_id}: {exc.message}",
                hint=exc.hint))
            return
        report.uploaded.append(derivation_id)
        report.bytes_sent += sent
        if on_event:
            on_event(derivation_id, "uploaded", sent)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, derivation_ids))
    report.uploaded.sort()
    report.skipped.sort()
    return report
