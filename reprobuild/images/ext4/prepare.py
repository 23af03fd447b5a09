"""What an ext4 image is before any block is placed: inode numbers in canonical order,
the content scan, the tree digest from which the UUID and hash seed derive, directory
blocks and extended attributes (:class:`Prepared`)."""

from __future__ import annotations

import uuid as uuid_module
from dataclasses import dataclass

import blake3
import msgpack

from reprobuild.errors import ImageError
from reprobuild.images.ext4.directory import (
    DirBlock,
    DirChild,
    DiskXattr,
    directory_blocks,
    disk_xattrs,
    ibody_xattr_region,
    place_xattrs,
)
from reprobuild.images.ext4.ondisk import (
    BLOCK_SIZE,
    BLOCKS_PER_GROUP,
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
    LOST_FOUND_INO,
    MAX_EXTENT_LEN,
    MAX_LINKS,
    MAX_NAME,
    ROOT_INO,
)
from reprobuild.images.ext4.scan import (
    CACHE_BUDGET,
    CACHE_FILE_MAX,
    CACHE_PER_ENTRY,
    WHOLE_READ_MAX,
    FileScan,
    scan_bytes,
    scan_content,
)
from reprobuild.images.registry import ImageOptions
from reprobuild.trees.tree import Content, ContentReader, Entry, EntryType, Tree

EMPTY = Content.from_bytes(b"")

FILE_TYPES = {
    EntryType.REGULAR: FT_REG, EntryType.HARDLINK: FT_REG, EntryType.DIRECTORY: FT_DIR,
    EntryType.SYMLINK: FT_SYMLINK, EntryType.CHAR: FT_CHRDEV, EntryType.BLOCK: FT_BLKDEV,
    EntryType.FIFO: FT_FIFO, EntryType.SOCKET: FT_SOCK,
}



@dataclass(slots=True)
class Node:
    ino: int
    entry: Entry
    links: int = 1
    subdirs: int = 0


class Numbering:
    """Inode numbers in canonical order: root 2, lost+found 11, the rest from 12."""

    def __init__(self, tree: Tree, epoch: int) -> None:
        self.nodes: dict[int, Node] = {}
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
            self.nodes[ino] = Node(ino, entry)
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
            self.nodes[LOST_FOUND_INO] = Node(LOST_FOUND_INO, lf)
            self.ino_of[b"lost+found"] = LOST_FOUND_INO
            self.nodes[ROOT_INO].subdirs += 1
        self.last_ino = next_ino - 1


def tree_digest(tree: Tree, scans: dict[int, FileScan], numbering: Numbering,
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



@dataclass(frozen=True)
class Needs:
    inodes: int
    data_blocks: int  # directories, xattr blocks, symlinks, file data, extent trees (estimate)


@dataclass(frozen=True)
class Prepared:
    """Everything about the image that does not depend on block numbers."""

    numbering: Numbering
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

    def needs(self, spare_inodes: int) -> Needs:
        scans = self.scans.values()
        data = sum(c for s in scans for _, c in s.runs)
        extents = sum(len(s.runs) + sum(c // MAX_EXTENT_LEN for _, c in s.runs)
                      for s in scans)
        # Extent tree blocks: exact for unfragmented files, then a little for the
        # splits at superblock backups (corrected by a retry when short).
        tree = sum(1 + len(s.runs) // EXTENTS_PER_BLOCK for s in scans if len(s.runs) > 4) \
            + extents // (BLOCKS_PER_GROUP * 4)
        dirs = sum(len(b) for b, _ in self.dirs.values())
        return Needs(self.numbering.last_ino + spare_inodes,
                      dirs + len(self.shared) + len(self.slow_links) + data + tree)



def scan_files(nodes: dict[int, Node], cache: dict[int, bytes] | None, *,
               digest: bool = True) -> dict[int, FileScan]:
    """Each regular file read once: its runs, its digest (when ``digest``), and the
    smallest files' bytes kept in ``cache`` for the write (within CACHE_BUDGET)."""
    regular = [ino for ino in sorted(nodes) if nodes[ino].entry.type is EntryType.REGULAR]
    # Keep the smallest files for the write (opening a file costs more than reading it,
    # unless it is a piece of an archive), within a budget that grows with the tree.
    cached: set[int] = set()
    if cache is not None:
        room = min(CACHE_BUDGET, CACHE_PER_ENTRY * len(nodes))
        reopened = [ino for ino in regular if not ContentReader.cheap_to_read_again(
            nodes[ino].entry.content or EMPTY)]
        for size, ino in sorted((nodes[ino].entry.size, ino) for ino in reopened):
            if size > CACHE_FILE_MAX or size > room:
                break
            cached.add(ino)
            room -= size
    scans: dict[int, FileScan] = {}
    with ContentReader() as reader:
        for ino in regular:
            entry = nodes[ino].entry
            content = entry.content
            assert content is not None
            if content.size <= WHOLE_READ_MAX:
                data = reader.read(content, entry.display())
                scans[ino] = scan_bytes(data, digest=digest)
                if ino in cached and cache is not None:
                    cache[ino] = data
                continue
            scans[ino] = scan_content(content, entry.display(),
                                      cache if ino in cached else None, ino, digest=digest)
    return scans


def directories(tree: Tree, numbering: Numbering, hash_version: int,
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


def prepare(tree: Tree, options: ImageOptions, cache: dict[int, bytes] | None,
             hash_version: int, label: bytes) -> Prepared:
    numbering = Numbering(tree, options.epoch)
    nodes = numbering.nodes
    # The tree's digest (every file's bytes hashed) only names what the options do not.
    hashed = options.uuid is None or options.get("hash_seed") is None
    scans = scan_files(nodes, cache, digest=hashed)
    digest = tree_digest(tree, scans, numbering, options.epoch) if hashed else b""
    fs_uuid, hash_seed = derive_ids(digest, options)
    w = [int.from_bytes(hash_seed[i: i + 4], "little") for i in range(0, 16, 4)]
    dirs = directories(tree, numbering, hash_version, (w[0], w[1], w[2], w[3]))
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
    return Prepared(numbering, scans, dirs, ibody, block_xattrs, shared, slow_links,
                     fs_uuid, hash_seed, hash_version, label, options.epoch)

