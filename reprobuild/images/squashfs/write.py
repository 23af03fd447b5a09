"""Serialise a planned squashfs image: data blocks, fragments, then the metadata tables.

The layout on disk follows mksquashfs, which the kernel's sanity checks expect: the
superblock, the compressor options, file data and fragment blocks, the inode table, the
directory table, the fragment table, the export table, the id table, the xattr table; the
image is padded to 4 KiB. File data streams through a ``ContentStreamer`` one block at a
time; blocks compress in worker threads and are written in plan order, with a bounded
number in flight.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

import blake3

from reprobuild.errors import ImageError, ImageTooSmall
from reprobuild.images.contents import ContentStreamer
from reprobuild.images.squashfs.compressors import Compressor
from reprobuild.images.squashfs.layout import SquashfsPlan
from reprobuild.images.squashfs.ondisk import (
    SQUASHFS_ALWAYS_FRAG,
    SQUASHFS_COMP_OPT,
    SQUASHFS_COMPRESSED_BIT,
    SQUASHFS_DUPLICATE,
    SQUASHFS_EXPORT,
    SQUASHFS_FRAGMENT_ENTRY,
    SQUASHFS_INVALID_BLK,
    SQUASHFS_MAGIC,
    SQUASHFS_MAJOR,
    SQUASHFS_METADATA_HEADER,
    SQUASHFS_MINOR,
    SQUASHFS_NOD,
    SQUASHFS_NOF,
    SQUASHFS_NOI,
    SQUASHFS_NOID,
    SQUASHFS_NOX,
    SQUASHFS_SUPER_BLOCK,
    U32,
)
from reprobuild.images.squashfs.tables import (
    FileData,
    ImageFile,
    TableBuilder,
    little_endian,
    write_lookup_table,
    write_xattr_table,
)
from reprobuild.trees.tree import Content, Entry

PAD_TO = 4096
IN_FLIGHT_PER_WORKER = 4
HOLD_LIMIT = 16 << 20  # files sharing a size are held in memory up to this size
READ_AHEAD_BYTES = 2 << 20  # 16 blocks of 128 KiB: twice what the compressors hold
BATCH_BYTES = 64 << 10  # a read-ahead batch: small files together, a large block alone


@dataclass(frozen=True)
class WriteSettings:
    """What the writer needs besides the plan."""

    compressor: Compressor
    mkfs_time: int
    exportable: bool
    workers: int
    size: int | None = None  # pad the image to exactly this many bytes


def write_plan(plan: SquashfsPlan, output: BinaryIO, settings: WriteSettings) -> None:
    """Write the planned image to ``output`` (seekable, empty)."""
    compressor = settings.compressor
    image = ImageFile(output)
    output.seek(0)
    image.write(bytes(SQUASHFS_SUPER_BLOCK.size))
    flags = SQUASHFS_DUPLICATE | (SQUASHFS_ALWAYS_FRAG if plan.tail_fragments else 0)
    if compressor.options is not None:
        flags |= SQUASHFS_COMP_OPT
        opts = compressor.options
        image.write(SQUASHFS_METADATA_HEADER.pack(len(opts) | SQUASHFS_COMPRESSED_BIT) + opts)
    if not compressor.compresses:
        flags |= SQUASHFS_NOI | SQUASHFS_NOD | SQUASHFS_NOF | SQUASHFS_NOX | SQUASHFS_NOID

    files = FileData(len(plan.file_entries))
    tables = TableBuilder(plan, files, compressor)
    fragments = write_data(plan, image, compressor, settings.workers, files, tables.advance)

    inode_table_start = image.position
    inode_refs, directory_table = tables.finish()
    image.write(inode_refs.table)
    directory_table_start = image.write(directory_table)

    fragment_table_start = write_lookup_table(
        image, compressor,
        b"".join(SQUASHFS_FRAGMENT_ENTRY.pack(start, size, 0) for start, size in fragments))
    lookup_table_start = SQUASHFS_INVALID_BLK
    if settings.exportable:
        flags |= SQUASHFS_EXPORT
        lookup_table_start = write_lookup_table(image, compressor,
                                                little_endian(inode_refs.refs))
    id_table_start = write_lookup_table(
        image, compressor, b"".join(U32.pack(i) for i in plan.ids))
    xattr_id_table_start = write_xattr_table(image, compressor, plan)

    bytes_used = image.position
    padded = -(-bytes_used // PAD_TO) * PAD_TO
    if settings.size is not None:
        if settings.size < padded:
            raise ImageTooSmall(f"squashfs: the image needs {padded} bytes, more than the"
                                f" {settings.size} requested", minimum=padded)
        padded = settings.size
    if image.position < padded:
        # Holes, not written zeros: a sized image stays sparse on disk.
        output.truncate(padded)
        end = output.seek(0, os.SEEK_END)
        if end < padded:  # an in-memory file does not grow by truncate
            output.write(bytes(padded - end))
    block_log = plan.block_size.bit_length() - 1
    output.seek(0)
    output.write(SQUASHFS_SUPER_BLOCK.pack(
        SQUASHFS_MAGIC, plan.inode_count, settings.mkfs_time, plan.block_size,
        len(fragments), compressor.squashfs_id, block_log, flags, len(plan.ids),
        SQUASHFS_MAJOR, SQUASHFS_MINOR, inode_refs.refs[plan.root_index], bytes_used,
        id_table_start, xattr_id_table_start, inode_table_start, directory_table_start,
        fragment_table_start, lookup_table_start))
    output.seek(padded)


# -- data ---------------------------------------------------------------------------------
def file_blocks(content: Content, block_size: int, entry: Entry,
                reader: ContentStreamer | None = None) -> Iterator[bytes]:
    """The content in ``block_size`` pieces (the last one shorter), checking its size."""
    carry = b""
    total = 0
    chunks = (content.chunks(block_size) if reader is None or reader.chunk_size != block_size
              else reader.chunks(content))
    for chunk in chunks:
        total += len(chunk)
        if not carry and len(chunk) == block_size:
            yield chunk
            continue
        carry += chunk
        while len(carry) >= block_size:
            yield carry[:block_size]
            carry = carry[block_size:]
    if carry:
        yield carry
    if total != content.size:
        raise ImageError(f"squashfs: {entry.display()}: content has {total} bytes, expected"
                         f" {content.size}", hint="do not modify the source during a build")


Job = tuple[int, int, int, "Future[tuple[bytes, int]] | None"]


class DataWriter:
    """Streams file blocks and fragment blocks through the compression threads in order.

    Jobs are (file index or -1 for a fragment, block number or fragment index, length,
    future or None for a sparse block); they are written strictly in submission order,
    with at most ``limit`` in flight, so memory stays bounded and the bytes never depend
    on thread timing.
    """

    def __init__(self, image: ImageFile, compressor: Compressor, pool: ThreadPoolExecutor,
                 limit: int, files: FileData) -> None:
        self.image = image
        self.compressor = compressor
        self.pool = pool
        self.limit = limit
        self.files = files
        self.pending: deque[Job] = deque()
        self.fragments: list[tuple[int, int]] = []

    def block(self, file_index: int, number: int, data: bytes) -> None:
        self.pending.append((file_index, number, len(data),
                             self.pool.submit(self.compressor.store, data)))
        self.drain(self.limit)

    def sparse(self, file_index: int, number: int, length: int) -> None:
        self.pending.append((file_index, number, length, None))
        self.drain(self.limit)

    def fragment(self, data: bytes) -> None:
        self.fragments.append((0, 0))
        self.pending.append((-1, len(self.fragments) - 1, len(data),
                             self.pool.submit(self.compressor.store, data)))
        self.drain(self.limit)

    def first_pending_file(self, default: int) -> int:
        """The first file with a block not yet written, else ``default``."""
        for file_index, _, _, _ in self.pending:
            if file_index >= 0:
                return file_index
        return default

    def drain(self, keep: int) -> None:
        pending = self.pending
        image = self.image
        files = self.files
        block_sizes = files.block_sizes
        while len(pending) > keep:
            file_index, number, length, future = pending.popleft()
            if file_index < 0:
                assert future is not None
                data, size_field = future.result()
                self.fragments[number] = (image.write(data), size_field)
                continue
            if number == 0:
                files.start[file_index] = image.position
                files.first_block[file_index] = len(block_sizes)
            if future is None:
                block_sizes.append(0)
                files.sparse[file_index] += length
            else:
                data, size_field = future.result()
                image.write(data)
                block_sizes.append(size_field)


class ReadAhead:
    """Reads the files' blocks in plan order on a thread of its own.

    Yields (file index, block, digest or None). A file that may
    duplicate another gets its blake3 digest: on every block when known beforehand (given
    by the store, or hashed in a first pass when larger than HOLD_LIMIT), else on its last
    block (hashed as it streams). Blocks travel in batches of up to BATCH_BYTES (a full
    block goes alone; small files share one), so a tree of small files does not pay a
    queue hand-over per file. At most ``depth`` batches wait in the queue; reads release
    the GIL, so they overlap with the main thread and with compression.
    """

    DONE = object()

    def __init__(self, plan: SquashfsPlan, depth: int) -> None:
        self.plan = plan
        self.queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="squashfs-read", daemon=True)

    def __enter__(self) -> ReadAhead:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join()

    def _put(self, item: object) -> bool:
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            with ContentStreamer(self.plan.block_size) as reader:
                if self._read_all(reader):
                    self._put(self.DONE)
        except BaseException as error:  # handed to the main thread, which raises it
            self._put(error)

    def _read_all(self, reader: ContentStreamer) -> bool:
        """Queue every block, in batches; False when stopped early."""
        batch: list[tuple[int, bytes, bytes | None]] = []
        batched = 0
        for item in self._blocks(reader):
            batch.append(item)
            batched += len(item[1])
            if batched >= BATCH_BYTES:
                if not self._put(batch):
                    return False
                batch, batched = [], 0
        return not batch or self._put(batch)

    def _blocks(self, reader: ContentStreamer) -> Iterator[tuple[int, bytes, bytes | None]]:
        """(file index, block, digest or None) for every block, in plan order."""
        block_size = self.plan.block_size
        may_duplicate = self.plan.may_duplicate
        for index, entry in enumerate(self.plan.file_entries):
            content = entry.content
            if content is None or content.size == 0:
                continue
            digest: bytes | None = None
            hasher = None
            if may_duplicate[index]:
                if content.known_blake3 is not None or content.size > HOLD_LIMIT:
                    digest = content.blake3
                else:
                    hasher = blake3.blake3()
            previous: bytes | None = None
            for block in file_blocks(content, block_size, entry, reader):
                if hasher is not None:
                    hasher.update(block)
                if previous is not None:
                    yield index, previous, digest
                previous = block
            if hasher is not None:
                digest = hasher.digest()
            assert previous is not None  # file_blocks checked the size
            yield index, previous, digest

    def __iter__(self) -> Iterator[tuple[int, bytes, bytes | None]]:
        while True:
            item = self.queue.get()
            if item is self.DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield from item  # type: ignore[misc]


def write_data(plan: SquashfsPlan, image: ImageFile, compressor: Compressor, workers: int,
               files: FileData, written: Callable[[int], None]
               ) -> list[tuple[int, int]]:
    """Write every file's blocks and the fragment blocks; where each file's went (in
    ``files``) and each fragment block's position and size field.

    Each file is read once (see ReadAhead). A file that shares its size with another is
    held until its digest is known, so a duplicate of an earlier file is never written:
    it shares the earlier file's blocks and fragment. All-zero blocks are stored sparse.
    Tails pack into fragment blocks in file order; a fragment block is queued when the
    next tail does not fit. ``written(n)`` is called as files are done: every file before
    index n has all its blocks written.
    """
    block_size = plan.block_size
    zero_block = bytes(block_size)
    full_blocks = plan.full_blocks
    may_duplicate = plan.may_duplicate
    # (digest + size) -> the first file with them. One bytes key, not a tuple of two
    # objects: on a tree of small files every file may duplicate another.
    first_of: dict[bytes, int] = {}
    fragment_buffer = bytearray()
    depth = max(4, READ_AHEAD_BYTES // max(block_size, BATCH_BYTES))
    with ThreadPoolExecutor(max_workers=max(1, workers),
                            thread_name_prefix="squashfs-compress") as pool, \
            ReadAhead(plan, depth) as reader:
        writer = DataWriter(image, compressor, pool, max(1, workers) * IN_FLIGHT_PER_WORKER,
                            files)

        def place(index: int, number: int, block: bytes) -> None:
            nonlocal fragment_buffer
            if number >= full_blocks[index]:
                if len(fragment_buffer) + len(block) > block_size:
                    writer.fragment(bytes(fragment_buffer))
                    fragment_buffer = bytearray()
                files.fragment[index] = len(writer.fragments)
                files.fragment_offset[index] = len(fragment_buffer)
                fragment_buffer += block
            elif block == zero_block or (len(block) < block_size
                                         and not block.strip(b"\0")):
                writer.sparse(index, number, len(block))
            else:
                writer.block(index, number, block)

        current = -1
        number = 0
        decided = skip = False
        held: list[bytes] = []
        for index, block, digest in reader:
            if index != current:
                written(writer.first_pending_file(index))
                current, number, held = index, 0, []
                decided, skip = not may_duplicate[index], False
            if not decided:
                held.append(block)
                if digest is None:
                    continue
                decided = True
                size = plan.file_entries[index].size
                original = first_of.setdefault(digest + size.to_bytes(8, "little"), index)
                if original != index:
                    files.origin[index] = original
                    skip = True
                if not skip:
                    for waiting in held:
                        place(index, number, waiting)
                        number += 1
                held = []
            elif not skip:
                place(index, number, block)
                number += 1
        if fragment_buffer:
            writer.fragment(bytes(fragment_buffer))
        writer.drain(0)
    return writer.fragments


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
