"""The ext4 block allocator: group geometry, the smallest block count that fits, and the
placement of metadata, directories, xattr blocks, symlinks, file data and extent trees,
upward from block 0, stepping over superblock backups. The result is the :class:`Layout`
the serialiser writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from reprobuild.images.ext4.directory import (
    DirBlock,
    DiskXattr,
    xattr_block,
)
from reprobuild.images.ext4.ondisk import (
    BLOCK_SIZE,
    BLOCKS_PER_GROUP,
    DESC_SIZE,
    EXT4_EXTENT,
    EXT4_EXTENT_HEADER,
    EXT4_EXTENT_IDX,
    EXTENT_MAGIC,
    EXTENTS_FL,
    EXTENTS_PER_BLOCK,
    FIRST_INO,
    INDEX_FL,
    INODE_SIZE,
    MAX_EXTENT_LEN,
    MAX_LINKS,
    encode_device,
    has_super_backup,
)
from reprobuild.images.ext4.prepare import Needs, Prepared
from reprobuild.trees.tree import Content, Entry, EntryType


class Extent(NamedTuple):
    logical: int
    length: int
    physical: int



@dataclass(frozen=True, slots=True)
class InodePlan:
    ino: int
    entry: Entry  # the primary entry: mode, owner, time, xattrs
    links: int
    flags: int
    size: int
    i_block: bytes  # 60 bytes
    blocks: int  # 4 KiB blocks charged to the inode (data, extent tree, xattr block)
    xattr_block: int
    ibody_xattrs: bytes



@dataclass(frozen=True)
class GroupPlan:
    block_bitmap: int
    inode_bitmap: int
    inode_table: int
    used_dirs: int
    used_inodes: int



@dataclass(frozen=True)
class Layout:
    """Everything about the image except file bytes and checksums."""

    blocks_count: int
    inodes_per_group: int
    inode_table_blocks: int
    gdt_blocks: int
    groups: tuple[GroupPlan, ...]
    uuid: bytes
    hash_seed: bytes
    hash_version: int
    label: bytes
    epoch: int
    image_size: int
    inodes: tuple[InodePlan, ...]
    dir_blocks: tuple[tuple[int, int, DirBlock], ...]  # (physical, ino, block)
    raw_blocks: tuple[tuple[int, bytes], ...]  # slow symlink targets
    xattr_blocks: tuple[tuple[int, bytes], ...]  # without checksum
    tree_blocks: tuple[tuple[int, int, bytes], ...]  # (physical, ino, extent node)
    files: tuple[tuple[int, Content, tuple[Extent, ...]], ...]  # (ino, content, extents)
    used_runs: tuple[tuple[int, int], ...]  # allocated (start, count), sorted

    @property
    def group_count(self) -> int:
        return len(self.groups)

    @property
    def inodes_count(self) -> int:
        return self.inodes_per_group * len(self.groups)

    @property
    def last_ino(self) -> int:
        return self.inodes[-1].ino if self.inodes else FIRST_INO


class NoSpace(Exception):
    def __init__(self, shortage: int) -> None:
        super().__init__(f"{shortage} blocks short")
        self.shortage = shortage


class Allocator:
    """Hands out blocks upward from a cursor, stepping over superblock backups.

    It never fails: blocks past the end are handed out too, and the caller compares
    :attr:`cursor` with the block count afterwards to learn the shortage exactly.
    """

    def __init__(self, reserved: list[tuple[int, int]]) -> None:
        self.reserved = reserved  # sorted (start, count)
        self.next_reserved = 0
        self.cursor = 0
        self.used: list[tuple[int, int]] = list(reserved)
        self.limit = 0  # blocks [cursor, limit) hold no reserved block (0: not known)

    def allocate(self, count: int, *, contiguous: bool = False) -> list[tuple[int, int]]:
        cursor = self.cursor
        if count > 0 and cursor + count <= self.limit:  # the common case: one run
            self.cursor = cursor + count
            self._mark(cursor, count)
            return [(cursor, count)]
        runs = self._allocate(count, contiguous=contiguous)
        self._set_limit()
        return runs

    def _mark(self, start: int, count: int) -> None:
        used = self.used
        last_start, last_count = used[-1] if used else (-1, 0)
        if last_start + last_count == start:
            used[-1] = (last_start, last_count + count)
        else:
            used.append((start, count))

    def _set_limit(self) -> None:
        reserved, cursor = self.reserved, self.cursor
        while self.next_reserved < len(reserved) and \
                cursor >= sum(reserved[self.next_reserved]):
            self.next_reserved += 1
        if self.next_reserved == len(reserved):
            self.limit = 1 << 62
        else:
            start = reserved[self.next_reserved][0]
            self.limit = start if cursor < start else 0

    def _allocate(self, count: int, *, contiguous: bool) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        reserved = self.reserved
        while count:
            while self.next_reserved < len(reserved):
                start, n = reserved[self.next_reserved]
                if self.cursor >= start + n:
                    self.next_reserved += 1
                elif self.cursor >= start:
                    self.cursor = start + n
                    self.next_reserved += 1
                else:
                    break
            if self.next_reserved < len(reserved):
                room = reserved[self.next_reserved][0] - self.cursor
            else:
                room = count
            if contiguous and room < count:
                self.cursor += room
                continue
            take = min(room, count)
            runs.append((self.cursor, take))
            self._mark(self.cursor, take)
            self.cursor += take
            count -= take
        return runs

    def merged_used(self) -> tuple[tuple[int, int], ...]:
        out: list[tuple[int, int]] = []
        for start, count in sorted(self.used):
            if out and out[-1][0] + out[-1][1] >= start:
                s, c = out[-1]
                out[-1] = (s, max(c, start + count - s))
            else:
                out.append((start, count))
        return tuple(out)


def map_runs(alloc: Allocator, runs: tuple[tuple[int, int], ...]) -> list[Extent]:
    if len(runs) == 1 and runs[0][1] <= MAX_EXTENT_LEN:  # most files: one extent
        logical, count = runs[0]
        allocated = alloc.allocate(count)
        if len(allocated) == 1:
            return [Extent(logical, count, allocated[0][0])]
        return _extents(logical, allocated)
    extents: list[Extent] = []
    for logical, count in runs:
        _add_extents(extents, logical, alloc.allocate(count))
    return extents


def _extents(logical: int, allocated: list[tuple[int, int]]) -> list[Extent]:
    """The extents of one run of ``logical`` blocks given its allocated pieces."""
    extents: list[Extent] = []
    _add_extents(extents, logical, allocated)
    return extents


def _add_extents(extents: list[Extent], logical: int, allocated: list[tuple[int, int]]
                 ) -> None:
    """Append the extents of one run of ``logical`` blocks given its allocated pieces,
    merging with the last extent where they are contiguous on both sides."""
    for physical, n in allocated:
        while n:
            take = min(n, MAX_EXTENT_LEN)
            prev = extents[-1] if extents else None
            if (prev is not None and prev.logical + prev.length == logical
                    and prev.physical + prev.length == physical
                    and prev.length + take <= MAX_EXTENT_LEN):
                extents[-1] = Extent(prev.logical, prev.length + take, prev.physical)
            else:
                extents.append(Extent(logical, take, physical))
            logical += take
            physical += take
            n -= take


def extent_tree(alloc: Allocator, extents: list[Extent]
                 ) -> tuple[bytes, list[tuple[int, bytes]]]:
    """(i_block bytes, [(physical, node block)]) for an inode's extents."""
    entries = [EXT4_EXTENT.pack(e.logical, e.length, e.physical >> 32, e.physical & 0xFFFFFFFF)
               for e in extents]
    firsts = [e.logical for e in extents]
    depth = 0
    nodes: list[tuple[int, bytes]] = []
    while len(entries) > 4:
        groups = [range(i, min(i + EXTENTS_PER_BLOCK, len(entries)))
                  for i in range(0, len(entries), EXTENTS_PER_BLOCK)]
        next_entries, next_firsts = [], []
        for part in groups:
            (physical, _), = alloc.allocate(1)
            block = bytearray(BLOCK_SIZE)
            EXT4_EXTENT_HEADER.pack_into(block, 0, EXTENT_MAGIC, len(part), EXTENTS_PER_BLOCK,
                                         depth, 0)
            block[12: 12 + 12 * len(part)] = b"".join(entries[i] for i in part)
            nodes.append((physical, bytes(block)))
            next_entries.append(EXT4_EXTENT_IDX.pack(firsts[part[0]], physical & 0xFFFFFFFF,
                                                     physical >> 32, 0))
            next_firsts.append(firsts[part[0]])
        entries, firsts = next_entries, next_firsts
        depth += 1
    head = EXT4_EXTENT_HEADER.pack(EXTENT_MAGIC, len(entries), 4, depth, 0)
    return (head + b"".join(entries)).ljust(60, b"\0"), nodes



def geometry(blocks_count: int, inodes: int) -> tuple[int, int, int, int]:
    """(groups, inodes_per_group, inode table blocks per group, gdt blocks)."""
    groups = -(-blocks_count // BLOCKS_PER_GROUP)
    per_group = -(-inodes // groups)
    per_group = max(16, -(-per_group // 16) * 16)
    table_blocks = per_group * INODE_SIZE // BLOCK_SIZE
    gdt_blocks = -(-groups * DESC_SIZE // BLOCK_SIZE)
    return groups, per_group, table_blocks, gdt_blocks


def overhead(blocks_count: int, inodes: int) -> int:
    groups, _, table_blocks, gdt_blocks = geometry(blocks_count, inodes)
    backups = sum(1 for g in range(groups) if has_super_backup(g))
    return backups * (1 + gdt_blocks) + groups * (2 + table_blocks)


def minimum_blocks(needs: Needs) -> int:
    """The smallest block count whose metadata plus ``needs`` fit (no spare blocks)."""
    min_groups = -(-needs.inodes // BLOCKS_PER_GROUP)
    total = needs.data_blocks + 64
    for _ in range(64):
        want = needs.data_blocks + overhead(total, needs.inodes)
        want = max(want, (min_groups - 1) * BLOCKS_PER_GROUP + 1)
        if want == total:
            break
        total = want
    groups, _, _, gdt_blocks = geometry(total, needs.inodes)
    last = groups - 1
    if has_super_backup(last) and total - last * BLOCKS_PER_GROUP < 2 + gdt_blocks:
        total = last * BLOCKS_PER_GROUP + 2 + gdt_blocks
    return total



@dataclass
class _Placed:
    """Where allocation put each inode's blocks (in allocation order)."""

    extents: dict[int, list[Extent]]
    i_blocks: dict[int, bytes]
    dir_blocks: list[tuple[int, int, DirBlock]]
    xattr_at: dict[tuple[DiskXattr, ...], int]
    xattr_blocks: list[tuple[int, bytes]]
    raw_blocks: list[tuple[int, bytes]]
    files: list[tuple[int, Content, tuple[Extent, ...]]]
    tree_blocks: list[tuple[int, int, bytes]]
    charged: dict[int, int]  # blocks of data and extent tree per inode


def allocate(blocks_count: int, needs: Needs, prepared: Prepared,
             image_size: int | None) -> Layout:
    """Place everything for ``blocks_count`` blocks; raises NoSpace when it does not fit."""
    groups, per_group, table_blocks, gdt_blocks = geometry(blocks_count, needs.inodes)
    if per_group > BLOCKS_PER_GROUP:
        raise NoSpace((-(-needs.inodes // BLOCKS_PER_GROUP) - groups) * BLOCKS_PER_GROUP)
    reserved = [(g * BLOCKS_PER_GROUP, 1 + gdt_blocks) for g in range(groups)
                if has_super_backup(g)]
    alloc = Allocator(reserved)
    block_bitmaps = [alloc.allocate(1)[0][0] for _ in range(groups)]
    inode_bitmaps = [alloc.allocate(1)[0][0] for _ in range(groups)]
    tables = [alloc.allocate(table_blocks, contiguous=True)[0][0] for _ in range(groups)]
    placed = _place_contents(alloc, prepared)
    if alloc.cursor > blocks_count:
        raise NoSpace(alloc.cursor - blocks_count)
    nodes = prepared.numbering.nodes
    group_plans = []
    dir_inos = sorted(ino for ino in nodes if nodes[ino].entry.type is EntryType.DIRECTORY)
    last_ino = max(nodes)
    for g in range(groups):
        first = g * per_group + 1
        used_inodes = max(0, min(per_group, last_ino - first + 1))
        used_dirs = sum(1 for ino in dir_inos if first <= ino < first + per_group)
        group_plans.append(GroupPlan(block_bitmaps[g], inode_bitmaps[g], tables[g],
                                     used_dirs, used_inodes))
    return Layout(
        blocks_count=blocks_count, inodes_per_group=per_group, inode_table_blocks=table_blocks,
        gdt_blocks=gdt_blocks, groups=tuple(group_plans), uuid=prepared.uuid,
        hash_seed=prepared.hash_seed, hash_version=prepared.hash_version,
        label=prepared.label, epoch=prepared.epoch,
        image_size=blocks_count * BLOCK_SIZE if image_size is None else image_size,
        inodes=tuple(_inode_plans(prepared, placed)), dir_blocks=tuple(placed.dir_blocks),
        raw_blocks=tuple(placed.raw_blocks), xattr_blocks=tuple(placed.xattr_blocks),
        tree_blocks=tuple(placed.tree_blocks), files=tuple(placed.files),
        used_runs=alloc.merged_used(),
    )


def _place_contents(alloc: Allocator, prepared: Prepared) -> _Placed:
    """Directories, xattr blocks, slow symlinks, file data, then extent trees."""
    nodes, dirs = prepared.numbering.nodes, prepared.dirs
    placed = _Placed({}, {}, [], {}, [], [], [], [], {})
    extents = placed.extents
    for ino in sorted(dirs):
        blocks, _ = dirs[ino]
        extents[ino] = map_runs(alloc, ((0, len(blocks)),))
        for ext in extents[ino]:
            for i in range(ext.length):
                placed.dir_blocks.append((ext.physical + i, ino, blocks[ext.logical + i]))
    for ino in sorted(prepared.block_xattrs):
        items = prepared.block_xattrs[ino]
        if items in placed.xattr_at:
            continue
        (physical, _), = alloc.allocate(1)
        placed.xattr_at[items] = physical
        placed.xattr_blocks.append((physical, xattr_block(list(items), prepared.shared[items])))
    for ino in sorted(prepared.slow_links):
        extents[ino] = map_runs(alloc, ((0, 1),))
        target = nodes[ino].entry.target or b""
        placed.raw_blocks.append((extents[ino][0].physical, target.ljust(BLOCK_SIZE, b"\0")))
    scans = prepared.scans
    for ino in sorted(scans):
        found = map_runs(alloc, scans[ino].runs)
        extents[ino] = found
        content = nodes[ino].entry.content
        assert content is not None
        placed.files.append((ino, content, tuple(found)))
    charged = placed.charged
    for ino in sorted(extents):
        found = extents[ino]
        i_block, tree_nodes = extent_tree(alloc, found)
        placed.i_blocks[ino] = i_block
        placed.tree_blocks.extend((p, ino, b) for p, b in tree_nodes)
        data = found[0].length if len(found) == 1 else sum(e.length for e in found)
        charged[ino] = data + len(tree_nodes)
    extents.clear()  # the files keep theirs; the rest is in i_blocks and charged
    return placed


def _inode_plans(prepared: Prepared, placed: _Placed) -> list[InodePlan]:
    nodes, i_blocks = prepared.numbering.nodes, placed.i_blocks
    inodes: list[InodePlan] = []
    for ino in sorted(nodes):
        node = nodes[ino]
        entry = node.entry
        flags = 0
        size = 0
        charged = placed.charged.get(ino, 0)
        links = node.links
        if entry.type is EntryType.DIRECTORY:
            blocks, htree = prepared.dirs[ino]
            flags = EXTENTS_FL | (INDEX_FL if htree else 0)
            size = len(blocks) * BLOCK_SIZE
            links = 2 + node.subdirs
            if links > MAX_LINKS:
                links = 1  # dir_nlink: "many"
            i_block = i_blocks[ino]
        elif entry.type is EntryType.REGULAR:
            flags = EXTENTS_FL
            size = entry.size
            i_block = i_blocks[ino]
        elif entry.type is EntryType.SYMLINK:
            target = entry.target or b""
            size = len(target)
            if ino in prepared.slow_links:
                flags = EXTENTS_FL
                i_block = i_blocks[ino]
            else:
                i_block = target.ljust(60, b"\0")
        elif entry.type in (EntryType.CHAR, EntryType.BLOCK):
            b0, b1 = encode_device(entry.rdev_major, entry.rdev_minor)
            i_block = (b0.to_bytes(4, "little") + b1.to_bytes(4, "little")).ljust(60, b"\0")
        else:
            i_block = bytes(60)
        xblock = 0
        if ino in prepared.block_xattrs:
            xblock = placed.xattr_at[prepared.block_xattrs[ino]]
            charged += 1
        inodes.append(InodePlan(ino, entry, links, flags, size, i_block, charged, xblock,
                                prepared.ibody.get(ino, b"")))
    return inodes
