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
"""

from __future__ import annotations

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
    block_size: int
    inodes: tuple[InodePlan, ...]  # in inode-table order; number = index + 1
    # The order in which the writer emits inodes and listings: ("inode", index) or
    # ("dir", directory index); a directory's listing comes after its children's
    # inodes and before its own inode.
    steps: tuple[tuple[str, int], ...]
    directories: tuple[DirectoryPlan, ...]
    ids: tuple[int, ...]
    xattr_sets: tuple[XattrSet, ...]
    files: tuple[FilePlan, ...]  # canonical path order; the order data is written in
    tail_fragments: bool  # tails of files larger than a block go to fragments too

    @property
    def root_index(self) -> int:
        return len(self.inodes) - 1


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
    order, steps, dir_children, index_of = _inode_order(tree)
    entries = [tree.resolve(tree.get(p) or tree.root) for p in order]
    ids, inode_xattr, xattr_sets = _ids_and_xattrs(entries)
    id_index = {v: i for i, v in enumerate(ids)}
    files, file_index = _files(tree, block_size, tail_fragments=tail_fragments)

    count = len(order)
    parent_of: dict[bytes, int] = {b"": count + 1}
    for dir_path, listing in dir_children:
        for _, child_path in listing:
            parent_of.setdefault(child_path, index_of[dir_path] + 1)
    inodes = tuple(
        InodePlan(
            number=i + 1,
            entry=entry,
            nlink=_nlink(tree, entry, links),
            uid_index=id_index[entry.uid],
            gid_index=id_index[entry.gid],
            xattr_index=inode_xattr[i],
            file_index=file_index.get(entry.path) if entry.type is EntryType.REGULAR else None,
            parent_number=parent_of.get(entry.path, 0),
        )
        for i, entry in enumerate(entries)
    )
    directories = tuple(
        DirectoryPlan(index_of[path], tuple((name, index_of[p]) for name, p in listing))
        for path, listing in dir_children
    )
    return SquashfsPlan(
        block_size=block_size,
        inodes=inodes,
        steps=tuple(steps),
        directories=directories,
        ids=ids,
        xattr_sets=tuple(xattr_sets),
        files=tuple(files),
        tail_fragments=tail_fragments,
    )


_Listing = list[tuple[bytes, bytes]]


def _inode_order(tree: Tree) -> tuple[list[bytes], list[tuple[str, int]],
                                      list[tuple[bytes, _Listing]], dict[bytes, int]]:
    """(primary paths in inode order, the writer's steps, each directory's listing, the
    index of each primary path). Inode order: visit(dir) = visit(subdirs), then the
    children's inodes."""
    order: list[bytes] = []  # primary paths in inode order
    steps: list[tuple[str, int]] = []
    dir_children: list[tuple[bytes, _Listing]] = []
    index_of: dict[bytes, int] = {}

    def place(path: bytes) -> None:
        if path not in index_of:
            index_of[path] = len(order)
            order.append(path)
            steps.append(("inode", index_of[path]))

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
        listing: _Listing = []
        for child in children:
            if len(child.name) > SQUASHFS_NAME_LEN:
                raise ImageError(f"squashfs: {child.display()}: name longer than"
                                 f" {SQUASHFS_NAME_LEN} bytes")
            _check_entry(child)
            primary = tree.resolve(child).path
            place(primary)
            listing.append((child.name, primary))
        steps.append(("dir", len(dir_children)))
        dir_children.append((path, listing))
    place(b"")
    return order, steps, dir_children, index_of


def _ids_and_xattrs(entries: list[Entry]
                    ) -> tuple[tuple[int, ...], list[int | None], dict[XattrSet, int]]:
    """Ids and xattr sets, in a content-defined order, and each inode's xattr set."""
    ids = tuple(sorted({e.uid for e in entries} | {e.gid for e in entries}))
    if len(ids) > SQUASHFS_IDS:
        raise ImageError(f"squashfs: {len(ids)} distinct uids and gids, more than"
                         f" {SQUASHFS_IDS}")
    for value in ids:
        if not 0 <= value < 1 << 32:
            raise ImageError(f"squashfs: uid or gid {value} does not fit 32 bits")
    xattr_sets: dict[XattrSet, int] = {}
    inode_xattr: list[int | None] = []
    for entry in entries:
        if not entry.xattrs:
            inode_xattr.append(None)
            continue
        parts = sorted((*split_xattr_name(name, entry.display()), value)
                       for name, value in entry.xattrs)
        key: XattrSet = tuple(parts)
        inode_xattr.append(xattr_sets.setdefault(key, len(xattr_sets)))
    return ids, inode_xattr, xattr_sets


def _files(tree: Tree, block_size: int, *, tail_fragments: bool
           ) -> tuple[list[FilePlan], dict[bytes, int]]:
    """Files in canonical path order, the order their data is written in."""
    files: list[FilePlan] = []
    file_index: dict[bytes, int] = {}
    regulars = [e for e in tree if e.type is EntryType.REGULAR]
    size_count: dict[int, int] = {}
    for entry in regulars:
        size_count[entry.size] = size_count.get(entry.size, 0) + 1
    for entry in regulars:
        full, tail = divmod(entry.size, block_size)
        if tail and full and not tail_fragments:
            full += 1
        file_index[entry.path] = len(files)
        files.append(FilePlan(entry, entry.size, full,
                              entry.size > 0 and size_count[entry.size] > 1))
    return files, file_index


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


def _nlink(tree: Tree, entry: Entry, links: dict[bytes, int]) -> int:
    if entry.type is EntryType.DIRECTORY:
        return 2 + sum(1 for c in tree.children(entry.path) if c.type is EntryType.DIRECTORY)
    return links.get(entry.path, 1)

