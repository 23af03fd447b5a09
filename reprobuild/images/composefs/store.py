"""The digest store of composefs images: each file stored by reference, named by its
fs-verity sha256 digest as ``xx/rest`` (the first two hex digits, then the other 62),
the layout ``mkcomposefs --digest-store`` writes and ``mount.composefs -o basedir=``
reads. An object already present is kept (objects are deduplicated by content across
images and builds); a new one is copied to a temporary name, checked against its name
and renamed into place, so a crash never leaves a wrong object under a digest's name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

from reprobuild.errors import ImageError
from reprobuild.images.composefs.layout import object_path
from reprobuild.integrity.fsverity import digest_file
from reprobuild.trees.tree import Entry, Tree

OBJECT_MODE = 0o644
DIRECTORY_MODE = 0o755


def fill_store(tree: Tree, directory: str, digests: dict[bytes, bytes]) -> int:
    """Put every file of ``digests`` (tree path -> content digest) into the digest
    store at ``directory`` (created when missing); returns how many objects were new."""
    try:
        os.makedirs(directory, mode=DIRECTORY_MODE, exist_ok=True)
    except OSError as exc:
        raise ImageError(f"cannot create the digest store {directory}: {exc.strerror}",
                         hint="name a directory you can write") from None
    added = 0
    for path in sorted(digests):
        entry = tree.get(path)
        assert entry is not None and entry.content is not None
        if _add_object(directory, entry, digests[path]):
            added += 1
    return added


def _add_object(directory: str, entry: Entry, digest: bytes) -> bool:
    relative = object_path(digest)
    target = os.path.join(directory, relative)
    if os.path.lexists(target):
        return False
    parent = os.path.dirname(target)
    os.makedirs(parent, mode=DIRECTORY_MODE, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=parent, prefix=".tmp-")
    try:
        assert entry.content is not None
        with os.fdopen(fd, "wb") as out:
            for chunk in entry.content.chunks():
                out.write(chunk)
        os.chmod(partial, OBJECT_MODE)
        actual = digest_file(partial)
        if actual != digest:
            raise ImageError(f"{entry.display()} changed while it was stored: its digest "
                             f"is {actual.hex()}, the image names {digest.hex()}",
                             hint="do not modify the source during a build")
        os.replace(partial, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
    return True
