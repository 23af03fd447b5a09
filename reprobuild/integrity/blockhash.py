"""Hash every fixed-size block of a buffer or a file region: the leaf level of a Merkle tree.

Both fs-verity and dm-verity spend nearly all their time here, so the per-block work is
one C call chain per block (``ctor(view[i:i+n]).digest()`` in a comprehension), the file is
read with ``preadv`` into reused buffers, and big regions are split into segments hashed
by a few threads (hashlib releases the GIL for inputs of 2 KiB and more).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from reprobuild.errors import ImageError

# Segments handed to worker threads; a multiple of every supported block size.
SEGMENT_SIZE = 8 << 20
# Regions smaller than this are hashed on the calling thread.
THREADED_MIN = 32 << 20

Hasher = Callable[[Any], "hashlib._Hash"]

ALGORITHMS = ("sha1", "sha256", "sha512")


def hasher(algorithm: str, prefix: bytes = b"") -> Hasher:
    """A callable ``h(buffer) -> hash object`` of ``prefix || buffer``.

    With a prefix, the prefix is absorbed once and the state copied per block.
    """
    if algorithm not in ALGORITHMS:
        raise ImageError(f"unsupported hash algorithm {algorithm!r}",
                         hint=f"use one of {', '.join(ALGORITHMS)}")
    ctor: Hasher = getattr(hashlib, algorithm)
    if not prefix:
        return ctor
    base = ctor(prefix)

    def salted(block: Any) -> hashlib._Hash:
        state = base.copy()
        state.update(block)
        return state

    return salted


# The unbound ``digest`` method of each algorithm's hash objects.
_DIGEST: dict[str, Callable[[Any], bytes]] = {
    name: type(getattr(hashlib, name)()).digest for name in ALGORITHMS}


def _slices(length: int, block_size: int) -> Iterable[slice]:
    if length > SEGMENT_SIZE:  # one-off big buffers: not worth keeping
        return (slice(i, i + block_size) for i in range(0, length, block_size))
    return _cached_slices(length, block_size)


@functools.lru_cache(maxsize=16)
def _cached_slices(length: int, block_size: int) -> tuple[slice, ...]:
    return tuple(slice(i, i + block_size) for i in range(0, length, block_size))


def digest_size(algorithm: str) -> int:
    return hasher(algorithm)(b"").digest_size


def hash_blocks(view: memoryview | bytes | bytearray, block_size: int, algorithm: str,
                prefix: bytes = b"", *, slot: int = 0) -> bytes:
    """Concatenated digests of every ``block_size`` block of ``view``.

    A short last block is zero-padded. Each digest is zero-padded to ``slot`` bytes when
    ``slot`` is larger than the digest (dm-verity format 1 with sha1).
    """
    view = memoryview(view)
    length = len(view)
    if length % block_size:
        tail = bytes(view[length - length % block_size:]).ljust(block_size, b"\0")
        return (hash_blocks(view[:length - length % block_size], block_size, algorithm,
                            prefix, slot=slot)
                + hash_blocks(tail, block_size, algorithm, prefix, slot=slot))
    h = hasher(algorithm, prefix)
    # map() over cached slice objects: the least Python work per block (no range ints,
    # no slice objects, no comprehension frame), measurably faster than a comprehension.
    digests = list(map(_DIGEST[algorithm], map(h, map(view.__getitem__,
                                                       _slices(length, block_size)))))
    if not digests:
        return b""
    pad = b"\0" * (slot - len(digests[0])) if slot > len(digests[0]) else b""
    if pad:
        return pad.join(digests) + pad
    return b"".join(digests)


def _read_exact(fd: int, buffer: bytearray, length: int, offset: int) -> memoryview:
    view = memoryview(buffer)[:length]
    done = 0
    while done < length:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise ImageError(f"file ended {length - done} bytes early at offset "
                             f"{offset + done}", hint="was the file truncated while read?")
        done += got
    return view


def _segments(offset: int, length: int) -> Iterator[tuple[int, int]]:
    for start in range(0, length, SEGMENT_SIZE):
        yield offset + start, min(SEGMENT_SIZE, length - start)


def hash_file_blocks(fd: int, offset: int, length: int, block_size: int, algorithm: str,
                     prefix: bytes = b"", *, slot: int = 0,
                     threads: int | None = None) -> bytes:
    """Concatenated digests of every block of ``length`` bytes of ``fd`` from ``offset``.

    The last block is zero-padded. ``threads`` defaults to the number of CPUs (at most 4);
    small regions are hashed on the calling thread.
    """
    hasher(algorithm)  # validate before starting threads
    if SEGMENT_SIZE % block_size:
        raise ImageError(f"block size {block_size} does not divide {SEGMENT_SIZE}",
                         hint="use a power-of-two block size of at most 8 MiB")
    local = threading.local()

    def segment(region: tuple[int, int]) -> bytes:
        buffer: bytearray | None = getattr(local, "buffer", None)
        if buffer is None:  # no bigger than the region: a small file is not 8 MiB to zero
            buffer = local.buffer = bytearray(min(SEGMENT_SIZE, length))
        start, size = region
        return hash_blocks(_read_exact(fd, buffer, size, start), block_size, algorithm,
                           prefix, slot=slot)

    workers = threads if threads is not None else min(os.cpu_count() or 1, 4)
    if workers <= 1 or length < THREADED_MIN:
        return b"".join(map(segment, _segments(offset, length)))
    # concurrent.futures (and the logging it imports) only for a region this big.
    futures = importlib.import_module("concurrent.futures")
    with futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blockhash") as pool:
        return b"".join(pool.map(segment, _segments(offset, length)))
