"""Turn an image source on disk into a normalised Tree: a directory, a tar or an OCI layout.

* a directory (a store output): :func:`~reprobuild.trees.tree.tree_from_directory` - owners
  root, mtimes the epoch, no xattrs, permission bits as found;
* an OCI image layout (a directory with ``oci-layout`` and ``index.json``):
  :func:`~reprobuild.trees.oci.tree_from_oci`;
* any other file: a tar, plain or gzip/xz/zstd/bzip2 compressed (detected by magic):
  :func:`~reprobuild.trees.tar_reader.tree_from_tar`.

The result is normalised with the epoch: mtimes later than the epoch are clamped to it,
xattrs sorted. Directories an archive implies but does not list get mtime = the epoch.
Regular files of compressed archives are spooled into ``spool`` (default: a temporary
directory removed at exit); the source and the spool must outlive the tree.

The tar and OCI readers (and with them tarfile and the decompressors) are loaded only
for a source of their kind: a directory source costs none of them at start-up.
"""

from __future__ import annotations

import importlib
import os
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING

from reprobuild.errors import ImageError
from reprobuild.trees.directory import FoundFile, tree_from_directory
from reprobuild.trees.gcpause import collector_paused

if TYPE_CHECKING:
    from reprobuild.trees.tar_reader import Spool
    from reprobuild.trees.tree import Tree

TAR_READER = "reprobuild.trees.tar_reader"
OCI_READER = "reprobuild.trees.oci"

DEFAULT_PLATFORM = ("linux", "amd64")
"""The (os, architecture) whose manifest is read from a multi-platform OCI index."""


def is_oci_layout(path: bytes | str) -> bool:
    """Whether ``path`` is a directory holding an OCI image layout."""
    path = os.fsencode(path)
    return os.path.isfile(path + b"/oci-layout") and os.path.isfile(path + b"/index.json")


def source_kind(path: bytes | str) -> str:
    """"directory", "oci" or "tar" for an existing path; ImageError otherwise."""
    raw = os.fsencode(path)
    try:
        st = os.stat(raw)
    except FileNotFoundError:
        raise ImageError(f"source {raw.decode(errors='replace')} does not exist") from None
    if stat.S_ISDIR(st.st_mode):
        return "oci" if is_oci_layout(raw) else "directory"
    if stat.S_ISREG(st.st_mode):
        return "tar"
    raise ImageError(f"source {raw.decode(errors='replace')} is neither a directory nor a file")


def load_tree(path: bytes | str, *, epoch: int,
              spool: Spool | Callable[[], Spool] | None = None,
              platform: tuple[str, str] = DEFAULT_PLATFORM,
              found: FoundFile | None = None) -> Tree:
    """The normalised tree of a directory, tar file or OCI layout at ``path``.

    ``spool`` is a spool, or a function that makes one, called only for a source that
    spools (a tar or OCI layout), so a directory source makes no spool directory.
    ``platform`` (os, architecture) picks the manifest of a multi-platform OCI index.
    ``found`` is told each regular file of a directory source as the walk finds it
    (see :func:`~reprobuild.trees.directory.tree_from_directory`).
    """
    kind = source_kind(path)
    implied = epoch * 1_000_000_000
    with collector_paused():
        if kind == "directory":
            tree = tree_from_directory(os.fsencode(path), epoch=epoch, found=found)
        else:
            spooled = spool() if callable(spool) else spool
            if kind == "oci":
                tree = importlib.import_module(OCI_READER).tree_from_oci(
                    path, platform=platform, implied_mtime_ns=implied, spool=spooled)
            else:
                tree = importlib.import_module(TAR_READER).tree_from_tar(
                    path, implied_mtime_ns=implied, spool=spooled, epoch=epoch)
        # Most trees are normal already (a directory source always is, a tar comes back
        # normalised): no check and no copy then.
        return tree if tree.is_normal(epoch=epoch) else tree.normalized(epoch=epoch)
