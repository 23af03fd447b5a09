"""The content digests of a composefs image: the fs-verity sha256 digest (4 KiB blocks,
no salt) of every regular file it stores by reference, in a few processes.

A root filesystem's thousands of small files cost per-file overhead more than hashing:
a file of up to 8 MiB is read whole with one ``preadv`` into a buffer its process
reuses, padded with zeros to whole blocks and hashed with one call per block (one call
in all for a one-block file). The files are shared among a few processes
(:mod:`reprobuild.images.composefs.shares`). Each digest depends on its file alone and
the result is keyed by path: the bytes never depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from collections.abc import Callable, Iterator, Sequence

from reprobuild.errors import ImageError
from reprobuild.images.composefs import ondisk
from reprobuild.images.composefs.shares import started
from reprobuild.integrity.fsverity import (
    FSVERITY_DESCRIPTOR,
    FsVerityParams,
    descriptor,
    digest_chunks,
    digest_file,
    params,
    root_hash_from_leaves,
)
from reprobuild.trees.tree import Entry, EntryType, FileSource, Tree

BLOCK_SIZE = 4096
DIGEST_SIZE = 32
WHOLE_MAX = 8 << 20
"""Files up to this size are read whole into the process's buffer; larger ones stream."""


_PARAMS: FsVerityParams = params("sha256", BLOCK_SIZE, b"")
# The fsverity_descriptor of a digest here: _HEAD, the le64 size, the root, zeros.
_HEAD = descriptor(0, bytes(DIGEST_SIZE), _PARAMS)[:8]
_DESCRIPTOR = struct.Struct(f"<8sQ{DIGEST_SIZE}s{FSVERITY_DESCRIPTOR.size - 16 - DIGEST_SIZE}x")
_ZEROS = bytes(BLOCK_SIZE)
_sha256 = hashlib.sha256
_digest_of = type(hashlib.sha256()).digest
# Every block of a file read whole, as slices made once (cutting a buffer with reused
# slice objects is the least Python work per block).
_BLOCKS = tuple(slice(i, i + BLOCK_SIZE) for i in range(0, WHOLE_MAX, BLOCK_SIZE))
_FIRST = _BLOCKS[0]
_ZERO_VIEW = memoryview(_ZEROS)
_pack = _DESCRIPTOR.pack


def _root(leaves: bytes) -> bytes:
    """The Merkle root over ``leaves`` (more than one digest)."""
    if len(leaves) <= BLOCK_SIZE:  # up to 128 data blocks: one hash block
        return _sha256(leaves + _ZEROS[len(leaves):]).digest()
    return root_hash_from_leaves(leaves, _PARAMS)


class FileHasher:
    """Digests of files on disk read whole into one buffer this process reuses."""

    def __init__(self) -> None:
        self.buffer = bytearray(1 << 20)
        self.view = memoryview(self.buffer)

    def digest(self, path: bytes, size: int, what: Entry | None = None) -> bytes:
        """The digest of the file at ``path`` of ``size`` bytes (at most
        :data:`WHOLE_MAX`); a file that ends early is refused, named as the tree entry
        ``what`` (or by its path on disk)."""
        padded = (size + BLOCK_SIZE - 1) & -BLOCK_SIZE
        view = self.view
        if len(self.buffer) < padded:
            self.buffer = bytearray(padded)
            self.view = view = memoryview(self.buffer)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            got = os.preadv(fd, [view[:size]], 0)
            if got != size:
                _read_rest(path if what is None else what, fd, view, size, got)
        finally:
            os.close(fd)
        view[size:padded] = _ZERO_VIEW[:padded - size]
        if padded == BLOCK_SIZE:  # a one-block file: its block's hash is the root
            root = _sha256(view[_FIRST]).digest()
        else:
            root = _root(b"".join(map(_digest_of, map(_sha256, map(
                view.__getitem__, _BLOCKS[:padded // BLOCK_SIZE])))))
        return _sha256(_pack(_HEAD, size, root)).digest()


def _digest_run(run: Sequence[Entry]) -> bytes:
    """The digests of ``run``, joined, through one :class:`FileHasher`."""
    hasher = FileHasher()
    return b"".join([digest_entry(entry, hasher) for entry in run])


def digest_entry(entry: Entry, hasher: FileHasher) -> bytes:
    """The digest of one regular file of a tree."""
    content = entry.content
    assert content is not None
    source = content.source
    if content.size > WHOLE_MAX or not isinstance(source, FileSource):
        return _digest_other(entry)
    return hasher.digest(source.path, content.size, entry)


def _digest_other(entry: Entry) -> bytes:
    """The digest of a file not read whole: one held elsewhere, or a large one."""
    assert entry.content is not None
    source = entry.content.source
    if not isinstance(source, FileSource):
        return digest_chunks(entry.content.chunks())
    return digest_file(source.path, threads=1)


def _read_rest(what: Entry | bytes, fd: int, view: memoryview, size: int, done: int) -> None:
    """Read the rest of a file that one read did not give whole."""
    shown = what.display() if isinstance(what, Entry) else what.decode(errors="replace")
    while done < size:
        got = os.preadv(fd, [view[done:size]], done)
        if not got:
            raise ImageError(f"{shown}: file ended {size - done} bytes "
                             "early", hint="do not modify the source during a build")
        done += got


def stored_by_reference(tree: Tree) -> list[Entry]:
    """The regular files of ``tree`` too big to be inline: those with a content digest."""
    return [e for e in tree
            if e.type is EntryType.REGULAR and e.size > ondisk.INLINE_CONTENT_MAX]


def content_digests(tree: Tree, *, processes: int | None = None) -> dict[bytes, bytes]:
    """Path -> content digest of every regular file ``tree`` stores by reference,
    computed in ``processes`` processes (default: one per CPU, at most 4)."""
    with hashing(stored_by_reference(tree), processes=processes) as results:
        return results()


@contextlib.contextmanager
def hashing(entries: Sequence[Entry], *, processes: int | None = None,
            head_start: int = 0) -> Iterator[Callable[[], dict[bytes, bytes]]]:
    """The digests of ``entries`` started in child processes; yields a function that
    hashes this process's share (``head_start`` lighter, see
    :func:`reprobuild.images.composefs.shares.started`) and returns path -> digest."""

    with started(entries, _digest_run, processes=processes, head_start=head_start) as shares:

        def results() -> dict[bytes, bytes]:
            found = b"".join(shares())
            return {e.path: found[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE]
                    for i, e in enumerate(entries)}

        yield results
