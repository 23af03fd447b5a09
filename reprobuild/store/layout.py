"""Where each part of a store entry lives, and how a small file is replaced atomically.

Layout under the store root (default ``$XDG_CACHE_HOME/reprobuild``)::

    out/ID           the output of derivation ID (a file, symlink or directory)
    meta/ID.json     its metadata; an output counts as valid only when this parses
    records/ID.json  its build record (in-toto statement, written by the engine)
    stats/ID.json    (inode, size, ctime, mtime) and blake3 of every file as last hashed,
                     so a check before use rehashes only what changed (see trust.py)
    logs/ID.log      the build log (kept after a failure), also the per-derivation
                     lock (flock) so concurrent builders build once
    locks/           lock files of older versions, if any (gc removes them)
    tmp/             build directories, each locked by the process using it
    temproots/       one locked file of ids per live builder (gc keeps those ids)
    roots/           symlinks to result links (gc roots)
    gc.lock          shared by builders, exclusive for gc
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass

SUBDIRS = ("out", "meta", "logs", "tmp", "roots", "records", "stats", "temproots")


@dataclass(frozen=True)
class Layout:
    """The paths of a store rooted at ``root`` (absolute)."""

    root: str

    def output_path(self, derivation_id: str) -> str:
        return os.path.join(self.root, "out", derivation_id)

    def meta_path(self, derivation_id: str) -> str:
        return os.path.join(self.root, "meta", derivation_id + ".json")

    def log_path(self, derivation_id: str) -> str:
        return os.path.join(self.root, "logs", derivation_id + ".log")

    def record_path(self, derivation_id: str) -> str:
        """The build record (in-toto statement, see reprobuild.proof.records) of an entry."""
        return os.path.join(self.root, "records", derivation_id + ".json")

    def stats_path(self, derivation_id: str) -> str:
        return os.path.join(self.root, "stats", derivation_id + ".json")

    def subdir(self, name: str) -> str:
        return os.path.join(self.root, name)


def write_atomic(path: str, data: bytes, *, sync: bool = True) -> None:
    """Replace ``path`` by a rename; ``sync`` fsyncs the data first."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def unlink_quietly(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
