"""The metadata tables of a squashfs image: inode and directory tables, lookup tables
(fragments, export, ids) and the xattr table, packed into 8 KiB metadata blocks; and
:class:`ImageFile`, the output with its position, which the data writer shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import BinaryIO

from reprobuild.errors import ImageError
from reprobuild.images.squashfs.compressors import Compressor
from reprobuild.images.squashfs.layout import BASIC_TYPE, InodePlan, SquashfsPlan
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
    inode_ref,
)
from reprobuild.trees.tree import EntryType


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


@dataclass(slots=True)
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
