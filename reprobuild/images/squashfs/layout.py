"""Plan a squashfs image: inode order and numbers, ids, xattr sets, file data.

The plan depends only on the tree and the block size; it reads no file. It fixes:

* inodes in the order the inode table holds them: for each directory (depth first, in
  bytewise name order) the subdirectories' contents first, then the directory's own
  children, so a directory's listing can name its children's inodes and the directory's
  inode can name its listing; the root comes last. Inode numbers follow that order;
* the id table (sorted uids and gids) and the distinct xattr sets;
* the regular files in canonical path order with, for each, how many full blocks it
  has and whether another file has the same size (so it may be a duplicate).

What depends on the bytes of the files is decided while they stream, in this order and
so deterministically: which files duplicate an earlier one (same size and blake3), which
blocks are all zero (stored sparse), which compress, and how tails pack into fragments.

The plan keeps its per-inode and per-file values in columns: arrays of machine integers
and lists of the tree's own entries, not an object per entry, so that it costs a few
dozen bytes per entry on top of the tree (issue 13). ``inode(i)``, ``file(i)`` and
``directory(n)`` give one row as a value; ``inodes``, ``files``, ``directories`` and
``steps`` make them all, for tests and tools.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from dataclasses import dataclass

from reprobuild.errors import ImageError
from reprobuild.images.squashfs.ondisk import (
    SQUASHFS_BLKDEV_TYPE,
    SQUASHFS_CHRDEV_TYPE,
    SQUASHFS_DIR_TYPE,
    SQUASHFS_FIFO_TYPE,
    SQUASHFS_IDS,
    SQUASHFS_NAME_LEN,
    SQUASHFS_REG_TYPE,
    SQUASHFS_SOCKET_TYPE,
    SQUASHFS_SYMLINK_TYPE,
    XATTR_PREFIXES,
)
from reprobuild.trees.tree import Entry, EntryType, Tree

BASIC_TYPE: dict[EntryType, int] = {
    EntryType.DIRECTORY: SQUASHFS_DIR_TYPE,
    EntryType.REGULAR: SQUASHFS_REG_TYPE,
    EntryType.SYMLINK: SQUASHFS_SYMLINK_TYPE,
    EntryType.BLOCK: SQUASHFS_BLKDEV_TYPE,
    EntryType.CHAR: SQUASHFS_CHRDEV_TYPE,
    EntryType.FIFO: SQUASHFS_FIFO_TYPE,
    EntryType.SOCKET: SQUASHFS_SOCKET_TYPE,
}

XattrSet = tuple[tuple[int, bytes, bytes], ...]  # (prefix index, name without prefix, value)
NONE = -1  # in xattr_indexes and file_indexes: no xattr set, not a regular file


@dataclass(frozen=True, slots=True)
class InodePlan:
    """One inode: its number, the entry holding its metadata, and its table indexes."""

    number: int
    entry: Entry  # the primary entry (a hardlink's target)
    nlink: int
    uid_index: int
    gid_index: int
    xattr_index: int | None
    file_index: int | None  # regular files: index into SquashfsPlan.files
    parent_number: int  # directories: the parent's inode number (root: inode count + 1)


@dataclass(frozen=True, slots=True)
class DirectoryPlan:
    """A directory's listing: (name, inode index) in bytewise name order."""

    inode_index: int
    children: tuple[tuple[bytes, int], ...]


@dataclass(frozen=True, slots=True)
class FilePlan:
    """One regular file's data: how many full data blocks, and whether it may duplicate.

    ``may_duplicate`` is true when another file has the same size; the writer then
    compares digests (duplicates share the first copy's blocks and fragment). The file's
    tail (``size - full_blocks * block_size`` bytes, when not zero) goes to a fragment.
    """

    entry: Entry
    size: int
    full_blocks: int
    may_duplicate: bool


@dataclass(frozen=True)
class SquashfsPlan:
    """The layout, in columns (see the module docstring). Inode ``i`` has number i + 1."""

    block_size: int
    # Per inode, in inode-table order.
    entries: tuple[Entry, ...]  # the primary entry (a hardlink's target)
    nlinks: array[int]
    uid_indexes: array[int]
    gid_indexes: array[int]
    xattr_indexes: array[int]  # NONE: no xattrs
    file_indexes: array[int]  # NONE: not a regular file
    parent_numbers: array[int]  # directories: the parent's number (root: count + 1)
    # Per directory, in the order the writer emits the listings: the directory's inode,
    # how many inodes the writer emits before the listing (the listing comes after its
    # children's inodes and before its own inode), and where its children start in the
    # two children columns (one more value than directories: the end).
    directory_inodes: array[int]
    listing_after: array[int]
    children_start: array[int]
    child_entries: tuple[Entry, ...]  # the name holders (a hardlink: the link itself)
    child_inodes: array[int]
    ids: tuple[int, ...]
    xattr_sets: tuple[XattrSet, ...]
    # Per regular file, in canonical path order: the order data is written in.
    file_entries: tuple[Entry, ...]
    full_blocks: array[int]
    may_duplicate: bytes  # 1 where another file has the same size
    tail_fragments: bool  # tails of files larger than a block go to fragments too

    @property
    def root_index(self) -> int:
        return len(self.entries) - 1

    @property
    def inode_count(self) -> int:
        return len(self.entries)

    def inode(self, index: int) -> InodePlan:
        xattr, file = self.xattr_indexes[index], self.file_indexes[index]
        return InodePlan(index + 1, self.entries[index], self.nlinks[index],
                         self.uid_indexes[index], self.gid_indexes[index],
                         None if xattr == NONE else xattr, None if file == NONE else file,
                         self.parent_numbers[index])

    def children(self, number: int) -> Iterator[tuple[bytes, int]]:
        """Directory ``number``'s listing: (name, inode index) in bytewise name order."""
        start, end = self.children_start[number], self.children_start[number + 1]
        inodes = self.child_inodes
        for at in range(start, end):
            yield self.child_entries[at].name, inodes[at]

    def directory(self, number: int) -> DirectoryPlan:
        return DirectoryPlan(self.directory_inodes[number], tuple(self.children(number)))

    def file(self, index: int) -> FilePlan:
        entry = self.file_entries[index]
        return FilePlan(entry, entry.size, self.full_blocks[index],
                        bool(self.may_duplicate[index]))

    def emit_order(self) -> Iterator[tuple[str, int]]:
        """The order in which the writer emits inodes and listings: ("inode", index) or
        ("dir", directory number)."""
        emitted = 0
        for number, after in enumerate(self.listing_after):
            while emitted < after:
                yield "inode", emitted
                emitted += 1
            yield "dir", number
        while emitted < len(self.entries):
            yield "inode", emitted
            emitted += 1

    @property
    def steps(self) -> tuple[tuple[str, int], ...]:
        return tuple(self.emit_order())

    @property
    def inodes(self) -> tuple[InodePlan, ...]:
        return tuple(self.inode(i) for i in range(len(self.entries)))

    @property
    def directories(self) -> tuple[DirectoryPlan, ...]:
        return tuple(self.directory(n) for n in range(len(self.directory_inodes)))

    @property
    def files(self) -> tuple[FilePlan, ...]:
        return tuple(self.file(i) for i in range(len(self.file_entries)))


def split_xattr_name(name: bytes, where: str) -> tuple[int, bytes]:
    for index, prefix in enumerate(XATTR_PREFIXES):
        if name.startswith(prefix) and len(name) > len(prefix):
            return index, name[len(prefix):]
    raise ImageError(
        f"squashfs: {where}: xattr {name.decode(errors='replace')!r} has a prefix squashfs"
        " cannot store",
        hint="squashfs stores only user., trusted. and security. xattrs",
    )


def plan_image(tree: Tree, block_size: int, *, tail_fragments: bool = True) -> SquashfsPlan:
    """Plan the image of ``tree`` (see the module docstring)."""
    links: dict[bytes, int] = {}
    for entry in tree:
        if entry.type is EntryType.HARDLINK:
            assert entry.target is not None
            links[entry.target] = links.get(entry.target, 1) + 1
    order = _inode_order(tree)
    entries = order.entries
    count = len(entries)
    ids, xattr_indexes, xattr_sets = _ids_and_xattrs(entries)
    id_index = {v: i for i, v in enumerate(ids)}
    file_entries, full_blocks, may_duplicate, file_index = _files(
        tree, block_size, tail_fragments=tail_fragments)

    nlinks = array("I", bytes(4 * count))
    uid_indexes = array("I", bytes(4 * count))
    gid_indexes = array("I", bytes(4 * count))
    file_indexes = array("i", [NONE]) * count
    for i, entry in enumerate(entries):
        uid_indexes[i] = id_index[entry.uid]
        gid_indexes[i] = id_index[entry.gid]
        if entry.type is not EntryType.DIRECTORY:  # directories: below
            nlinks[i] = links.get(entry.path, 1)
            if entry.type is EntryType.REGULAR:
                file_indexes[i] = file_index[entry.path]
    parent_numbers = array("I", bytes(4 * count))
    parent_numbers[count - 1] = count + 1  # the root
    child_inodes = order.child_inodes
    for number, directory in enumerate(order.directory_inodes):
        subdirectories = 0
        for at in range(order.children_start[number], order.children_start[number + 1]):
            child = child_inodes[at]
            if not parent_numbers[child]:  # a hardlink's first listing, as before
                parent_numbers[child] = directory + 1
            if entries[child].type is EntryType.DIRECTORY:
                subdirectories += 1
        nlinks[directory] = 2 + subdirectories
    return SquashfsPlan(
        block_size=block_size,
        entries=entries,
        nlinks=nlinks,
        uid_indexes=uid_indexes,
        gid_indexes=gid_indexes,
        xattr_indexes=xattr_indexes,
        file_indexes=file_indexes,
        parent_numbers=parent_numbers,
        directory_inodes=order.directory_inodes,
        listing_after=order.listing_after,
        children_start=order.children_start,
        child_entries=order.child_entries,
        child_inodes=child_inodes,
        ids=ids,
        xattr_sets=tuple(xattr_sets),
        file_entries=file_entries,
        full_blocks=full_blocks,
        may_duplicate=may_duplicate,
        tail_fragments=tail_fragments,
    )


@dataclass(frozen=True)
class _Order:
    entries: tuple[Entry, ...]  # primary entries in inode order
    directory_inodes: array[int]
    listing_after: array[int]
    children_start: array[int]
    child_entries: tuple[Entry, ...]
    child_inodes: array[int]


def _inode_order(tree: Tree) -> _Order:
    """Inode order: visit(dir) = visit(subdirs), then the children's inodes; each
    directory's listing comes after its children's inodes. A directory's own inode is
    placed by its parent's listing (the root's last), so listings first record the
    children's paths and the indexes are filled in once every path has one."""
    entries: list[Entry] = []  # primary entries in inode order
    index_of: dict[bytes, int] = {}
    directory_paths: list[bytes] = []
    listing_after = array("I")
    children_start = array("I", [0])
    child_entries: list[Entry] = []
    child_primaries: list[bytes] = []  # paths until every primary has its index

    def place(entry: Entry) -> None:
        if entry.path not in index_of:
            index_of[entry.path] = len(entries)
            entries.append(entry)

    # An explicit stack instead of recursion: deep trees must not hit the limit.
    stack: list[tuple[bytes, bool]] = [(b"", False)]
    while stack:
        path, expanded = stack.pop()
        children = tree.children(path)
        if not expanded:
            stack.append((path, True))
            for child in reversed(children):
                if child.type is EntryType.DIRECTORY:
                    stack.append((child.path, False))
            continue
        for child in children:
            if len(child.name) > SQUASHFS_NAME_LEN:
                raise ImageError(f"squashfs: {child.display()}: name longer than"
                                 f" {SQUASHFS_NAME_LEN} bytes")
            _check_entry(child)
            primary = tree.resolve(child)
            place(primary)
            child_entries.append(child)
            child_primaries.append(primary.path)
        listing_after.append(len(entries))
        directory_paths.append(path)
        children_start.append(len(child_entries))
    place(tree.root)
    child_inodes = array("I", [index_of[p] for p in child_primaries])
    directory_inodes = array("I", [index_of[p] for p in directory_paths])
    return _Order(tuple(entries), directory_inodes, listing_after, children_start,
                  tuple(child_entries), child_inodes)


def _ids_and_xattrs(entries: tuple[Entry, ...]
                    ) -> tuple[tuple[int, ...], array[int], dict[XattrSet, int]]:
    """Ids and xattr sets, in a content-defined order, and each inode's xattr set."""
    ids = tuple(sorted({e.uid for e in entries} | {e.gid for e in entries}))
    if len(ids) > SQUASHFS_IDS:
        raise ImageError(f"squashfs: {len(ids)} distinct uids and gids, more than"
                         f" {SQUASHFS_IDS}")
    for value in ids:
        if not 0 <= value < 1 << 32:
            raise ImageError(f"squashfs: uid or gid {value} does not fit 32 bits")
    xattr_sets: dict[XattrSet, int] = {}
    inode_xattr = array("i", [NONE]) * len(entries)
    for i, entry in enumerate(entries):
        if not entry.xattrs:
            continue
        parts = sorted((*split_xattr_name(name, entry.display()), value)
                       for name, value in entry.xattrs)
        key: XattrSet = tuple(parts)
        inode_xattr[i] = xattr_sets.setdefault(key, len(xattr_sets))
    return ids, inode_xattr, xattr_sets


def _files(tree: Tree, block_size: int, *, tail_fragments: bool
           ) -> tuple[tuple[Entry, ...], array[int], bytes, dict[bytes, int]]:
    """Files in canonical path order, the order their data is written in: the entries,
    their full blocks, whether each may duplicate, and each path's index."""
    regulars = tuple(e for e in tree if e.type is EntryType.REGULAR)
    size_count: dict[int, int] = {}
    for entry in regulars:
        size = entry.size
        size_count[size] = size_count.get(size, 0) + 1
    full_blocks = array("Q", bytes(8 * len(regulars)))
    may_duplicate = bytearray(len(regulars))
    file_index: dict[bytes, int] = {}
    for index, entry in enumerate(regulars):
        size = entry.size
        full, tail = divmod(size, block_size)
        if tail and full and not tail_fragments:
            full += 1
        full_blocks[index] = full
        may_duplicate[index] = size > 0 and size_count[size] > 1
        file_index[entry.path] = index
    return regulars, full_blocks, bytes(may_duplicate), file_index


SYMLINK_MAX = 4096  # the kernel refuses longer targets (squashfs_read_inode)


def _check_entry(entry: Entry) -> None:
    """Refuse what squashfs or the kernel cannot represent, naming the entry."""
    if entry.type is EntryType.SYMLINK and not 0 < len(entry.target or b"") <= SYMLINK_MAX:
        raise ImageError(f"squashfs: {entry.display()}: symlink target must be 1 to"
                         f" {SYMLINK_MAX} bytes, not {len(entry.target or b'')}")
    if entry.type in (EntryType.CHAR, EntryType.BLOCK) and (
            not 0 <= entry.rdev_major <= 0xFFF or not 0 <= entry.rdev_minor <= 0xFFFFF):
        raise ImageError(f"squashfs: {entry.display()}: device {entry.rdev_major},"
                         f"{entry.rdev_minor} does not fit 32 bits (major < 4096,"
                         " minor < 1048576)")
