"""Plan an uncompressed EROFS image: inodes, nids, xattrs, directory blocks, data blocks.

The plan is pure data computed from the tree alone (no file bytes are read), so it can be
tested without serialising anything. Layout, from the start of the image:

* block 0: 1024 bytes of nothing, the superblock at 1024, then the metadata area begins
  (``meta_blkaddr = xattr_blkaddr = 0``, as mkfs.erofs does), so nid = offset / 32;
* the root inode first (its nid must fit the superblock's 16-bit ``root_nid``), then the
  shared xattr entries, then every other inode in canonical tree order, each with its
  inline xattrs and, for FLAT_INLINE, its tail. Records are packed best-fit into the
  metadata blocks and one that fits a block never crosses a block boundary (the kernel
  refuses inline data that does);
* the data area: every inode's whole blocks (files, directories, long symlinks), in the
  same canonical order.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass

from reprobuild.errors import ImageError
from reprobuild.images.erofs.compress import COMPR_CFGS, COMPRESSED_FULL, index_area_size
from reprobuild.images.erofs.ondisk import (
    BLOCK_SIZE,
    EROFS_DIRENT,
    EROFS_INODE_COMPACT,
    EROFS_INODE_EXTENDED,
    EROFS_SUPER_BLOCK,
    EROFS_SUPER_OFFSET,
    EROFS_XATTR_ENTRY,
    EROFS_XATTR_IBODY_HEADER,
    FILE_TYPE,
    INODE_FLAT_INLINE,
    INODE_FLAT_PLAIN,
    ISLOT_SIZE,
    NAME_LEN,
    NULL_ADDR,
    split_xattr_name,
    xattr_align,
)
from reprobuild.trees.tree import Entry, EntryType, Tree

XattrKey = tuple[int, bytes, bytes]  # (name index, name suffix, value)
DirentPlan = tuple[bytes, int, int]  # (name, inode index, EROFS file type)

SHARE_THRESHOLD = 2
"""An xattr (name and value) carried by at least this many inodes is stored once, shared."""



@dataclass(frozen=True, slots=True)
class InodePlan:
    """Where and how one inode is stored. ``index`` is its canonical position (ino - 1)."""

    index: int
    entry: Entry  # the primary entry: the inode's metadata and content
    nid: int
    extended: bool
    datalayout: int
    size: int
    nlink: int
    xattr_ibody: bytes
    blkaddr: int  # first data block; NULL_ADDR when all data is inline, 0 when empty
    nblocks: int  # data blocks in the data area (the last one zero-padded)
    inline_size: int  # tail bytes stored right after the inode and its xattrs
    index_size: int = 0  # compressed files: map header and lcluster indexes after xattrs

    @property
    def record_size(self) -> int:
        header = EROFS_INODE_EXTENDED.size if self.extended else EROFS_INODE_COMPACT.size
        return header + len(self.xattr_ibody) + self.inline_size + self.index_size

    @property
    def offset(self) -> int:
        return self.nid * ISLOT_SIZE


@dataclass(frozen=True, slots=True)
class Layout:
    """The whole image as data: everything the serialiser needs besides file bytes."""

    epoch: int
    inodes: tuple[InodePlan, ...]  # by index; inodes[0] is the root
    directories: dict[int, tuple[tuple[DirentPlan, ...], ...]]  # inode index -> blocks
    shared_xattrs: tuple[tuple[int, bytes], ...]  # (offset, entry); id = offset / 4
    meta_size: int  # bytes from the image start to the end of the metadata area
    data_blkaddr: int  # first block of the data area
    blocks: int  # total image blocks
    # Per metadata block, the index of the last inode whose record lies in it; the
    # inode count for block 0 (the superblock) and blocks with compressed inodes, which
    # are complete only when everything else is written.
    meta_last_inode: tuple[int, ...] = ()

    @property
    def root_nid(self) -> int:
        return self.inodes[0].nid


def dir_blocks(entries: list[DirentPlan]) -> tuple[tuple[DirentPlan, ...], ...]:
    """Split name-sorted dirents into blocks: dirents then names, filled greedily.

    Names sort bytewise across all blocks, so the kernel's binary search over the first
    name of each block and then within a block finds every entry.
    """
    blocks: list[tuple[DirentPlan, ...]] = []
    current: list[DirentPlan] = []
    used = 0
    for dirent in entries:
        need = EROFS_DIRENT.size + len(dirent[0])
        if current and used + need > BLOCK_SIZE:
            blocks.append(tuple(current))
            current, used = [], 0
        current.append(dirent)
        used += need
    blocks.append(tuple(current))
    return tuple(blocks)


def dir_size(blocks: tuple[tuple[DirentPlan, ...], ...]) -> int:
    """i_size of a directory: whole blocks, then the bytes used in the last one."""
    last = sum(EROFS_DIRENT.size + len(name) for name, _, _ in blocks[-1])
    return (len(blocks) - 1) * BLOCK_SIZE + last


def encode_xattr(key: XattrKey) -> bytes:
    index, suffix, value = key
    raw = EROFS_XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
    return raw + b"\0" * (xattr_align(len(raw)) - len(raw))


class _MetaAllocator:
    """Best-fit placement of metadata records in 32-byte slots.

    Every partly used block is a gap, kept in buckets by its free slot count (a bitmask
    says which buckets hold gaps). A record up to a block long takes the smallest gap it
    fits, lowest offset first, else a new block; so it never crosses a block boundary.
    A longer record (huge inline xattrs) starts a block of its own.
    """

    _SLOTS = BLOCK_SIZE // ISLOT_SIZE

    def __init__(self, start: int) -> None:
        self.end = -(-start // BLOCK_SIZE) * BLOCK_SIZE  # first block not yet in use
        self.buckets: list[list[int]] = [[] for _ in range(self._SLOTS + 1)]
        self.mask = 0
        self._gap(-(-start // ISLOT_SIZE) * ISLOT_SIZE, self.end)

    def _gap(self, start: int, end: int) -> None:
        slots = (end - start) // ISLOT_SIZE
        if slots:
            heapq.heappush(self.buckets[slots], start)
            self.mask |= 1 << slots

    def place(self, size: int) -> int:
        slots = -(-size // ISLOT_SIZE)
        block_slots = self._SLOTS
        if slots > block_slots:
            at = self.end
            self.end += -(-size // BLOCK_SIZE) * BLOCK_SIZE
            self._gap(at + slots * ISLOT_SIZE, self.end)
            return at
        mask = self.mask
        fitting = mask >> slots
        if not fitting:  # no gap fits: the record starts a new block
            at = self.end
            self.end += BLOCK_SIZE
            rest = block_slots - slots
        else:
            bucket = slots + (fitting & -fitting).bit_length() - 1
            gaps = self.buckets[bucket]
            at = heapq.heappop(gaps)
            if not gaps:
                mask &= ~(1 << bucket)
            rest = bucket - slots
        if rest:
            heapq.heappush(self.buckets[rest], at + slots * ISLOT_SIZE)
            mask |= 1 << rest
        self.mask = mask
        return at


def plan(tree: Tree, epoch: int, *, compress: bool = False) -> Layout:
    """Lay out ``tree`` as an EROFS image built at ``epoch``.

    With ``compress``, regular files longer than a block become COMPRESSED_FULL inodes
    whose data blocks are not allocated here: the writer appends them after ``blocks``.
    """
    index_of, primaries, nlink = _number(tree)
    directories, sizes = _directories_and_sizes(tree, primaries, index_of)
    xattrs = _Xattrs(primaries)
    shapes = _shapes(primaries, sizes, nlink, xattrs, epoch * 1_000_000_000,
                     compress=compress)

    compact, extended_size = EROFS_INODE_COMPACT.size, EROFS_INODE_EXTENDED.size
    keys, ibody_size = xattrs.keys, xattrs.ibody_size
    records = [(extended_size if extended else compact)
               + (ibody_size(keys[index]) if keys[index] else 0) + inline + index_bytes
               for index, (extended, _, _, inline, index_bytes) in enumerate(shapes)]

    # Metadata placement: root, shared xattrs, then the rest in canonical order.
    # Compression configurations (lz4) follow the superblock.
    allocator = _MetaAllocator(EROFS_SUPER_OFFSET + EROFS_SUPER_BLOCK.size
                               + (len(COMPR_CFGS) if compress else 0))
    place = allocator.place
    root_offset = place(records[0])
    shared_id: dict[XattrKey, int] = {}
    shared_entries: list[tuple[int, bytes]] = []
    for key in xattrs.shared:
        at = place(len(xattrs.encoded[key]))
        shared_entries.append((at, xattrs.encoded[key]))
        shared_id[key] = at // 4
    offsets = [root_offset, *(place(size) for size in records[1:])]
    if root_offset // ISLOT_SIZE > 0xFFFF:
        raise ImageError("the EROFS root inode does not fit a 16-bit nid")
    meta_size = allocator.end

    # Data blocks, in canonical order after the metadata area.
    data_blkaddr = -(-meta_size // BLOCK_SIZE)
    next_block = data_blkaddr
    inodes: list[InodePlan] = []
    ibody = xattrs.ibody
    for index, entry in enumerate(primaries):
        extended, datalayout, nblocks, inline, index_bytes = shapes[index]
        if nblocks:
            blkaddr = next_block
            next_block += nblocks
        else:
            blkaddr = NULL_ADDR if datalayout == INODE_FLAT_INLINE else 0
        inodes.append(InodePlan(
            index, entry, offsets[index] // ISLOT_SIZE, extended, datalayout, sizes[index],
            nlink[index], ibody(keys[index], shared_id) if keys[index] else b"",
            blkaddr, nblocks, inline, index_bytes))
    if next_block > 0xFFFFFFFF:
        raise ImageError("the tree is too large for a 32-bit EROFS block address")
    return Layout(
        epoch=epoch, inodes=tuple(inodes), directories=directories,
        shared_xattrs=tuple(shared_entries),
        meta_size=meta_size, data_blkaddr=data_blkaddr, blocks=next_block,
        meta_last_inode=_last_inode_per_block(offsets, records, shapes, data_blkaddr))


def _last_inode_per_block(offsets: list[int], records: list[int], shapes: list[_Shape],
                          count: int) -> tuple[int, ...]:
    """Layout.meta_last_inode: which inode completes each metadata block."""
    last = [-1] * count
    final = len(offsets)
    for index, at in enumerate(offsets):
        first, end = at // BLOCK_SIZE, (at + records[index] - 1) // BLOCK_SIZE
        closing = final if shapes[index][1] == COMPRESSED_FULL else index
        if first == end:
            if last[first] < closing:
                last[first] = closing
        else:
            for block in range(first, end + 1):
                last[block] = max(last[block], closing)
    last[0] = final
    return tuple(last)


def _number(tree: Tree) -> tuple[dict[bytes, int], list[Entry], list[int]]:
    """(index of every path's primary, the primaries in canonical order, link counts)."""
    entries = list(tree)
    index_of: dict[bytes, int] = {}
    primaries: list[Entry] = []
    nlink: list[int] = []
    links: list[Entry] = []
    directory, hardlink = EntryType.DIRECTORY, EntryType.HARDLINK
    for entry in entries:
        kind = entry.type
        if kind is hardlink:
            links.append(entry)
            continue
        index_of[entry.path] = len(primaries)
        primaries.append(entry)
        if kind is directory:
            nlink.append(2)
            if entry.path:
                nlink[index_of[entry.path.rpartition(b"/")[0]]] += 1
        else:
            nlink.append(1)
    for entry in links:  # its primary may come later in canonical order
        assert entry.target is not None
        primary = index_of[entry.target]
        index_of[entry.path] = primary
        nlink[primary] += 1
    return index_of, primaries, nlink


def _directories_and_sizes(tree: Tree, primaries: list[Entry], index_of: dict[bytes, int]
                           ) -> tuple[dict[int, tuple[tuple[DirentPlan, ...], ...]], list[int]]:
    """Directory blocks (".", ".." and the children, all sorted bytewise together) and
    every inode's size; refuses what EROFS cannot store."""
    # One pass over the canonical order lists every directory's children (siblings
    # come in bytewise name order there, hardlinks included).
    listing: dict[int, list[DirentPlan]] = {}
    sizes = [0] * len(primaries)
    regular, directory, symlink = EntryType.REGULAR, EntryType.DIRECTORY, EntryType.SYMLINK
    for index, entry in enumerate(primaries):
        kind = entry.type
        if kind is directory:
            parent = index_of[entry.path.rpartition(b"/")[0]] if entry.path else index
            listing[index] = [(b".", index, 2), (b"..", parent, 2)]
        elif kind is regular:
            content = entry.content
            sizes[index] = content.size if content is not None else 0
        elif kind is symlink:
            target = entry.target or b""
            if not target or len(target) >= BLOCK_SIZE:
                raise ImageError(f"{entry.display()}: symlink target of {len(target)} bytes",
                                 hint="a symlink target has 1 to 4095 bytes")
            sizes[index] = len(target)
        elif kind in (EntryType.CHAR, EntryType.BLOCK) and (
                entry.rdev_major >= 1 << 12 or entry.rdev_minor >= 1 << 20):
            raise ImageError(f"{entry.display()}: device {entry.rdev_major}:{entry.rdev_minor}"
                             " does not fit 12-bit major, 20-bit minor")
    # Keyed by the member's name: hashing an Enum member runs Python code, a str does not.
    file_type = {kind._name_: value for kind, value in FILE_TYPE.items()}
    for child in tree:
        path = child.path
        if not path:
            continue
        parent_path, _, name = path.rpartition(b"/")
        if len(name) > NAME_LEN:
            raise ImageError(f"{child.display()}: name longer than {NAME_LEN} bytes",
                             hint="EROFS names are at most 255 bytes")
        listing[index_of[parent_path]].append((name, index_of[path],
                                               file_type[child.type._name_]))
    directories: dict[int, tuple[tuple[DirentPlan, ...], ...]] = {}
    for index, dirents in listing.items():
        dirents.sort()
        blocks = dir_blocks(dirents)
        directories[index] = blocks
        sizes[index] = dir_size(blocks)
    return directories, sizes


class _Xattrs:
    """Every inode's xattr keys; a (name, value) pair used by enough inodes is shared."""

    def __init__(self, primaries: list[Entry]) -> None:
        self.keys: list[tuple[XattrKey, ...]] = []
        self.uses: Counter[XattrKey] = Counter()
        for entry in primaries:
            if not entry.xattrs:
                self.keys.append(())
                continue
            keys: list[XattrKey] = []
            for name, value in entry.xattrs:
                index, suffix = split_xattr_name(name, entry.display())
                if len(value) > 0xFFFF:
                    raise ImageError(f"{entry.display()}: xattr {name!r} value over 65535 "
                                     "bytes")
                keys.append((index, suffix, value))
            keys.sort()
            if len({(k[0], k[1]) for k in keys}) != len(keys):
                raise ImageError(f"{entry.display()}: the same xattr name appears twice")
            self.keys.append(tuple(keys))
            self.uses.update(keys)
        self.shared = sorted(key for key, count in self.uses.items()
                             if count >= SHARE_THRESHOLD)
        self.encoded = {key: encode_xattr(key) for key in self.uses}

    def ibody_size(self, keys: tuple[XattrKey, ...]) -> int:
        if not keys:
            return 0
        return EROFS_XATTR_IBODY_HEADER.size + sum(
            4 if self.uses[k] >= SHARE_THRESHOLD else len(self.encoded[k]) for k in keys)

    def ibody(self, keys: tuple[XattrKey, ...], shared_id: dict[XattrKey, int]) -> bytes:
        if not keys:
            return b""
        ids = [shared_id[k] for k in keys if k in shared_id]
        return (EROFS_XATTR_IBODY_HEADER.pack(0, len(ids), b"")
                + b"".join(i.to_bytes(4, "little") for i in ids)
                + b"".join(self.encoded[k] for k in keys if k not in shared_id))


_Shape = tuple[bool, int, int, int, int]  # extended, layout, nblocks, inline, index bytes


def _shapes(primaries: list[Entry], sizes: list[int], nlink: list[int], xattrs: _Xattrs,
            epoch_ns: int, *, compress: bool) -> list[_Shape]:
    """Per inode: compact or extended, inline tail or not, compressed or not."""
    shapes: list[_Shape] = []
    compact, extended_size = EROFS_INODE_COMPACT.size, EROFS_INODE_EXTENDED.size
    header_size = EROFS_XATTR_IBODY_HEADER.size
    keys, ibody_size = xattrs.keys, xattrs.ibody_size
    regular = EntryType.REGULAR
    for index, entry in enumerate(primaries):
        size = sizes[index]
        extended = (entry.mtime_ns != epoch_ns or entry.uid > 0xFFFF or entry.gid > 0xFFFF
                    or nlink[index] > 0xFFFF or size > 0xFFFFFFFF)
        isize = extended_size if extended else compact
        ibody_len = ibody_size(keys[index]) if keys[index] else 0
        if ibody_len and (ibody_len - header_size) // 4 + 1 > 0xFFFF:
            raise ImageError(f"{entry.display()}: too many inline xattrs for EROFS")
        tail = size % BLOCK_SIZE
        if compress and entry.type is regular and size > BLOCK_SIZE:
            shapes.append((extended, COMPRESSED_FULL, 0, 0,
                           index_area_size(isize + ibody_len, size)))
        elif tail and isize + ibody_len + tail <= BLOCK_SIZE:
            shapes.append((extended, INODE_FLAT_INLINE, size // BLOCK_SIZE, tail, 0))
        else:
            shapes.append((extended, INODE_FLAT_PLAIN, -(-size // BLOCK_SIZE), 0, 0))
    return shapes
