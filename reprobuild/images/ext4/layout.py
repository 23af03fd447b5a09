"""Plan an ext4 image: inode numbers, block allocation, directory and xattr blocks, as data.

The plan reads file contents once (to find all-zero blocks, which become holes, and to
hash the tree for the UUID and hash seed); the serialiser then writes the plan out.
Layout, all metadata first as flex_bg allows::

    block 0: boot area + superblock | GDT | block bitmaps | inode bitmaps | inode tables |
    directory, xattr and symlink blocks | file data in inode order | extent tree blocks

with the sparse_super backups (superblock + GDT copy) of groups 1, 3^n, 5^n, 7^n left in
place wherever they fall.
"""

from __future__ import annotations

import uuid as uuid_module
from collections.abc import Iterator
from dataclasses import dataclass

import blake3
import msgpack

from reprobuild.errors import ImageError, ImageTooSmall
from reprobuild.images.ext4.directory import (
    DirBlock,
    DirChild,
    DiskXattr,
    directory_blocks,
    disk_xattrs,
    ibody_xattr_region,
    place_xattrs,
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
    FAST_SYMLINK_MAX,
    FIRST_INO,
    FT_BLKDEV,
    FT_CHRDEV,
    FT_DIR,
    FT_FIFO,
    FT_REG,
    FT_SOCK,
    FT_SYMLINK,
    HASH_VERSIONS,
    INDEX_FL,
    INODE_SIZE,
    LOST_FOUND_INO,
    MAX_EXTENT_LEN,
    MAX_LINKS,
    MAX_NAME,
    ROOT_INO,
    encode_device,
    has_super_backup,
)
from reprobuild.images.registry import ImageOptions
from reprobuild.trees.tree import Content, Entry, EntryType, Tree

ZERO_BLOCK = bytes(BLOCK_SIZE)
ZERO_CHUNK = bytes(1 << 20)
CACHE_FILE_MAX = 256 << 10
CACHE_BUDGET = 64 << 20
"""Small files read while planning are kept for the write (bounded, for peak memory)."""

FILE_TYPES = {
    EntryType.REGULAR: FT_REG, EntryType.HARDLINK: FT_REG, EntryType.DIRECTORY: FT_DIR,
    EntryType.SYMLINK: FT_SYMLINK, EntryType.CHAR: FT_CHRDEV, EntryType.BLOCK: FT_BLKDEV,
    EntryType.FIFO: FT_FIFO, EntryType.SOCKET: FT_SOCK,
}


@dataclass(frozen=True)
class Extent:
    logical: int
    length: int
    physical: int


@dataclass(frozen=True)
class FileScan:
    """A regular file's non-zero block runs (logical start, count) and blake3 digest."""

    runs: tuple[tuple[int, int], ...]
    digest: bytes


@dataclass(frozen=True)
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

    @property
    def used_blocks(self) -> int:
        return sum(n for _, n in self.used_runs)


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
                 key: int = 0) -> FileScan:
    """Find the file's non-zero blocks (holes are a property of content) and its digest."""
    hasher = blake3.blake3()
    runs: list[tuple[int, int]] = []
    block = 0
    size = 0
    keep = cache is not None
    kept: list[bytes] = []
    for chunk in aligned_chunks(content):
        hasher.update(chunk)
        size += len(chunk)
        if keep:
            kept.append(chunk)
        count = -(-len(chunk) // BLOCK_SIZE)
        if (chunk[0] == 0 and chunk[-1] == 0 and len(chunk) <= len(ZERO_CHUNK)
                and ZERO_CHUNK[: len(chunk)] == chunk):
            block += count
            continue
        if ZERO_BLOCK not in chunk:
            # No whole zero block; a short last block may still be all zero, and must be
            # a hole whichever way the content happened to be chunked.
            tail = len(chunk) % BLOCK_SIZE
            full = count - 1 if tail else count
            if full:
                _add_run(runs, block, full)
            if tail and chunk[-tail:] != ZERO_BLOCK[:tail]:
                _add_run(runs, block + full, 1)
        else:
            for i in range(count):
                piece = chunk[i * BLOCK_SIZE: (i + 1) * BLOCK_SIZE]
                if piece != ZERO_BLOCK[: len(piece)]:
                    _add_run(runs, block + i, 1)
        block += count
    if size != content.size:
        raise ImageError(f"{where}: content is {size} bytes, the tree says {content.size}",
                         hint="do not modify the source tree during a build")
    if keep and cache is not None:
        cache[key] = b"".join(kept)
    return FileScan(tuple(runs), hasher.digest())


def _add_run(runs: list[tuple[int, int]], start: int, count: int) -> None:
    if runs and runs[-1][0] + runs[-1][1] == start:
        runs[-1] = (runs[-1][0], runs[-1][1] + count)
    else:
        runs.append((start, count))


# -- numbering and content scan --------------------------------------------------------------
@dataclass
class _Node:
    ino: int
    entry: Entry
    links: int = 1
    subdirs: int = 0


class _Numbering:
    """Inode numbers in canonical order: root 2, lost+found 11, the rest from 12."""

    def __init__(self, tree: Tree, epoch: int) -> None:
        self.nodes: dict[int, _Node] = {}
        self.ino_of: dict[bytes, int] = {}
        self.lost_found_synthetic = False
        next_ino = FIRST_INO + 1
        links: list[Entry] = []
        lost = tree.get(b"lost+found")
        if lost is not None and lost.type is not EntryType.DIRECTORY:
            raise ImageError("/lost+found in the tree is not a directory",
                             hint="ext4 needs /lost+found to be a directory")
        for entry in tree:
            if len(entry.name) > MAX_NAME:
                raise ImageError(f"{entry.display()}: name longer than {MAX_NAME} bytes")
            if entry.type is EntryType.HARDLINK:
                links.append(entry)  # numbered below: the primary may come later
                continue
            if entry.path == b"":
                ino = ROOT_INO
            elif entry.path == b"lost+found":
                ino = LOST_FOUND_INO
            else:
                ino = next_ino
                next_ino += 1
            self.ino_of[entry.path] = ino
            self.nodes[ino] = _Node(ino, entry)
            if entry.type is EntryType.DIRECTORY and entry.path:
                self.nodes[self.ino_of[entry.parent]].subdirs += 1
        for entry in links:
            assert entry.target is not None
            ino = self.ino_of[entry.target]
            self.ino_of[entry.path] = ino
            self.nodes[ino].links += 1
            if self.nodes[ino].links > MAX_LINKS:
                raise ImageError(f"{entry.display()}: more than {MAX_LINKS} hardlinks")
        if lost is None:
            self.lost_found_synthetic = True
            lf = Entry(b"lost+found", EntryType.DIRECTORY, 0o700, mtime_ns=epoch * 10**9)
            self.nodes[LOST_FOUND_INO] = _Node(LOST_FOUND_INO, lf)
            self.ino_of[b"lost+found"] = LOST_FOUND_INO
            self.nodes[ROOT_INO].subdirs += 1
        self.last_ino = next_ino - 1


def _tree_digest(tree: Tree, scans: dict[int, FileScan], numbering: _Numbering,
                 epoch: int) -> bytes:
    """blake3 over the canonical description of the tree (with content digests)."""
    clamp = epoch * 10**9
    packer = msgpack.Packer()
    parts = [b"reprobuild ext4 tree v1\0"]
    ino_of = numbering.ino_of
    for entry in tree:
        scan = scans.get(ino_of[entry.path]) if entry.type is EntryType.REGULAR else None
        parts.append(packer.pack((
            entry.path, entry.type.value, entry.mode, entry.uid, entry.gid,
            min(entry.mtime_ns, clamp), entry.target, entry.rdev_major, entry.rdev_minor,
            entry.size, entry.xattrs, scan.digest if scan is not None else None)))
    return blake3.blake3(b"".join(parts)).digest()


def derive_ids(digest: bytes, options: ImageOptions) -> tuple[bytes, bytes]:
    """(uuid, hash seed): given in the options, or derived from the tree's digest."""
    if options.uuid is not None:
        try:
            fs_uuid = uuid_module.UUID(options.uuid).bytes
        except ValueError:
            raise ImageError(f"invalid ext4 uuid {options.uuid!r}",
                             hint="give a UUID like 01234567-89ab-4def-8123-456789abcdef") from None
        basis = b"uuid\0" + fs_uuid
    else:
        raw = blake3.blake3(b"reprobuild ext4 uuid\0" + digest).digest(length=16)
        fs_uuid = uuid_module.UUID(bytes=raw, version=4).bytes
        basis = b"tree\0" + digest
    seed_option = options.get("hash_seed")
    if seed_option is not None:
        try:
            seed = uuid_module.UUID(str(seed_option)).bytes
        except ValueError:
            raise ImageError(f"invalid ext4 hash_seed {seed_option!r}",
                             hint="the hash seed is written as a UUID") from None
    else:
        seed = blake3.blake3(b"reprobuild ext4 hash seed\0" + basis).digest(length=16)
    return fs_uuid, seed


# -- block allocation ------------------------------------------------------------------------
class _NoSpace(Exception):
    def __init__(self, shortage: int) -> None:
        super().__init__(f"{shortage} blocks short")
        self.shortage = shortage


class _Allocator:
    """Hands out blocks upward from a cursor, stepping over superblock backups.

    It never fails: blocks past the end are handed out too, and the caller compares
    :attr:`cursor` with the block count afterwards to learn the shortage exactly.
    """

    def __init__(self, reserved: list[tuple[int, int]]) -> None:
        self.reserved = reserved  # sorted (start, count)
        self.next_reserved = 0
        self.cursor = 0
        self.used: list[tuple[int, int]] = list(reserved)

    def allocate(self, count: int, *, contiguous: bool = False) -> list[tuple[int, int]]:
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
            self.used.append((self.cursor, take))
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


def _map_runs(alloc: _Allocator, runs: tuple[tuple[int, int], ...]) -> list[Extent]:
    extents: list[Extent] = []
    for logical, count in runs:
        for physical, n in alloc.allocate(count):
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
    return extents


def _extent_tree(alloc: _Allocator, extents: list[Extent]
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


# -- the plan --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Needs:
    inodes: int
    data_blocks: int  # directories, xattr blocks, symlinks, file data, extent trees (estimate)


def _geometry(blocks_count: int, inodes: int) -> tuple[int, int, int, int]:
    """(groups, inodes_per_group, inode table blocks per group, gdt blocks)."""
    groups = -(-blocks_count // BLOCKS_PER_GROUP)
    per_group = -(-inodes // groups)
    per_group = max(16, -(-per_group // 16) * 16)
    table_blocks = per_group * INODE_SIZE // BLOCK_SIZE
    gdt_blocks = -(-groups * DESC_SIZE // BLOCK_SIZE)
    return groups, per_group, table_blocks, gdt_blocks


def _overhead(blocks_count: int, inodes: int) -> int:
    groups, _, table_blocks, gdt_blocks = _geometry(blocks_count, inodes)
    backups = sum(1 for g in range(groups) if has_super_backup(g))
    return backups * (1 + gdt_blocks) + groups * (2 + table_blocks)


def minimum_blocks(needs: _Needs) -> int:
    """The smallest block count whose metadata plus ``needs`` fit (no spare blocks)."""
    min_groups = -(-needs.inodes // BLOCKS_PER_GROUP)
    total = needs.data_blocks + 64
    for _ in range(64):
        want = needs.data_blocks + _overhead(total, needs.inodes)
        want = max(want, (min_groups - 1) * BLOCKS_PER_GROUP + 1)
        if want == total:
            break
        total = want
    groups, _, _, gdt_blocks = _geometry(total, needs.inodes)
    last = groups - 1
    if has_super_backup(last) and total - last * BLOCKS_PER_GROUP < 2 + gdt_blocks:
        total = last * BLOCKS_PER_GROUP + 2 + gdt_blocks
    return total


@dataclass(frozen=True)
class _Prepared:
    """Everything about the image that does not depend on block numbers."""

    numbering: _Numbering
    scans: dict[int, FileScan]
    dirs: dict[int, tuple[list[DirBlock], bool]]
    ibody: dict[int, bytes]  # in-inode xattr regions
    block_xattrs: dict[int, tuple[DiskXattr, ...]]
    shared: dict[tuple[DiskXattr, ...], int]  # xattr block contents -> refcount
    slow_links: frozenset[int]
    uuid: bytes
    hash_seed: bytes
    hash_version: int
    label: bytes
    epoch: int

    def needs(self, spare_inodes: int) -> _Needs:
        scans = self.scans.values()
        data = sum(c for s in scans for _, c in s.runs)
        extents = sum(len(s.runs) + sum(c // MAX_EXTENT_LEN for _, c in s.runs)
                      for s in scans)
        # Extent tree blocks: exact for unfragmented files, then a little for the
        # splits at superblock backups (corrected by a retry when short).
        tree = sum(1 + len(s.runs) // EXTENTS_PER_BLOCK for s in scans if len(s.runs) > 4) \
            + extents // (BLOCKS_PER_GROUP * 4)
        dirs = sum(len(b) for b, _ in self.dirs.values())
        return _Needs(self.numbering.last_ino + spare_inodes,
                      dirs + len(self.shared) + len(self.slow_links) + data + tree)


def _scan_files(nodes: dict[int, _Node], cache: dict[int, bytes] | None
                ) -> dict[int, FileScan]:
    regular = [ino for ino in sorted(nodes) if nodes[ino].entry.type is EntryType.REGULAR]
    # Keep the smallest files for the write (opening a file costs more than reading it).
    cached: set[int] = set()
    if cache is not None:
        room = CACHE_BUDGET
        for size, ino in sorted((nodes[ino].entry.size, ino) for ino in regular):
            if size > CACHE_FILE_MAX or size > room:
                break
            cached.add(ino)
            room -= size
    scans: dict[int, FileScan] = {}
    for ino in regular:
        content = nodes[ino].entry.content
        assert content is not None
        scans[ino] = scan_content(content, nodes[ino].entry.display(),
                                  cache if ino in cached else None, ino)
    return scans


def _directories(tree: Tree, numbering: _Numbering, hash_version: int,
                 seed: tuple[int, int, int, int]) -> dict[int, tuple[list[DirBlock], bool]]:
    dirs: dict[int, tuple[list[DirBlock], bool]] = {}
    nodes = numbering.nodes
    for ino in sorted(nodes):
        entry = nodes[ino].entry
        if entry.type is not EntryType.DIRECTORY:
            continue
        if entry.path == b"lost+found" and numbering.lost_found_synthetic:
            kids: list[DirChild] = []
        else:
            kids = [DirChild(c.name, numbering.ino_of[c.path], FILE_TYPES[c.type])
                    for c in tree.children(entry.path)]
        if entry.path == b"" and numbering.lost_found_synthetic:
            kids.append(DirChild(b"lost+found", LOST_FOUND_INO, FT_DIR))
            kids.sort(key=lambda c: c.name)
        parent = ROOT_INO if entry.path == b"" else numbering.ino_of[entry.parent]
        dirs[ino] = directory_blocks(ino, parent, kids, hash_version=hash_version,
                                     hash_seed=seed)
    return dirs


def _prepare(tree: Tree, options: ImageOptions, cache: dict[int, bytes] | None,
             hash_version: int, label: bytes) -> _Prepared:
    numbering = _Numbering(tree, options.epoch)
    nodes = numbering.nodes
    scans = _scan_files(nodes, cache)
    digest = _tree_digest(tree, scans, numbering, options.epoch)
    fs_uuid, hash_seed = derive_ids(digest, options)
    w = [int.from_bytes(hash_seed[i: i + 4], "little") for i in range(0, 16, 4)]
    dirs = _directories(tree, numbering, hash_version, (w[0], w[1], w[2], w[3]))
    ibody: dict[int, bytes] = {}
    block_xattrs: dict[int, tuple[DiskXattr, ...]] = {}
    for ino in sorted(nodes):
        entry = nodes[ino].entry
        if entry.xattrs:
            items = disk_xattrs(entry.xattrs, entry.display())
            inline, rest = place_xattrs(items, entry.display())
            ibody[ino] = ibody_xattr_region(inline)
            if rest:
                block_xattrs[ino] = tuple(rest)
    shared: dict[tuple[DiskXattr, ...], int] = {}
    for block_items in block_xattrs.values():
        shared[block_items] = shared.get(block_items, 0) + 1
    slow_links = frozenset(ino for ino, n in nodes.items() if n.entry.type is EntryType.SYMLINK
                           and len(n.entry.target or b"") > FAST_SYMLINK_MAX)
    for ino in sorted(slow_links):
        if len(nodes[ino].entry.target or b"") >= BLOCK_SIZE:
            raise ImageError(f"{nodes[ino].entry.display()}: symlink target longer than "
                             f"{BLOCK_SIZE - 1} bytes")
    return _Prepared(numbering, scans, dirs, ibody, block_xattrs, shared, slow_links,
                     fs_uuid, hash_seed, hash_version, label, options.epoch)


def plan(tree: Tree, options: ImageOptions, cache: dict[int, bytes] | None = None) -> Layout:
    """Lay out ``tree`` as an ext4 image for ``options``; raises ImageError if it can't."""
    if options.block_size not in (None, BLOCK_SIZE):
        raise ImageError(f"ext4: block size {options.block_size} is not supported",
                         hint="reprobuild writes ext4 with 4096-byte blocks")
    if options.compress is not None:
        raise ImageError("ext4 images are not compressed", hint="drop the compress option")
    label = (options.label or "").encode()
    if len(label) > 16:
        raise ImageError(f"ext4 label {options.label!r} is longer than 16 bytes")
    hash_name = str(options.get("hash_version", "half_md4"))
    if hash_name not in HASH_VERSIONS:
        raise ImageError(f"unknown ext4 hash_version {hash_name!r}",
                         hint="use half_md4 or tea")
    prepared = _prepare(tree, options, cache, HASH_VERSIONS[hash_name], label)
    needs = prepared.needs(int(options.get("inodes", 0) or 0))
    minimum = minimum_blocks(needs)
    if options.size is not None:
        blocks_count = options.size // BLOCK_SIZE
        if blocks_count < minimum:
            raise ImageTooSmall(
                f"the tree needs an ext4 image of at least {minimum * BLOCK_SIZE} bytes "
                f"({minimum} blocks); the size given is {options.size}",
                minimum=minimum * BLOCK_SIZE)
        groups, _, _, gdt_blocks = _geometry(blocks_count, needs.inodes)
        last = groups - 1
        if groups > 1 and has_super_backup(last) and \
                blocks_count - last * BLOCKS_PER_GROUP < 2 + gdt_blocks:
            blocks_count = last * BLOCKS_PER_GROUP  # too small for its backup: drop it
        attempts = [blocks_count]
    else:
        attempts = [minimum]
    while True:
        blocks_count = attempts[-1]
        try:
            return _allocate(blocks_count, needs, prepared, options.size)
        except _NoSpace as short:
            needs = _Needs(needs.inodes, needs.data_blocks + short.shortage)
            if options.size is not None or len(attempts) > 16:
                need = minimum_blocks(needs) * BLOCK_SIZE
                raise ImageTooSmall(
                    f"the tree needs an ext4 image of at least {need} bytes; the size given "
                    f"is {options.size}", minimum=need) from None
            attempts.append(minimum_blocks(needs))


def _allocate(blocks_count: int, needs: _Needs, prepared: _Prepared,
              image_size: int | None) -> Layout:
    """Place everything for ``blocks_count`` blocks; raises _NoSpace when it does not fit."""
    numbering, scans, dirs = prepared.numbering, prepared.scans, prepared.dirs
    block_xattrs, shared = prepared.block_xattrs, prepared.shared
    groups, per_group, table_blocks, gdt_blocks = _geometry(blocks_count, needs.inodes)
    if per_group > BLOCKS_PER_GROUP:
        raise _NoSpace((-(-needs.inodes // BLOCKS_PER_GROUP) - groups) * BLOCKS_PER_GROUP)
    reserved = [(g * BLOCKS_PER_GROUP, 1 + gdt_blocks) for g in range(groups)
                if has_super_backup(g)]
    alloc = _Allocator(reserved)
    block_bitmaps = [alloc.allocate(1)[0][0] for _ in range(groups)]
    inode_bitmaps = [alloc.allocate(1)[0][0] for _ in range(groups)]
    tables = [alloc.allocate(table_blocks, contiguous=True)[0][0] for _ in range(groups)]
    nodes = numbering.nodes
    extents: dict[int, list[Extent]] = {}
    dir_blocks: list[tuple[int, int, DirBlock]] = []
    for ino in sorted(dirs):
        blocks, _ = dirs[ino]
        extents[ino] = _map_runs(alloc, ((0, len(blocks)),))
        for ext in extents[ino]:
            for i in range(ext.length):
                dir_blocks.append((ext.physical + i, ino, blocks[ext.logical + i]))
    xattr_at: dict[tuple[DiskXattr, ...], int] = {}
    xattr_blocks = []
    for ino in sorted(block_xattrs):
        items = block_xattrs[ino]
        if items in xattr_at:
            continue
        (physical, _), = alloc.allocate(1)
        xattr_at[items] = physical
        xattr_blocks.append((physical, xattr_block(list(items), shared[items])))
    raw_blocks = []
    for ino in sorted(prepared.slow_links):
        extents[ino] = _map_runs(alloc, ((0, 1),))
        target = nodes[ino].entry.target or b""
        raw_blocks.append((extents[ino][0].physical, target.ljust(BLOCK_SIZE, b"\0")))
    files = []
    for ino in sorted(scans):
        extents[ino] = _map_runs(alloc, scans[ino].runs)
        content = nodes[ino].entry.content
        assert content is not None
        files.append((ino, content, tuple(extents[ino])))
    tree_blocks: list[tuple[int, int, bytes]] = []
    i_blocks: dict[int, bytes] = {}
    for ino in sorted(extents):
        i_block, tree_nodes = _extent_tree(alloc, extents[ino])
        i_blocks[ino] = i_block
        tree_blocks.extend((p, ino, b) for p, b in tree_nodes)
        extents[ino].extend(Extent(-1, 1, p) for p, _ in tree_nodes)
    if alloc.cursor > blocks_count:
        raise _NoSpace(alloc.cursor - blocks_count)

    inodes: list[InodePlan] = []
    for ino in sorted(nodes):
        node = nodes[ino]
        entry = node.entry
        flags = 0
        size = 0
        charged = sum(e.length for e in extents.get(ino, ()))
        links = node.links
        if entry.type is EntryType.DIRECTORY:
            blocks, htree = dirs[ino]
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
        if ino in block_xattrs:
            xblock = xattr_at[block_xattrs[ino]]
            charged += 1
        inodes.append(InodePlan(ino, entry, links, flags, size, i_block, charged, xblock,
                                prepared.ibody.get(ino, b"")))

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
        inodes=tuple(inodes), dir_blocks=tuple(dir_blocks), raw_blocks=tuple(raw_blocks),
        xattr_blocks=tuple(xattr_blocks), tree_blocks=tuple(tree_blocks), files=tuple(files),
        used_runs=alloc.merged_used(),
    )
