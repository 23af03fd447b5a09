"""The content scan of an ext4 plan: each regular file is read once before allocation for
its non-zero block runs (all-zero blocks become holes, a property of the content) and its
blake3 digest; the smallest files are kept in a bounded cache for the write."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import blake3

from reprobuild.errors import ImageError
from reprobuild.images.ext4.ondisk import (
    BLOCK_SIZE,
)
from reprobuild.trees.tree import Content

ZERO_BLOCK = bytes(BLOCK_SIZE)
ZERO_CHUNK = bytes(1 << 20)
CACHE_FILE_MAX = 256 << 10
WHOLE_READ_MAX = 1 << 20
"""Files up to this size are read whole in one call (see scan_bytes)."""
CACHE_BUDGET = 64 << 20
CACHE_PER_ENTRY = 128
"""Small files read while planning are kept for the write, within the smaller of
CACHE_BUDGET and CACHE_PER_ENTRY bytes per tree entry (for peak memory)."""


@dataclass(frozen=True, slots=True)
class FileScan:
    """A regular file's non-zero block runs (logical start, count) and blake3 digest."""

    runs: tuple[tuple[int, int], ...]
    digest: bytes



def aligned_chunks(content: Content) -> Iterator[bytes]:
    """The content in chunks whose lengths are whole blocks (the last one may be short).

    The chunks of ``Content.chunks()`` pass through uncopied when they are already
    aligned, and the last one always does (one look-ahead tells which is last).
    """
    carry = b""
    pending: bytes | None = None
    for chunk in content.chunks():
        if pending is not None:
            data = carry + pending if carry else pending
            cut = len(data) - len(data) % BLOCK_SIZE
            carry = data[cut:]
            if cut:
                yield data[:cut] if carry else data
        pending = chunk
    if pending is not None:
        yield carry + pending if carry else pending
    elif carry:
        yield carry


def scan_content(content: Content, where: str, cache: dict[int, bytes] | None = None,
                 key: int = 0, *, digest: bool = True) -> FileScan:
    """Find the file's non-zero blocks (holes are a property of content) and its digest
    (empty when ``digest`` is false)."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO) if digest else None
    runs: list[tuple[int, int]] = []
    block = 0
    size = 0
    keep = cache is not None
    kept: list[bytes] = []
    for chunk in aligned_chunks(content):
        if hasher is not None:
            hasher.update(chunk)
        size += len(chunk)
        if keep:
            kept.append(chunk)
        block = chunk_runs(chunk, block, runs)
    if size != content.size:
        raise ImageError(f"{where}: content is {size} bytes, the tree says {content.size}",
                         hint="do not modify the source tree during a build")
    if keep and cache is not None:
        cache[key] = b"".join(kept)
    return FileScan(tuple(runs), hasher.digest() if hasher is not None else b"")


def scan_bytes(data: bytes, *, digest: bool) -> FileScan:
    """:func:`scan_content` of a content held whole (at most one chunk of
    :meth:`~reprobuild.trees.tree.Content.chunks`, so the runs are the same)."""
    assert len(data) <= len(ZERO_CHUNK)
    runs: list[tuple[int, int]] = []
    if data:
        chunk_runs(data, 0, runs)
    if digest:
        return FileScan(tuple(runs), blake3.blake3(data).digest())
    # Without a digest most scans are alike (one run from block 0): share them.
    key = tuple(runs)
    scan = _SHARED_SCANS.get(key)
    if scan is None:
        scan = FileScan(key, b"")
        if len(runs) <= 1:
            _SHARED_SCANS[key] = scan
    return scan


_SHARED_SCANS: dict[tuple[tuple[int, int], ...], FileScan] = {}


def chunk_runs(chunk: bytes, block: int, runs: list[tuple[int, int]]) -> int:
    """Add the non-zero blocks of ``chunk`` (starting at ``block``) to ``runs``; the
    block after it."""
    count = -(-len(chunk) // BLOCK_SIZE)
    if (chunk[0] == 0 and chunk[-1] == 0 and len(chunk) <= len(ZERO_CHUNK)
            and ZERO_CHUNK[: len(chunk)] == chunk):
        return block + count
    if ZERO_BLOCK not in chunk:
        # No whole zero block; a short last block may still be all zero, and must be
        # a hole whichever way the content happened to be chunked.
        tail = len(chunk) % BLOCK_SIZE
        full = count - 1 if tail else count
        if full:
            add_run(runs, block, full)
        if tail and chunk[-tail:] != ZERO_BLOCK[:tail]:
            add_run(runs, block + full, 1)
    else:
        for i in range(count):
            piece = chunk[i * BLOCK_SIZE: (i + 1) * BLOCK_SIZE]
            if piece != ZERO_BLOCK[: len(piece)]:
                add_run(runs, block + i, 1)
    return block + count


def add_run(runs: list[tuple[int, int]], start: int, count: int) -> None:
    if runs and runs[-1][0] + runs[-1][1] == start:
        runs[-1] = (runs[-1][0], runs[-1][1] + count)
    else:
        runs.append((start, count))
