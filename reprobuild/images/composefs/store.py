"""The digest store of composefs images: each file stored by reference, named by its
fs-verity sha256 digest as ``xx/rest`` (the first two hex digits, then the other 62),
the layout ``mkcomposefs --digest-store`` writes and ``mount.composefs -o basedir=``
reads. An object already present is kept (objects are deduplicated by content across
images and builds); a new one is copied to a temporary name, checked against its name
and renamed into place, so a crash never leaves a wrong object under a digest's name.
The copy is made by the kernel when the file is on disk, and new objects are shared
among a few processes (:mod:`reprobuild.images.composefs.shares`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Sequence
from typing import BinaryIO

from reprobuild.errors import ImageError
from reprobuild.images.composefs.layout import object_path
from reprobuild.images.composefs.shares import in_processes
from reprobuild.integrity.fsverity import digest_file
from reprobuild.trees.tree import Entry, FileSource, Tree

OBJECT_MODE = 0o644
DIRECTORY_MODE = 0o755
_COPY_MAX = 1 << 30  # bytes a copy_file_range or sendfile call is asked for


def fill_store(tree: Tree, directory: str, digests: dict[bytes, bytes], *,
               processes: int | None = None) -> int:
    """Put every file of ``digests`` (tree path -> content digest) into the digest
    store at ``directory`` (created when missing); returns how many objects were new.
    The new objects are copied in ``processes`` processes (default: one per CPU)."""
    try:
        os.makedirs(directory, mode=DIRECTORY_MODE, exist_ok=True)
    except OSError as exc:
        raise ImageError(f"cannot create the digest store {directory}: {exc.strerror}",
                         hint="name a directory you can write") from None
    missing: dict[bytes, Entry] = {}  # digest -> the first file with that content
    for path in sorted(digests):
        digest = digests[path]
        if digest not in missing and not os.path.lexists(
                os.path.join(directory, object_path(digest))):
            entry = tree.get(path)
            assert entry is not None and entry.content is not None
            missing[digest] = entry
    for prefix in sorted({digest[:1].hex() for digest in missing}):
        os.makedirs(os.path.join(directory, prefix), mode=DIRECTORY_MODE, exist_ok=True)

    def add_all(run: Sequence[Entry]) -> bytes:
        return bytes(_add_object(directory, e, digests[e.path]) for e in run)

    return sum(b for added in in_processes(list(missing.values()), add_all,
                                           processes=processes) for b in added)


def _add_object(directory: str, entry: Entry, digest: bytes) -> bool:
    target = os.path.join(directory, object_path(digest))
    if os.path.lexists(target):  # another process of this build, or another build
        return False
    fd, partial = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as out:
            _copy(entry, out)
        os.chmod(partial, OBJECT_MODE)
        actual = digest_file(partial, threads=1)
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


def _copy(entry: Entry, out: BinaryIO) -> None:
    """The file's bytes into ``out``: in the kernel (copy_file_range, else sendfile)
    for a file on disk, else through this process."""
    assert entry.content is not None
    source = entry.content.source
    if not isinstance(source, FileSource):
        for chunk in entry.content.chunks():
            out.write(chunk)
        return
    with open(source.path, "rb") as data:
        src, dst = data.fileno(), out.fileno()
        try:
            while os.copy_file_range(src, dst, _COPY_MAX):
                pass
            return
        except OSError as exc:  # an older kernel, or two file systems it will not span
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        while os.sendfile(dst, src, None, _COPY_MAX):
            pass
