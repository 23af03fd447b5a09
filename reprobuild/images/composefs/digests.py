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


def _root(leaves: bytes) -> bytes:
    """The Merkle root over ``leaves`` (more than one digest)."""
    if len(leaves) <= BLOCK_SIZE:  # up to 128 data blocks: one hash block
        return _sha256(leaves + _ZEROS[len(leaves):]).digest()
    return root_hash_from_leaves(leaves, _PARAMS)


def _digest_run(run: Sequence[Entry]) -> bytes:
    """The digests of ``run``, joined; one reused buffer, and the usual file (from a
    path, read whole) done inline: per-file Python work costs as much as its hashing."""
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    zeros = memoryview(_ZEROS)
    first = _BLOCKS[0]
    sha256, digest_of, blocks, pack = _sha256, _digest_of, _BLOCKS, _DESCRIPTOR.pack
    found: list[bytes] = []
    for entry in run:
        content = entry.content
        assert content is not None
        size = content.size
        source = content.source
        if size > WHOLE_MAX or not isinstance(source, FileSource):
            found.append(_digest_other(entry))
            continue
        padded = (size + BLOCK_SIZE - 1) & -BLOCK_SIZE
        if len(buffer) < padded:
            buffer = bytearray(padded)
            view = memoryview(buffer)
        fd = os.open(source.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            got = os.preadv(fd, [view[:size]], 0)
            if got != size:
                _read_rest(entry, fd, view, size, got)
        finally:
            os.close(fd)
        view[size:padded] = zeros[:padded - size]
        if padded == BLOCK_SIZE:  # a one-block file: its block's hash is the root
            root = sha256(view[first]).digest()
        else:
            root = _root(b"".join(map(digest_of, map(sha256, map(
                view.__getitem__, blocks[:padded // BLOCK_SIZE])))))
        found.append(sha256(pack(_HEAD, size, root)).digest())
    return b"".join(found)


def _digest_other(entry: Entry) -> bytes:
    """The digest of a file not read whole: one held elsewhere, or a large one."""
    assert entry.content is not None
    source = entry.content.source
    if not isinstance(source, FileSource):
        return digest_chunks(entry.content.chunks())
    return digest_file(source.path, threads=1)


def _read_rest(entry: Entry, fd: int, view: memoryview, size: int, done: int) -> None:
    """Read the rest of a file that one read did not give whole."""
    while done < size:
        got = os.preadv(fd, [view[done:size]], done)
        if not got:
            raise ImageError(f"{entry.display()}: file ended {size - done} bytes "
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
