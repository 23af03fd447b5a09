"""Serialise a planned squashfs image: data blocks, fragments, then the metadata tables.

The layout on disk follows mksquashfs, which the kernel's sanity checks expect: the
superblock, the compressor options, file data and fragment blocks, the inode table, the
directory table, the fragment table, the export table, the id table, the xattr table; the
image is padded to 4 KiB. File data streams through ``Content.chunks()`` one block at a
time; blocks compress in worker threads and are written in plan order, with a bounded
number in flight.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

import blake3

from reprobuild.errors import ImageError, ImageTooSmall
from reprobuild.images.squashfs.compressors import Compressor
from reprobuild.images.squashfs.layout import BASIC_TYPE, InodePlan, SquashfsPlan
from reprobuild.images.squashfs.ondisk import (
    SQUASHFS_ALWAYS_FRAG,
    SQUASHFS_BASE_INODE,
    SQUASHFS_COMP_OPT,
    SQUASHFS_COMPRESSED_BIT,
    SQUASHFS_COMPRESSED_BIT_BLOCK,
    SQUASHFS_DEV_INODE,
    SQUASHFS_DIR_COUNT,
    SQUASHFS_DIR_ENTRY,
    SQUASHFS_DIR_HEADER,
    SQUASHFS_DIR_INDEX,
    SQUASHFS_DIR_INODE,
    SQUASHFS_DIR_TYPE,
    SQUASHFS_DUPLICATE,
    SQUASHFS_EXPORT,
    SQUASHFS_EXTENDED,
    SQUASHFS_FRAGMENT_ENTRY,
    SQUASHFS_INVALID_BLK,
    SQUASHFS_INVALID_FRAG,
    SQUASHFS_INVALID_XATTR,
    SQUASHFS_IPC_INODE,
    SQUASHFS_LDEV_INODE,
    SQUASHFS_LDIR_INODE,
    SQUASHFS_LDIR_TYPE,
    SQUASHFS_LIPC_INODE,
    SQUASHFS_LREG_INODE,
    SQUASHFS_LREG_TYPE,
    SQUASHFS_MAGIC,
    SQUASHFS_MAJOR,
    SQUASHFS_METADATA_HEADER,
    SQUASHFS_METADATA_SIZE,
    SQUASHFS_MINOR,
    SQUASHFS_NOD,
    SQUASHFS_NOF,
    SQUASHFS_NOI,
    SQUASHFS_NOID,
    SQUASHFS_NOX,
    SQUASHFS_REG_INODE,
    SQUASHFS_REG_TYPE,
    SQUASHFS_SUPER_BLOCK,
    SQUASHFS_SYMLINK_INODE,
    SQUASHFS_XATTR_ENTRY,
    SQUASHFS_XATTR_ID,
    SQUASHFS_XATTR_ID_TABLE,
    SQUASHFS_XATTR_VAL,
    U32,
    U64,
    encode_rdev,
    inode_ref,
)
from reprobuild.trees.tree import Content, EntryType

PAD_TO = 4096
IN_FLIGHT_PER_WORKER = 4
HOLD_LIMIT = 16 << 20  # files sharing a size are held in memory up to this size
READ_AHEAD_BYTES = 8 << 20


@dataclass(frozen=True)
class WriteSettings:
    """What the writer needs besides the plan."""

    compressor: Compressor
    mkfs_time: int
    exportable: bool
    workers: int
    size: int | None = None  # pad the image to exactly this many bytes


class MetadataWriter:
    """Packs bytes into 8 KiB metadata blocks, compressing each as soon as it is full.

    The on-disk start of a block depends only on the blocks before it, so a reference to
    the next byte is known while the table is still growing.
    """

    def __init__(self, compressor: Compressor) -> None:
        self.compressor = compressor
        self.blocks: list[bytes] = []
        self.block_starts: list[int] = []
        self.written = 0  # bytes of finished blocks (with headers)
        self.pending = bytearray()

    def append(self, data: bytes) -> None:
        self.pending += data
        while len(self.pending) >= SQUASHFS_METADATA_SIZE:
            self._flush(bytes(self.pending[:SQUASHFS_METADATA_SIZE]))
            del self.pending[:SQUASHFS_METADATA_SIZE]

    def _flush(self, raw: bytes) -> None:
        stored = compress_metadata(self.compressor, raw)
        self.block_starts.append(self.written)
        self.blocks.append(stored)
        self.written += len(stored)

    @property
    def uncompressed_position(self) -> int:
        return len(self.block_starts) * SQUASHFS_METADATA_SIZE + len(self.pending)

    def ref(self) -> tuple[int, int]:
        """(block start relative to the table, offset) of the next byte appended."""
        return self.written, len(self.pending)

    def block_start(self, block_number: int) -> int:
        """On-disk start, relative to the table, of the ``block_number``-th block."""
        if block_number < len(self.block_starts):
            return self.block_starts[block_number]
        assert block_number == len(self.block_starts)
        return self.written

    def finish(self) -> bytes:
        if self.pending:
            self._flush(bytes(self.pending))
            self.pending.clear()
        return b"".join(self.blocks)


def compress_metadata(compressor: Compressor, raw: bytes) -> bytes:
    if compressor.compresses:
        packed = compressor.compress(raw)
        if len(packed) < len(raw):
            return SQUASHFS_METADATA_HEADER.pack(len(packed)) + packed
    return SQUASHFS_METADATA_HEADER.pack(len(raw) | SQUASHFS_COMPRESSED_BIT) + raw


def compress_block(compressor: Compressor, raw: bytes) -> tuple[bytes, int]:
    """A data or fragment block as stored, and its size field (bit 24: uncompressed)."""
    if compressor.compresses and not compressor.incompressible(raw):
        packed = compressor.compress(raw)
        if len(packed) < len(raw):
            return packed, len(packed)
    return raw, len(raw) | SQUASHFS_COMPRESSED_BIT_BLOCK


@dataclass
class FileResult:
    """Where one file's data went (shared by the files that duplicate it)."""

    start: int = 0
    sizes: list[int] = field(default_factory=list)
    sparse: int = 0
    fragment: tuple[int, int] | None = None  # (fragment block index, offset in it)


class ImageFile:
    """The output file with its current position."""

    def __init__(self, output: BinaryIO) -> None:
        self.output = output
        self.position = 0

    def write(self, data: bytes) -> int:
        at = self.position
        self.output.write(data)
        self.position += len(data)
        return at


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

    results, fragments = write_data(plan, image, compressor, settings.workers)

    inode_table_start = image.position
    inode_refs, directory_table = build_inode_and_directory_tables(plan, results, compressor)
    image.write(inode_refs.table)
    directory_table_start = image.write(directory_table)

    fragment_table_start = write_lookup_table(
        image, compressor,
        b"".join(SQUASHFS_FRAGMENT_ENTRY.pack(start, size, 0) for start, size in fragments))
    lookup_table_start = SQUASHFS_INVALID_BLK
    if settings.exportable:
        flags |= SQUASHFS_EXPORT
        lookup_table_start = write_lookup_table(
            image, compressor, b"".join(U64.pack(inode_ref(*r)) for r in inode_refs.refs))
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
    while image.position < padded:
        image.write(bytes(min(padded - image.position, 1 << 20)))
    block_log = plan.block_size.bit_length() - 1
    root_ref = inode_refs.refs[plan.root_index]
    output.seek(0)
    output.write(SQUASHFS_SUPER_BLOCK.pack(
        SQUASHFS_MAGIC, len(plan.inodes), settings.mkfs_time, plan.block_size,
        len(fragments), compressor.squashfs_id, block_log, flags, len(plan.ids),
        SQUASHFS_MAJOR, SQUASHFS_MINOR, inode_ref(*root_ref), bytes_used, id_table_start,
        xattr_id_table_start, inode_table_start, directory_table_start,
        fragment_table_start, lookup_table_start))
    output.seek(padded)


# -- data ---------------------------------------------------------------------------------
def file_blocks(content: Content, block_size: int, where: str) -> Iterator[bytes]:
    """The content in ``block_size`` pieces (the last one shorter), checking its size."""
    carry = b""
    total = 0
    for chunk in content.chunks(block_size):
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
        raise ImageError(f"squashfs: {where}: content has {total} bytes, expected"
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
                 limit: int, results: list[FileResult]) -> None:
        self.image = image
        self.compressor = compressor
        self.pool = pool
        self.limit = limit
        self.results = results
        self.pending: deque[Job] = deque()
        self.fragments: list[tuple[int, int]] = []

    def block(self, file_index: int, number: int, data: bytes) -> None:
        self.pending.append((file_index, number, len(data),
                             self.pool.submit(compress_block, self.compressor, data)))
        self.drain(self.limit)

    def sparse(self, file_index: int, number: int, length: int) -> None:
        self.pending.append((file_index, number, length, None))
        self.drain(self.limit)

    def fragment(self, data: bytes) -> None:
        self.fragments.append((0, 0))
        self.pending.append((-1, len(self.fragments) - 1, len(data),
                             self.pool.submit(compress_block, self.compressor, data)))
        self.drain(self.limit)

    def drain(self, keep: int) -> None:
        pending = self.pending
        image = self.image
        while len(pending) > keep:
            file_index, number, length, future = pending.popleft()
            if file_index < 0:
                assert future is not None
                data, size_field = future.result()
                self.fragments[number] = (image.write(data), size_field)
                continue
            result = self.results[file_index]
            if number == 0:
                result.start = image.position
            if future is None:
                result.sizes.append(0)
                result.sparse += length
            else:
                data, size_field = future.result()
                image.write(data)
                result.sizes.append(size_field)


class ReadAhead:
    """Reads the files' blocks in plan order on a thread of its own.

    Yields (file index, block, digest or None). A file that may
    duplicate another gets its blake3 digest: on every block when known beforehand (given
    by the store, or hashed in a first pass when larger than HOLD_LIMIT), else on its last
    block (hashed as it streams). At most ``depth`` blocks wait in the queue; reads release
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
            block_size = self.plan.block_size
            for index, file in enumerate(self.plan.files):
                if file.size == 0:
                    continue
                content = file.entry.content
                assert content is not None
                digest: bytes | None = None
                hasher = None
                if file.may_duplicate:
                    if content.known_blake3 is not None or file.size > HOLD_LIMIT:
                        digest = content.blake3
                    else:
                        hasher = blake3.blake3()
                previous: bytes | None = None
                for block in file_blocks(content, block_size, file.entry.display()):
                    if hasher is not None:
                        hasher.update(block)
                    if previous is not None and not self._put((index, previous, digest)):
                        return
                    previous = block
                if hasher is not None:
                    digest = hasher.digest()
                if not self._put((index, previous, digest)):
                    return
            self._put(self.DONE)
        except BaseException as error:  # handed to the main thread, which raises it
            self._put(error)

    def __iter__(self) -> Iterator[tuple[int, bytes, bytes | None]]:
        while True:
            item = self.queue.get()
            if item is self.DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]


def write_data(plan: SquashfsPlan, image: ImageFile, compressor: Compressor,
               workers: int) -> tuple[list[FileResult], list[tuple[int, int]]]:
    """Write every file's blocks and the fragment blocks; where each went.

    Each file is read once (see ReadAhead). A file that shares its size with another is
    held until its digest is known, so a duplicate of an earlier file is never written:
    it shares the earlier file's blocks and fragment. All-zero blocks are stored sparse.
    Tails pack into fragment blocks in file order; a fragment block is queued when the
    next tail does not fit.
    """
    block_size = plan.block_size
    zero_block = bytes(block_size)
    results = [FileResult() for _ in plan.files]
    first_of: dict[tuple[int, bytes], int] = {}
    fragment_buffer = bytearray()
    depth = max(4, READ_AHEAD_BYTES // block_size)
    with ThreadPoolExecutor(max_workers=max(1, workers),
                            thread_name_prefix="squashfs-compress") as pool, \
            ReadAhead(plan, depth) as reader:
        writer = DataWriter(image, compressor, pool, max(1, workers) * IN_FLIGHT_PER_WORKER,
                            results)

        def place(index: int, number: int, block: bytes) -> None:
            nonlocal fragment_buffer
            if number >= plan.files[index].full_blocks:
                if len(fragment_buffer) + len(block) > block_size:
                    writer.fragment(bytes(fragment_buffer))
                    fragment_buffer = bytearray()
                results[index].fragment = (len(writer.fragments), len(fragment_buffer))
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
                current, number, held = index, 0, []
                decided, skip = not plan.files[index].may_duplicate, False
            if not decided:
                held.append(block)
                if digest is None:
                    continue
                decided = True
                original = first_of.setdefault((plan.files[index].size, digest), index)
                if original != index:
                    results[index] = results[original]
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
    return results, writer.fragments


# -- inodes and directories ---------------------------------------------------------------
@dataclass(frozen=True)
class InodeTable:
    table: bytes
    refs: tuple[tuple[int, int], ...]  # per inode index: (block start, offset)


@dataclass(frozen=True)
class Listing:
    start: tuple[int, int]  # (directory block start, offset)
    size: int  # bytes of headers and entries (the inode's file_size is this + 3)
    index: bytes  # packed squashfs_dir_index entries
    index_count: int


def build_inode_and_directory_tables(
    plan: SquashfsPlan, results: list[FileResult], compressor: Compressor
) -> tuple[InodeTable, bytes]:
    inodes = MetadataWriter(compressor)
    directories = MetadataWriter(compressor)
    refs: list[tuple[int, int]] = [(0, 0)] * len(plan.inodes)
    listings: dict[int, Listing] = {}
    for kind, index in plan.steps:
        if kind == "dir":
            directory = plan.directories[index]
            listings[directory.inode_index] = write_listing(
                plan, directory.children, refs, directories)
            continue
        refs[index] = inodes.ref()
        inodes.append(encode_inode(plan, plan.inodes[index], results, listings))
    return InodeTable(inodes.finish(), tuple(refs)), directories.finish()


def write_listing(plan: SquashfsPlan, children: tuple[tuple[bytes, int], ...],
                  refs: list[tuple[int, int]], table: MetadataWriter) -> Listing:
    """Append one directory's headers and entries; split runs where the format needs."""
    start = table.ref()
    base_position = table.uncompressed_position
    out = bytearray()
    index_entries: list[tuple[int, int, bytes]] = []  # (listing offset, block number, name)
    header_block = -1
    indexed_block = -1
    base_number = 0
    inode_block = -1
    headers: list[list[int]] = []  # [offset in out, first child's inode index, count]
    for name, child in children:
        block, offset = refs[child]
        number = plan.inodes[child].number
        position = base_position + len(out)
        if (not headers or headers[-1][2] == SQUASHFS_DIR_COUNT or block != inode_block
                or not -32768 <= number - base_number <= 32767
                or position // SQUASHFS_METADATA_SIZE != header_block):
            # A new run: the first, a full one, another inode block, an inode number out
            # of s16 reach, or the listing crossed into another directory block.
            header_block = position // SQUASHFS_METADATA_SIZE
            if indexed_block < 0:
                indexed_block = header_block
            elif header_block != indexed_block:
                # Lookups jump to the last indexed header whose first name is not past
                # the wanted one (the kernel's get_dir_index_using_name).
                index_entries.append((len(out), header_block, name))
                indexed_block = header_block
            headers.append([len(out), child, 0])
            out += bytes(SQUASHFS_DIR_HEADER.size)
            base_number = number
            inode_block = block
        entry = plan.inodes[child].entry
        out += SQUASHFS_DIR_ENTRY.pack(offset, number - base_number, BASIC_TYPE[entry.type],
                                       len(name) - 1)
        out += name
        headers[-1][2] += 1
    for at, first, count in headers:
        SQUASHFS_DIR_HEADER.pack_into(out, at, count - 1, refs[first][0],
                                      plan.inodes[first].number)
    table.append(bytes(out))
    index = b"".join(
        SQUASHFS_DIR_INDEX.pack(offset, table.block_start(block), len(name) - 1) + name
        for offset, block, name in index_entries)
    return Listing(start, len(out), index, len(index_entries))


def _mtime(inode: InodePlan) -> int:
    seconds = inode.entry.mtime_ns // 1_000_000_000
    if not 0 <= seconds < 1 << 32:
        raise ImageError(f"squashfs: {inode.entry.display()}: mtime {seconds} does not fit"
                         " 32 unsigned bits", hint="clamp times to the epoch first")
    return seconds


def encode_inode(plan: SquashfsPlan, inode: InodePlan, results: list[FileResult],
                 listings: dict[int, Listing]) -> bytes:
    """One inode, basic where the basic form can hold it, extended otherwise."""
    entry = inode.entry
    xattr = SQUASHFS_INVALID_XATTR if inode.xattr_index is None else inode.xattr_index
    has_xattr = inode.xattr_index is not None
    basic = BASIC_TYPE[entry.type]
    index = inode.number - 1

    def base(kind: int) -> bytes:
        return SQUASHFS_BASE_INODE.pack(kind, entry.mode & 0o7777, inode.uid_index,
                                        inode.gid_index, _mtime(inode), inode.number)

    if entry.type is EntryType.DIRECTORY:
        listing = listings[index]
        block, offset = listing.start
        size = listing.size + 3
        if listing.index_count or has_xattr or size > 0xFFFF:
            return (base(SQUASHFS_LDIR_TYPE)
                    + SQUASHFS_LDIR_INODE.pack(inode.nlink, size, block, inode.parent_number,
                                               listing.index_count, offset, xattr)
                    + listing.index)
        return base(SQUASHFS_DIR_TYPE) + SQUASHFS_DIR_INODE.pack(
            block, inode.nlink, size, offset, inode.parent_number)
    if entry.type is EntryType.REGULAR:
        assert inode.file_index is not None
        file = plan.files[inode.file_index]
        result = results[inode.file_index]
        sizes = result.sizes
        fragment, frag_offset = result.fragment or (SQUASHFS_INVALID_FRAG, 0)
        block_list = b"".join(U32.pack(s) for s in sizes)
        if (file.size >= 1 << 32 or result.start >= 1 << 32 or inode.nlink > 1
                or has_xattr or result.sparse):
            return (base(SQUASHFS_LREG_TYPE)
                    + SQUASHFS_LREG_INODE.pack(result.start, file.size, result.sparse,
                                               inode.nlink, fragment, frag_offset, xattr)
                    + block_list)
        return (base(SQUASHFS_REG_TYPE)
                + SQUASHFS_REG_INODE.pack(result.start, fragment, frag_offset, file.size)
                + block_list)
    kind = basic + SQUASHFS_EXTENDED if has_xattr else basic
    if entry.type is EntryType.SYMLINK:
        target = entry.target or b""
        body = SQUASHFS_SYMLINK_INODE.pack(inode.nlink, len(target)) + target
        return base(kind) + body + (U32.pack(xattr) if has_xattr else b"")
    if entry.type in (EntryType.BLOCK, EntryType.CHAR):
        rdev = encode_rdev(entry.rdev_major, entry.rdev_minor)
        if has_xattr:
            return base(kind) + SQUASHFS_LDEV_INODE.pack(inode.nlink, rdev, xattr)
        return base(kind) + SQUASHFS_DEV_INODE.pack(inode.nlink, rdev)
    if has_xattr:
        return base(kind) + SQUASHFS_LIPC_INODE.pack(inode.nlink, xattr)
    return base(kind) + SQUASHFS_IPC_INODE.pack(inode.nlink)


# -- lookup tables ------------------------------------------------------------------------
def write_metadata_blocks(image: ImageFile, compressor: Compressor,
                          data: bytes) -> list[int]:
    """Write ``data`` as metadata blocks; their absolute positions."""
    positions = []
    for at in range(0, len(data), SQUASHFS_METADATA_SIZE):
        block = compress_metadata(compressor, data[at:at + SQUASHFS_METADATA_SIZE])
        positions.append(image.write(block))
    return positions


def write_lookup_table(image: ImageFile, compressor: Compressor, data: bytes) -> int:
    """A table stored as metadata blocks plus an index of their positions; the index's."""
    positions = write_metadata_blocks(image, compressor, data)
    return image.write(b"".join(U64.pack(p) for p in positions))


def write_xattr_table(image: ImageFile, compressor: Compressor, plan: SquashfsPlan) -> int:
    if not plan.xattr_sets:
        return SQUASHFS_INVALID_BLK
    pairs = MetadataWriter(compressor)
    ids = bytearray()
    for xattr_set in plan.xattr_sets:
        block, offset = pairs.ref()
        size = 0
        for prefix, name, value in xattr_set:
            packed = (SQUASHFS_XATTR_ENTRY.pack(prefix, len(name)) + name
                      + SQUASHFS_XATTR_VAL.pack(len(value)) + value)
            pairs.append(packed)
            size += len(packed)
        ids += SQUASHFS_XATTR_ID.pack(inode_ref(block, offset), len(xattr_set), size)
    pairs_start = image.write(pairs.finish())
    positions = write_metadata_blocks(image, compressor, bytes(ids))
    return image.write(SQUASHFS_XATTR_ID_TABLE.pack(pairs_start, len(plan.xattr_sets), 0)
                       + b"".join(U64.pack(p) for p in positions))


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
