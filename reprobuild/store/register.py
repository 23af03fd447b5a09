"""Registration: an output in ``tmp/`` becomes the valid entry of its derivation.

Registration is atomic: the output is canonicalised and hashed in ``tmp/``, its file data
fsynced, renamed to ``out/ID``, its stats and record written, then the metadata is written
to a temporary file and renamed over ``meta/ID.json``. A process killed at any moment
leaves either no metadata (the output, if any, is garbage and is replaced by the next
build) or a complete, valid entry. After a power loss, journaling filesystems keep renames
in order, and metadata that does not parse counts as absent, so an entry is valid only
with its synced output.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from reprobuild import __version__
from reprobuild.errors import BuildError, StoreError
from reprobuild.integrity import fsverity as fsverity_module
from reprobuild.store import canon, trust
from reprobuild.store.layout import Layout, unlink_quietly, write_atomic

RecordWriter = Callable[[Mapping[str, Any], str], bytes]
"""Makes an entry's build record from its metadata and output path (the engine passes
one built on reprobuild.proof.records; the store does not know the record format)."""


@dataclass(frozen=True)
class StoreEntry:
    """A valid output: where it is and what it hashes to."""

    derivation_id: str
    path: str
    hash: str  # blake3 over the canonical serialisation (see reprobuild.store.canon)
    # fs-verity sha256 digest (4 KiB blocks, no salt) of a file output, or of a directory
    # output's main file (a disk image's disk.img, see register's fsverity_file)
    fsverity: str | None
    type: str  # "file", "directory" or "symlink"
    # Set by `reprobuild check` when a rebuild differed: what differed, under what.
    unreproducible: Mapping[str, Any] | None = None


def entry_from_metadata(layout: Layout, derivation_id: str, meta: Mapping[str, Any]
                        ) -> StoreEntry | None:
    """The entry ``meta`` describes, or None when the metadata is not a complete one."""
    content_hash = meta.get("hash")
    kind = meta.get("type", "directory")
    fsverity = meta.get("fsverity")
    unrepro = meta.get("unreproducible")
    if (not isinstance(content_hash, str) or kind not in ("file", "directory", "symlink")
            or not (fsverity is None or isinstance(fsverity, str))
            or not (unrepro is None or isinstance(unrepro, Mapping))):
        return None
    return StoreEntry(derivation_id, layout.output_path(derivation_id), content_hash,
                      fsverity, kind, unrepro)


def register(layout: Layout, derivation_id: str, output: str, *,
             derivation: Mapping[str, Any], inputs: Mapping[str, Mapping[str, str]],
             epoch: int, expected_hash: str | None = None,
             fsverity_file: str | None = None,
             record: RecordWriter | None = None,
             extra: Mapping[str, Any] | None = None) -> StoreEntry:
    """See :meth:`reprobuild.store.store.Store.register`."""
    if not os.path.lexists(output):
        raise StoreError(f"the build made no output at {output}")
    canon.canonicalize(output, epoch=epoch, top_mode=False)
    content_hash = canon.hash_path(output)
    if expected_hash is not None and content_hash != expected_hash:
        raise StoreError(f"the output of {derivation_id} hashes to {content_hash}, "
                         f"expected {expected_hash}",
                         hint="a source changed while it was imported; build again")
    st = os.lstat(output)
    kind = ("directory" if stat.S_ISDIR(st.st_mode) else
            "symlink" if stat.S_ISLNK(st.st_mode) else "file")
    fsverity = None
    if kind == "file":
        fsverity = _fsverity_digest(output)
    elif kind == "directory" and fsverity_file is not None:
        fsverity = _main_file_digest(derivation_id, output, fsverity_file)
    canon.fsync_tree(output)
    final = layout.output_path(derivation_id)
    if os.path.lexists(final):  # garbage of a killed build: never valid without metadata
        unlink_quietly(layout.meta_path(derivation_id))
        canon.remove_tree(final)
    os.rename(output, final)
    if kind == "directory":
        os.chmod(final, 0o555)
    meta: dict[str, Any] = {
        "derivation_id": derivation_id,
        "derivation": dict(derivation),
        "inputs": {k: dict(v) for k, v in sorted(inputs.items())},
        "hash": content_hash,
        "type": kind,
        "fsverity": fsverity,
        **({"fsverity_file": fsverity_file} if kind == "directory" and fsverity else {}),
        "epoch": epoch,  # every mtime of the canonical output
        "reprobuild": __version__,
        "log": layout.log_path(derivation_id),
        **(extra or {}),
    }
    trust.write_stats(layout, derivation_id, content_hash)
    # The record first: a valid entry (metadata present) always has its record.
    # Not fsynced: a metadata file torn by a power loss does not parse, and an entry
    # whose metadata does not parse is not valid, so it is rebuilt. The output's data,
    # which the metadata vouches for, was fsynced above.
    if record is not None:
        write_atomic(layout.record_path(derivation_id), record(meta, final), sync=False)
    write_atomic(layout.meta_path(derivation_id),
                 json.dumps(meta, indent=1, sort_keys=True).encode(), sync=False)
    return StoreEntry(derivation_id, final, content_hash, fsverity, kind)


def _main_file_digest(derivation_id: str, output: str, name: str) -> str | None:
    """The fs-verity digest of the regular file ``name`` inside a directory output."""
    path = os.path.join(output, name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        raise BuildError(f"the output of {derivation_id} has no regular file {name}",
                         hint="the image step must write its main file; see its log")
    return _fsverity_digest(path)


def _fsverity_digest(path: str) -> str | None:
    """The fs-verity digest of a file output."""
    try:
        digest: bytes = fsverity_module.digest_file(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return digest.hex()
