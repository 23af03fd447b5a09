"""Serialise an ext4 :class:`~reprobuild.images.ext4.layout.Layout` to bytes.

Metadata (superblocks, group descriptors, bitmaps, inode tables) is built in memory one
group at a time; directory, xattr and extent blocks are sealed with their checksums and
written in block order; file data streams through ``Content.chunks()`` straight to its
extents. Nothing is read from the host except the file contents the tree names.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO

from reprobuild.errors import ImageError
from reprobuild.images.ext4.allocate import Extent, InodePlan, Layout
from reprobuild.images.ext4.directory import KIND_DX_NODE, KIND_DX_ROOT, KIND_LEAF, DirBlock
from reprobuild.images.ext4.ondisk import (
    BG_INODE_ZEROED,
    BLOCK_SIZE,
    BLOCKS_PER_GROUP,
    DEFAULT_MOUNT_OPTS,
    DESC_SIZE,
    DX_NODE_LIMIT,
    DX_ROOT_LIMIT,
    EXT4_GROUP_DESC,
    EXT4_INODE,
    EXT4_SUPER_BLOCK,
    EXT4_SUPER_MAGIC,
    EXTRA_ISIZE,
    FEATURE_COMPAT,
    FEATURE_INCOMPAT,
    FEATURE_RO_COMPAT,
    FIRST_INO,
    GD_CHECKSUM_OFFSET,
    GROUP_DESC_FIELDS,
    INODE_SIZE,
    SB_CHECKSUM_OFFSET,
    SB_FLAGS_UNSIGNED_HASH,
    SUPER_BLOCK_FIELDS,
    SUPERBLOCK_OFFSET,
    crc32c_raw,
    encode_time,
    fs_checksum_seed,
    has_super_backup,
    inode_checksum_seed,
    pack_fields,
)
from reprobuild.images.ext4.scan import WHOLE_READ_MAX, aligned_chunks
from reprobuild.trees.tree import Content, ContentReader

LEAF_CSUM_AT = BLOCK_SIZE - 4
TREE_CSUM_AT = 12 + 340 * 12  # ext4_extent_tail after eh_max entries
XATTR_CSUM_AT = 16


class _Sink:
    """Coalesces writes at consecutive offsets into few large ones (pwrite when possible)."""

    LIMIT = 1 << 20

    def __init__(self, output: BinaryIO) -> None:
        self.output = output
        self.fd: int | None
        try:
            output.flush()
            self.fd = output.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            self.fd = None
        self.start = 0
        self.size = 0
        self.parts: list[bytes | bytearray | memoryview] = []

    def put(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if isinstance(data, memoryview):
            base = data.obj
            if isinstance(base, bytes | bytearray) and len(data) < len(base):
                data = bytes(data)  # a slice must not keep its whole chunk alive in the buffer
        if self.parts and offset == self.start + self.size and self.size < self.LIMIT:
            self.parts.append(data)
            self.size += len(data)
            return
        self.flush()
        self.start, self.size, self.parts = offset, len(data), [data]

    def flush(self) -> None:
        if not self.parts:
            return
        data = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
        if self.fd is not None:
            view = memoryview(data)
            offset = self.start
            while view:
                written = os.pwrite(self.fd, view, offset)
                view = view[written:]
                offset += written
        else:
            self.output.seek(self.start)
            self.output.write(data)
        self.parts = []
        self.size = 0

    def finish(self, image_size: int) -> None:
        self.flush()
        if self.fd is not None:
            if os.fstat(self.fd).st_size < image_size:
                os.ftruncate(self.fd, image_size)
            return
        if self.output.seek(0, 2) < image_size:
            self.output.seek(image_size - 1)
            self.output.write(b"\0")


def _set_bits(bitmap: bytearray, start: int, count: int) -> None:
    end = start + count
    while start < end and start & 7:
        bitmap[start >> 3] |= 1 << (start & 7)
        start += 1
    full = end & ~7
    if full > start:
        bitmap[start >> 3: full >> 3] = b"\xff" * ((full - start) >> 3)
        start = full
    while start < end:
        bitmap[start >> 3] |= 1 << (start & 7)
        start += 1


def _popcount(data: bytes | bytearray) -> int:
    return int.from_bytes(data, "little").bit_count()


def superblock(layout: Layout, free_blocks: int, free_inodes: int, group: int) -> bytes:
    """The 1024-byte superblock (or the backup copy held by ``group``), checksummed."""
    groups = layout.group_count
    flex = max(4, (groups - 1).bit_length())
    epoch = layout.epoch & 0xFFFFFFFF
    packed = pack_fields(EXT4_SUPER_BLOCK, SUPER_BLOCK_FIELDS, {
        "inodes_count": layout.inodes_count,
        "blocks_count_lo": layout.blocks_count & 0xFFFFFFFF,
        "blocks_count_hi": layout.blocks_count >> 32,
        "free_blocks_count_lo": free_blocks & 0xFFFFFFFF,
        "free_blocks_count_hi": free_blocks >> 32,
        "free_inodes_count": free_inodes,
        "log_block_size": 2, "log_cluster_size": 2,  # 1024 << 2
        "blocks_per_group": BLOCKS_PER_GROUP, "clusters_per_group": BLOCKS_PER_GROUP,
        "inodes_per_group": layout.inodes_per_group,
        "wtime": epoch, "lastcheck": epoch, "mkfs_time": epoch,  # never the wall clock
        "max_mnt_count": 0xFFFF, "magic": EXT4_SUPER_MAGIC,
        "state": 1, "errors": 1,  # clean; on errors continue
        "rev_level": 1, "first_ino": FIRST_INO, "inode_size": INODE_SIZE,
        "block_group_nr": group,
        "feature_compat": FEATURE_COMPAT, "feature_incompat": FEATURE_INCOMPAT,
        "feature_ro_compat": FEATURE_RO_COMPAT,
        "uuid": layout.uuid, "volume_name": layout.label,
        "hash_seed": layout.hash_seed, "def_hash_version": layout.hash_version,
        "desc_size": DESC_SIZE, "default_mount_opts": DEFAULT_MOUNT_OPTS,
        "min_extra_isize": EXTRA_ISIZE, "want_extra_isize": EXTRA_ISIZE,
        "flags": SB_FLAGS_UNSIGNED_HASH,  # explicit, never the host's char signedness
        "log_groups_per_flex": flex, "checksum_type": 1,  # crc32c
    })
    sb = bytearray(1024)
    sb[: len(packed)] = packed
    if layout.epoch >> 32:  # s_wtime_hi, s_mkfs_time_hi, s_lastcheck_hi (0x274-0x277)
        high = (layout.epoch >> 32) & 0xFF
        sb[0x274], sb[0x276], sb[0x277] = high, high, high
    sb[SB_CHECKSUM_OFFSET:] = crc32c_raw(0xFFFFFFFF, sb[:SB_CHECKSUM_OFFSET]).to_bytes(4, "little")
    return bytes(sb)


def encode_inode(node: InodePlan, epoch: int, fs_seed: int) -> bytes:
    """The 256-byte on-disk inode, checksummed (times clamped to the epoch)."""
    entry = node.entry
    seconds, extra = encode_time(min(entry.mtime_ns, epoch * 1_000_000_000))
    sectors = node.blocks * (BLOCK_SIZE // 512)
    if entry.uid >> 32 or entry.gid >> 32:
        raise ImageError(f"{entry.display()}: uid/gid {entry.uid}:{entry.gid} beyond 32 bits")
    raw = bytearray(INODE_SIZE)
    EXT4_INODE.pack_into(
        raw, 0,
        entry.st_mode, entry.uid & 0xFFFF, node.size & 0xFFFFFFFF, seconds, seconds, seconds, 0,
        entry.gid & 0xFFFF, node.links, sectors & 0xFFFFFFFF, node.flags, 0, node.i_block,
        0, node.xattr_block & 0xFFFFFFFF, node.size >> 32, 0,
        sectors >> 32, node.xattr_block >> 32, entry.uid >> 16, entry.gid >> 16, 0, 0,
        EXTRA_ISIZE, 0, extra, extra, extra, seconds, extra, 0, 0,
    )
    if node.ibody_xattrs:
        raw[128 + EXTRA_ISIZE:] = node.ibody_xattrs
    return _seal_inode(raw, node.ino, fs_seed)


def _seal_inode(raw: bytearray, ino: int, fs_seed: int) -> bytes:
    crc = crc32c_raw(inode_checksum_seed(fs_seed, ino), raw)
    raw[124:126] = (crc & 0xFFFF).to_bytes(2, "little")
    raw[130:132] = (crc >> 16).to_bytes(2, "little")
    return bytes(raw)


def seal_dir_block(block: DirBlock, inode_seed: int) -> bytes:
    """A directory block with its dirent-tail or dx-tail checksum filled in."""
    data = bytearray(block.block())
    if block.kind == KIND_LEAF:
        crc = crc32c_raw(inode_seed, data[:LEAF_CSUM_AT - 8])
        data[LEAF_CSUM_AT:] = crc.to_bytes(4, "little")
        return bytes(data)
    count_offset, limit = (32, DX_ROOT_LIMIT) if block.kind == KIND_DX_ROOT else (8,
                                                                                  DX_NODE_LIMIT)
    assert block.kind in (KIND_DX_ROOT, KIND_DX_NODE)
    tail = count_offset + limit * 8
    crc = crc32c_raw(inode_seed, data[:count_offset + block.count * 8])
    crc = crc32c_raw(crc, data[tail:tail + 4] + b"\0\0\0\0")
    data[tail + 4: tail + 8] = crc.to_bytes(4, "little")
    return bytes(data)


def write_image(layout: Layout, output: BinaryIO, cache: dict[int, bytes]) -> None:
    """Write the planned image to ``output`` (seekable, initially empty)."""
    fs_seed = fs_checksum_seed(layout.uuid)
    sink = _Sink(output)
    groups = layout.group_count
    per_group = layout.inodes_per_group

    # Block bitmap of the whole filesystem, one block per group, padding bits set.
    block_bitmap = bytearray(groups * BLOCK_SIZE)
    for start, count in layout.used_runs:
        _set_bits(block_bitmap, start, count)
    free_per_group = []
    for g in range(groups):
        in_group = min(BLOCKS_PER_GROUP, layout.blocks_count - g * BLOCKS_PER_GROUP)
        used = _popcount(block_bitmap[g * BLOCK_SIZE: (g + 1) * BLOCK_SIZE])
        free_per_group.append(in_group - used)
    tail_bits = groups * BLOCKS_PER_GROUP - layout.blocks_count
    if tail_bits:
        _set_bits(block_bitmap, layout.blocks_count, tail_bits)

    descriptors = bytearray(layout.gdt_blocks * BLOCK_SIZE)
    free_inodes_total = 0
    for g, group in enumerate(layout.groups):
        bb = bytes(block_bitmap[g * BLOCK_SIZE: (g + 1) * BLOCK_SIZE])
        ib = bytearray(BLOCK_SIZE)
        _set_bits(ib, 0, group.used_inodes)
        _set_bits(ib, per_group, BLOCKS_PER_GROUP - per_group)
        bb_csum = crc32c_raw(fs_seed, bb[: BLOCKS_PER_GROUP // 8])
        ib_csum = crc32c_raw(fs_seed, ib[: per_group // 8])
        free_inodes = per_group - group.used_inodes
        free_inodes_total += free_inodes
        unused = per_group - group.used_inodes
        free_blocks = free_per_group[g]
        offset = g * DESC_SIZE
        descriptors[offset: offset + DESC_SIZE] = pack_fields(
            EXT4_GROUP_DESC, GROUP_DESC_FIELDS, {
                "block_bitmap_lo": group.block_bitmap & 0xFFFFFFFF,
                "block_bitmap_hi": group.block_bitmap >> 32,
                "inode_bitmap_lo": group.inode_bitmap & 0xFFFFFFFF,
                "inode_bitmap_hi": group.inode_bitmap >> 32,
                "inode_table_lo": group.inode_table & 0xFFFFFFFF,
                "inode_table_hi": group.inode_table >> 32,
                "free_blocks_count_lo": free_blocks & 0xFFFF,
                "free_blocks_count_hi": free_blocks >> 16,
                "free_inodes_count_lo": free_inodes & 0xFFFF,
                "free_inodes_count_hi": free_inodes >> 16,
                "used_dirs_count_lo": group.used_dirs & 0xFFFF,
                "used_dirs_count_hi": group.used_dirs >> 16,
                "flags": BG_INODE_ZEROED,
                "block_bitmap_csum_lo": bb_csum & 0xFFFF,
                "block_bitmap_csum_hi": bb_csum >> 16,
                "inode_bitmap_csum_lo": ib_csum & 0xFFFF,
                "inode_bitmap_csum_hi": ib_csum >> 16,
                "itable_unused_lo": unused & 0xFFFF, "itable_unused_hi": unused >> 16,
            })
        crc = crc32c_raw(fs_seed, g.to_bytes(4, "little"))
        crc = crc32c_raw(crc, descriptors[offset: offset + DESC_SIZE]) & 0xFFFF
        descriptors[offset + GD_CHECKSUM_OFFSET: offset + GD_CHECKSUM_OFFSET + 2] = \
            crc.to_bytes(2, "little")
        sink.put(group.block_bitmap * BLOCK_SIZE, bb)
        sink.put(group.inode_bitmap * BLOCK_SIZE, bytes(ib))

    free_blocks_total = sum(free_per_group)
    for g in range(groups):
        if not has_super_backup(g):
            continue
        sb = superblock(layout, free_blocks_total, free_inodes_total, g)
        start = g * BLOCKS_PER_GROUP * BLOCK_SIZE
        if g == 0:
            sink.put(0, bytes(SUPERBLOCK_OFFSET) + sb + bytes(BLOCK_SIZE - 2048))
        else:
            sink.put(start, sb + bytes(BLOCK_SIZE - 1024))
        sink.put(start + BLOCK_SIZE, bytes(descriptors))

    _write_inode_tables(layout, sink, fs_seed)
    _write_small_blocks(layout, sink, fs_seed)
    _write_files(layout, sink, cache)
    sink.finish(layout.image_size)


def _write_files(layout: Layout, sink: _Sink, cache: dict[int, bytes]) -> None:
    """File data in inode order: kept from the scan, read whole, or streamed."""
    with ContentReader() as reader:
        for ino, content, extents in layout.files:
            cached = cache.pop(ino, None)
            if cached is None and extents and content.size <= WHOLE_READ_MAX:
                cached = reader.read(content, f"inode {ino}")
            _write_file(sink, content, extents, cached)


def _write_inode_tables(layout: Layout, sink: _Sink, fs_seed: int) -> None:
    per_group = layout.inodes_per_group
    plans = {node.ino: node for node in layout.inodes}
    empty = bytearray(INODE_SIZE)
    empty[128:130] = EXTRA_ISIZE.to_bytes(2, "little")
    for g, group in enumerate(layout.groups):
        if not group.used_inodes:
            continue  # all zero: the output starts empty
        table = bytearray(group.used_inodes * INODE_SIZE)
        first = g * per_group + 1
        for i in range(group.used_inodes):
            ino = first + i
            node = plans.get(ino)
            if node is not None:
                raw = encode_inode(node, layout.epoch, fs_seed)
            else:  # reserved inodes 1 and 3-10: empty, but with a valid checksum
                raw = _seal_inode(bytearray(empty), ino, fs_seed)
            table[i * INODE_SIZE: (i + 1) * INODE_SIZE] = raw
        sink.put(group.inode_table * BLOCK_SIZE, table)  # not reused: no copy


def _write_small_blocks(layout: Layout, sink: _Sink, fs_seed: int) -> None:
    """Directory, extent-tree, xattr and symlink blocks, each sealed as it is written
    (in block order, so that no more than the sink's buffer is held)."""
    seeds: dict[int, int] = {}

    def seed_of(ino: int) -> int:
        if ino not in seeds:
            seeds[ino] = inode_checksum_seed(fs_seed, ino)
        return seeds[ino]

    order = sorted([(p, 0, i) for i, (p, _, _) in enumerate(layout.dir_blocks)]
                   + [(p, 1, i) for i, (p, _, _) in enumerate(layout.tree_blocks)]
                   + [(p, 2, i) for i, (p, _) in enumerate(layout.xattr_blocks)]
                   + [(p, 3, i) for i, (p, _) in enumerate(layout.raw_blocks)])
    for physical, kind, index in order:
        if kind == 0:
            _, ino, block = layout.dir_blocks[index]
            sealed = seal_dir_block(block, seed_of(ino))
        elif kind == 1:
            _, ino, node = layout.tree_blocks[index]
            crc = crc32c_raw(seed_of(ino), node[:TREE_CSUM_AT])
            sealed = node[:TREE_CSUM_AT] + crc.to_bytes(4, "little")
        elif kind == 2:
            xblock = layout.xattr_blocks[index][1]
            crc = crc32c_raw(fs_seed, physical.to_bytes(8, "little"))
            crc = crc32c_raw(crc, xblock)
            sealed = (xblock[:XATTR_CSUM_AT] + crc.to_bytes(4, "little")
                      + xblock[XATTR_CSUM_AT + 4:])
        else:
            sealed = layout.raw_blocks[index][1]
        sink.put(physical * BLOCK_SIZE, sealed)


def _write_file(sink: _Sink, content: Content, extents: tuple[Extent, ...],
                cached: bytes | None) -> None:
    if not extents:
        return
    if cached is not None:
        view = memoryview(cached)
        for ext in extents:
            piece = view[ext.logical * BLOCK_SIZE: (ext.logical + ext.length) * BLOCK_SIZE]
            _put_blocks(sink, ext.physical, ext.length, piece)
        return
    index = 0
    position = 0  # in blocks
    for chunk in aligned_chunks(content):
        if index == len(extents):
            break  # the rest is holes
        view = memoryview(chunk)
        end = position + -(-len(chunk) // BLOCK_SIZE)
        while index < len(extents) and extents[index].logical < end:
            ext = extents[index]
            first = max(ext.logical, position)
            last = min(ext.logical + ext.length, end)
            piece = view[(first - position) * BLOCK_SIZE: (last - position) * BLOCK_SIZE]
            _put_blocks(sink, ext.physical + first - ext.logical, last - first, piece)
            if ext.logical + ext.length > end:
                break
            index += 1
        position = end
    sink.flush()  # the chunk buffers are reused by nobody, but keep memory bounded


def _put_blocks(sink: _Sink, physical: int, count: int, piece: memoryview) -> None:
    sink.put(physical * BLOCK_SIZE, piece)
    short = count * BLOCK_SIZE - len(piece)
    if short:
        sink.put(physical * BLOCK_SIZE + len(piece), bytes(short))
