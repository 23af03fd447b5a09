"""The metadata tables of a squashfs image: inode and directory tables, lookup tables
(fragments, export, ids) and the xattr table, packed into 8 KiB metadata blocks; and
:class:`ImageFile`, the output with its position, which the data writer shares."""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass
from typing import BinaryIO

from reprobuild.errors import ImageError
from reprobuild.images.squashfs.compressors import Compressor
from reprobuild.images.squashfs.layout import BASIC_TYPE, NONE, SquashfsPlan
from reprobuild.images.squashfs.ondisk import (
    SQUASHFS_BASE_INODE,
    SQUASHFS_COMPRESSED_BIT,
    SQUASHFS_DEV_INODE,
    SQUASHFS_DIR_COUNT,
    SQUASHFS_DIR_ENTRY,
    SQUASHFS_DIR_HEADER,
    SQUASHFS_DIR_INDEX,
    SQUASHFS_DIR_INODE,
    SQUASHFS_DIR_TYPE,
    SQUASHFS_EXTENDED,
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
    SQUASHFS_METADATA_HEADER,
    SQUASHFS_METADATA_SIZE,
    SQUASHFS_REG_INODE,
    SQUASHFS_REG_TYPE,
    SQUASHFS_SYMLINK_INODE,
    SQUASHFS_XATTR_ENTRY,
    SQUASHFS_XATTR_ID,
    SQUASHFS_XATTR_ID_TABLE,
    SQUASHFS_XATTR_VAL,
    U32,
    U64,
    encode_rdev,
)
from reprobuild.trees.tree import Entry, EntryType


class MetadataWriter:
    """Packs bytes into 8 KiB metadata blocks, compressing each as soon as it is full.

    The on-disk start of a block depends only on the blocks before it, so a reference to
    the next byte is known while the table is still growing. The stored blocks are kept
    in one buffer, not one object per block.
    """

    def __init__(self, compressor: Compressor) -> None:
        self.compressor = compressor
        self.stored = bytearray()  # the finished blocks, with their headers
        self.block_starts = array("Q")
        self.pending = bytearray()

    def append(self, data: bytes | bytearray) -> None:
        self.pending += data
        while len(self.pending) >= SQUASHFS_METADATA_SIZE:
            self._flush(bytes(self.pending[:SQUASHFS_METADATA_SIZE]))
            del self.pending[:SQUASHFS_METADATA_SIZE]

    def _flush(self, raw: bytes) -> None:
        self.block_starts.append(len(self.stored))
        self.stored += compress_metadata(self.compressor, raw)

    @property
    def uncompressed_position(self) -> int:
        return len(self.block_starts) * SQUASHFS_METADATA_SIZE + len(self.pending)

    def ref(self) -> int:
        """The reference (see ``inode_ref``) of the next byte appended."""
        return len(self.stored) << 16 | len(self.pending)

    def block_start(self, block_number: int) -> int:
        """On-disk start, relative to the table, of the ``block_number``-th block."""
        if block_number < len(self.block_starts):
            return self.block_starts[block_number]
        assert block_number == len(self.block_starts)
        return len(self.stored)

    def finish(self) -> bytearray:
        if self.pending:
            self._flush(bytes(self.pending))
            self.pending.clear()
        return self.stored


def compress_metadata(compressor: Compressor, raw: bytes) -> bytes:
    if compressor.compresses:
        packed = compressor.compress(raw)
        if len(packed) < len(raw):
            return SQUASHFS_METADATA_HEADER.pack(len(packed)) + packed
    return SQUASHFS_METADATA_HEADER.pack(len(raw) | SQUASHFS_COMPRESSED_BIT) + raw


def little_endian(values: array[int]) -> bytes:
    """The array's items as little-endian bytes, whatever the host's byte order."""
    if sys.byteorder == "little":
        return values.tobytes()
    swapped = array(values.typecode, values)
    swapped.byteswap()
    return swapped.tobytes()


class FileData:
    """Where each file's data went, in columns indexed by file (SquashfsPlan.file_entries).

    A file that duplicates an earlier one has that file's index as its ``origin`` and
    shares its blocks and fragment. The sizes of every file's blocks are appended in
    file order to one array; a file's run of ``full_blocks`` sizes starts at its
    ``first_block``.
    """

    __slots__ = ("block_sizes", "first_block", "fragment", "fragment_offset", "origin",
                 "sparse", "start")

    def __init__(self, count: int) -> None:
        self.origin = array("I", range(count))
        self.start = array("Q", bytes(8 * count))
        self.sparse = array("Q", bytes(8 * count))
        self.first_block = array("Q", bytes(8 * count))
        self.fragment = array("I", [SQUASHFS_INVALID_FRAG]) * count
        self.fragment_offset = array("I", bytes(4 * count))
        self.block_sizes = array("I")  # each stored block's size field; 0: sparse


class ImageFile:
    """The output file with its current position."""

    def __init__(self, output: BinaryIO) -> None:
        self.output = output
        self.position = 0

    def write(self, data: bytes | bytearray) -> int:
        at = self.position
        self.output.write(data)
        self.position += len(data)
        return at



# -- inodes and directories ---------------------------------------------------------------
@dataclass(frozen=True)
class InodeTable:
    table: bytearray
    refs: array[int]  # per inode index: its reference (see inode_ref)


@dataclass(frozen=True)
class Listing:
    start: int  # reference of the listing in the directory table
    size: int  # bytes of headers and entries (the inode's file_size is this + 3)
    index: bytes  # packed squashfs_dir_index entries
    index_count: int


class TableBuilder:
    """The inode and directory tables, built in emit order as the files' data is written.

    A regular file's inode needs where its blocks went and their sizes; every other step
    (a listing, another kind of inode) needs only steps before it. ``advance`` emits the
    steps up to the first regular file whose data is not all written yet, so most of the
    tables are packed and compressed on the writer's thread while the compression threads
    work, not after them; ``finish`` emits the rest. The bytes are those of emitting every
    step at the end: no step reads anything that changes after it is emitted.
    """

    def __init__(self, plan: SquashfsPlan, data: FileData, compressor: Compressor) -> None:
        self.plan = plan
        self.data = data
        self.inodes = MetadataWriter(compressor)
        self.directories = MetadataWriter(compressor)
        self.refs = array("Q", bytes(8 * plan.inode_count))
        self.listings: dict[int, Listing] = {}
        self.steps = plan.emit_order()
        self.step = next(self.steps, None)

    def advance(self, files_written: int) -> None:
        """Emit the steps that need no file at or after ``files_written`` (an index in
        the data order: every file before it has all its blocks written)."""
        plan = self.plan
        file_indexes = plan.file_indexes
        step = self.step
        while step is not None:
            kind, index = step
            if kind == "dir":
                self.listings[plan.directory_inodes[index]] = write_listing(
                    plan, index, self.refs, self.directories)
            else:
                if file_indexes[index] >= files_written:  # NONE (-1) never waits
                    break
                self.refs[index] = self.inodes.ref()
                self.inodes.append(encode_inode(plan, index, self.data, self.listings))
            step = next(self.steps, None)
        self.step = step

    def finish(self) -> tuple[InodeTable, bytearray]:
        """The two tables, once every file's data is written."""
        self.advance(len(self.plan.file_entries))
        assert self.step is None
        return InodeTable(self.inodes.finish(), self.refs), self.directories.finish()


def write_listing(plan: SquashfsPlan, directory: int, refs: array[int],
                  table: MetadataWriter) -> Listing:
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
    entries = plan.entries
    for name, child in plan.children(directory):
        ref = refs[child]
        block, offset = ref >> 16, ref & 0xFFFF
        number = child + 1
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
        out += SQUASHFS_DIR_ENTRY.pack(offset, number - base_number,
                                       BASIC_TYPE[entries[child].type], len(name) - 1)
        out += name
        headers[-1][2] += 1
    for at, first, count in headers:
        SQUASHFS_DIR_HEADER.pack_into(out, at, count - 1, refs[first] >> 16, first + 1)
    table.append(out)
    index = b"".join(
        SQUASHFS_DIR_INDEX.pack(offset, table.block_start(block), len(name) - 1) + name
        for offset, block, name in index_entries)
    return Listing(start, len(out), index, len(index_entries))


def _mtime(entry: Entry) -> int:
    seconds = entry.mtime_ns // 1_000_000_000
    if not 0 <= seconds < 1 << 32:
        raise ImageError(f"squashfs: {entry.display()}: mtime {seconds} does not fit"
                         " 32 unsigned bits", hint="clamp times to the epoch first")
    return seconds


def encode_inode(plan: SquashfsPlan, index: int, data: FileData,
                 listings: dict[int, Listing]) -> bytes:
    """Inode ``index``, basic where the basic form can hold it, extended otherwise."""
    entry = plan.entries[index]
    xattr_index = plan.xattr_indexes[index]
    has_xattr = xattr_index != NONE
    xattr = xattr_index if has_xattr else SQUASHFS_INVALID_XATTR
    nlink = plan.nlinks[index]
    number = index + 1
    kind = entry.type

    def base(inode_type: int) -> bytes:
        return SQUASHFS_BASE_INODE.pack(inode_type, entry.mode & 0o7777,
                                        plan.uid_indexes[index], plan.gid_indexes[index],
                                        _mtime(entry), number)

    if kind is EntryType.DIRECTORY:
        listing = listings[index]
        block, offset = listing.start >> 16, listing.start & 0xFFFF
        size = listing.size + 3
        parent = plan.parent_numbers[index]
        if listing.index_count or has_xattr or size > 0xFFFF:
            return (base(SQUASHFS_LDIR_TYPE)
                    + SQUASHFS_LDIR_INODE.pack(nlink, size, block, parent,
                                               listing.index_count, offset, xattr)
                    + listing.index)
        return base(SQUASHFS_DIR_TYPE) + SQUASHFS_DIR_INODE.pack(
            block, nlink, size, offset, parent)
    if kind is EntryType.REGULAR:
        file_index = plan.file_indexes[index]
        size = entry.size
        origin = data.origin[file_index]
        start = data.start[origin]
        sparse = data.sparse[origin]
        fragment, frag_offset = data.fragment[origin], data.fragment_offset[origin]
        first = data.first_block[origin]
        block_list = little_endian(
            data.block_sizes[first:first + plan.full_blocks[origin]])
        if size >= 1 << 32 or start >= 1 << 32 or nlink > 1 or has_xattr or sparse:
            return (base(SQUASHFS_LREG_TYPE)
                    + SQUASHFS_LREG_INODE.pack(start, size, sparse, nlink, fragment,
                                               frag_offset, xattr)
                    + block_list)
        return (base(SQUASHFS_REG_TYPE)
                + SQUASHFS_REG_INODE.pack(start, fragment, frag_offset, size)
                + block_list)
    basic = BASIC_TYPE[kind]
    inode_type = basic + SQUASHFS_EXTENDED if has_xattr else basic
    if kind is EntryType.SYMLINK:
        target = entry.target or b""
        body = SQUASHFS_SYMLINK_INODE.pack(nlink, len(target)) + target
        return base(inode_type) + body + (U32.pack(xattr) if has_xattr else b"")
    if kind in (EntryType.BLOCK, EntryType.CHAR):
        rdev = encode_rdev(entry.rdev_major, entry.rdev_minor)
        if has_xattr:
            return base(inode_type) + SQUASHFS_LDEV_INODE.pack(nlink, rdev, xattr)
        return base(inode_type) + SQUASHFS_DEV_INODE.pack(nlink, rdev)
    if has_xattr:
        return base(inode_type) + SQUASHFS_LIPC_INODE.pack(nlink, xattr)
    return base(inode_type) + SQUASHFS_IPC_INODE.pack(nlink)


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
        ref = pairs.ref()
        size = 0
        for prefix, name, value in xattr_set:
            packed = (SQUASHFS_XATTR_ENTRY.pack(prefix, len(name)) + name
                      + SQUASHFS_XATTR_VAL.pack(len(value)) + value)
            pairs.append(packed)
            size += len(packed)
        ids += SQUASHFS_XATTR_ID.pack(ref, len(xattr_set), size)
    pairs_start = image.write(pairs.finish())
    positions = write_metadata_blocks(image, compressor, bytes(ids))
    return image.write(SQUASHFS_XATTR_ID_TABLE.pack(pairs_start, len(plan.xattr_sets), 0)
                       + b"".join(U64.pack(p) for p in positions))
