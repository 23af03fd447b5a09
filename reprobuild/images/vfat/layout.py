"""The plan of a FAT image: its geometry, every file's and directory's clusters, and the
bytes of every directory, computed before any file byte is read.

Clusters are handed out in the tree's canonical order (parents before children,
siblings bytewise), each file and directory in one contiguous run, so the layout is a
function of the tree alone. Only regular files and directories go in: FAT has no
symlinks, devices, fifos, sockets or hardlinks, and those are refused with their path
(a hardlink is stored as a copy of its file with the option ``hardlinks = "copy"``).
Owners, permission bits (except that a file without write bits is marked read-only)
and xattrs have no place in FAT and are not stored.

Times: each mtime is clamped to the epoch, then a time before 1980-01-01 (FAT's first
day) is stored as 1980-01-01 00:00:00, as the Linux driver does; an epoch after
2107-12-31 is refused. Times are UTC with FAT's 2-second steps; no time zone enters.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NoReturn

from reprobuild.errors import ImageError
from reprobuild.images.protocol import ImageOptions
from reprobuild.images.vfat.geometry import (
    DEFAULT_ROOT_ENTRIES,
    MIN_CLUST_32,
    Geometry,
    choose,
)
from reprobuild.images.vfat.names import DirName, directory_names
from reprobuild.images.vfat.ondisk import (
    ATTR_ARCH,
    ATTR_DIR,
    ATTR_RO,
    ATTR_VOLUME,
    DIR_ENTRY_SIZE,
    FAT_FIRST,
    FAT_LAST,
    MAX_DIR_ENTRIES,
    MAX_FILE_SIZE,
    MSDOS_DIR_ENTRY,
    SECTOR,
    fat_time,
)
from reprobuild.trees.tree import Entry, EntryType, Tree

MIB = 1 << 20
NS = 1_000_000_000
# The largest volume of each forced FAT type that "min" tries before giving up.
LARGEST = {12: 300 * MIB, 16: 4200 * MIB, 32: 2 << 40}
REFUSED_TYPES = {
    EntryType.SYMLINK: "a symlink", EntryType.HARDLINK: "a hardlink",
    EntryType.CHAR: "a character device", EntryType.BLOCK: "a block device",
    EntryType.FIFO: "a fifo", EntryType.SOCKET: "a socket",
}


@dataclass(frozen=True, slots=True)
class Extent:
    """A file's or directory's contiguous clusters (first 0 and count 0: no clusters)."""

    first: int
    count: int


@dataclass(frozen=True)
class Layout:
    """Everything the writer needs besides the file bytes and the volume id."""

    geometry: Geometry
    image_size: int  # bytes of the image file (at least the volume's sectors)
    extents: dict[bytes, Extent]  # every path but a FAT12/16 root
    files: tuple[Entry, ...]  # regular files with data, in cluster order
    directories: dict[bytes, bytes]  # path -> the directory's entries, zero-padded
    used_clusters: int
    label: bytes | None


def check_epoch(epoch: int) -> None:
    if epoch > FAT_LAST:
        raise ImageError(f"vfat: epoch {epoch} is after 2107-12-31, the last day FAT "
                         "can hold", hint="give an earlier epoch (SOURCE_DATE_EPOCH)")


def check_label(label: str | None) -> bytes | None:
    """The 11-byte volume label, or None for no label."""
    if label is None or label == "":
        return None
    bad = sorted({c for c in label if not " " <= c <= "~" or c in '*?.,;:/\\|+=<>[]"'})
    if bad or len(label) > 11 or label != label.upper() or label.startswith(" "):
        raise ImageError(f"vfat label {label!r} is not a FAT volume label",
                         hint="use at most 11 upper-case ASCII letters, digits or spaces, "
                              'like "ESP" (no *?.,;:/\\|+=<>[]")')
    return label.encode("ascii").ljust(11)


class _Scan:
    """The tree as the plan needs it, from one pass in canonical order (a plain class:
    a dataclass costs a millisecond to define at import)."""

    __slots__ = ("children", "directories", "entries", "problem")

    def __init__(self, entries: list[Entry], children: dict[bytes, list[Entry]],
                 directories: list[tuple[int, Entry]],
                 problem: tuple[int, Entry] | None) -> None:
        self.entries = entries
        self.children = children  # directory -> its children, bytewise by name
        self.directories = directories  # (position in ``entries``, directory)
        self.problem = problem  # the first entry FAT cannot hold, and where


def _scan(tree: Tree) -> _Scan:
    entries = list(tree)
    children: dict[bytes, list[Entry]] = {}
    directories = []
    problem = None
    directory, regular = EntryType.DIRECTORY, EntryType.REGULAR
    for index, entry in enumerate(entries):
        kind = entry.type
        if kind is directory:
            children[entry.path] = []
            directories.append((index, entry))
        elif problem is None and (kind is not regular or entry.size > MAX_FILE_SIZE):
            problem = (index, entry)
        if entry.path:
            # Canonical order lists siblings bytewise by name, as Tree.children does.
            children[entry.path.rpartition(b"/")[0]].append(entry)
    return _Scan(entries, children, directories, problem)


def _refuse(entry: Entry) -> NoReturn:
    what = REFUSED_TYPES.get(entry.type)
    if what is not None:
        raise ImageError(f"{entry.display()} is {what}, which FAT cannot hold",
                         hint='set hardlinks = "copy" to store a copy of the file'
                         if entry.type is EntryType.HARDLINK else
                         "remove it from the tree (or replace it with a copy of the "
                         "file) for a vfat image")
    raise ImageError(f"{entry.display()} is {entry.size} bytes, over FAT's limit of "
                     f"{MAX_FILE_SIZE} bytes", hint="split the file")


def _check_entries(scan: _Scan) -> dict[bytes, list[DirName]]:
    """Every directory's stored names; refuses what FAT cannot hold, the first problem
    in canonical order first (a directory's names count as met at the directory)."""
    names: dict[bytes, list[DirName]] = {}
    problem = scan.problem
    for index, entry in scan.directories:
        if problem is not None and problem[0] < index:
            _refuse(problem[1])
        children = [child.path.rpartition(b"/")[2] for child in scan.children[entry.path]]
        names[entry.path] = directory_names(children, entry.display())
    if problem is not None:
        _refuse(problem[1])
    return names


def _entry_counts(tree: Tree, names: dict[bytes, list[DirName]],
                  label: bytes | None) -> dict[bytes, int]:
    counts = {}
    for path, stored in names.items():
        count = len(stored) + sum(len(name.slots) for name in stored)
        count += (1 if label else 0) if path == b"" else 2
        if count > MAX_DIR_ENTRIES:
            shown = tree.get(path).display()  # type: ignore[union-attr]
            raise ImageError(f"{shown} needs {count} directory entries, over FAT's "
                             f"{MAX_DIR_ENTRIES}", hint="spread the files over directories")
        counts[path] = count
    return counts


class _Sizes:
    """Bytes of every file with data and of every directory's entries but the root's,
    and the root's entry count."""

    __slots__ = ("directories", "files", "root_entries")

    def __init__(self, files: list[int], directories: list[int], root_entries: int) -> None:
        self.files = files
        self.directories = directories
        self.root_entries = root_entries

    def clusters(self, cluster_size: int, fat_bits: int) -> int:
        total = sum([-(-size // cluster_size) for size in self.files])
        total += sum([max(1, -(-size // cluster_size)) for size in self.directories])
        if fat_bits == 32:
            total += max(1, -(-self.root_entries * DIR_ENTRY_SIZE // cluster_size))
        return total


def _sizes(scan: _Scan, counts: dict[bytes, int]) -> _Sizes:
    regular = EntryType.REGULAR
    files = [entry.size for entry in scan.entries if entry.type is regular and entry.size]
    directories = [counts[entry.path] * DIR_ENTRY_SIZE for _, entry in scan.directories
                   if entry.path]
    return _Sizes(files, directories, counts[b""])


def _slack(clusters: int) -> int:
    """Free clusters "min" leaves: a sixteenth of what the tree uses, and 16 more."""
    return clusters // 16 + 16


def _geometry(sizes: _Sizes, options: ImageOptions,
              fat_bits: int | None) -> tuple[Geometry, int, int]:
    """(geometry, image size, clusters used) for the given or smallest size."""
    root_entries = max(DEFAULT_ROOT_ENTRIES, -(-sizes.root_entries // 16) * 16)
    if options.size is not None:
        size = options.size
        geometry = choose(size, fat_bits=fat_bits, root_entries=root_entries)
        kind = f"FAT{fat_bits}" if fat_bits else "FAT"
        if geometry is None or (geometry.fat_bits == 32
                                and geometry.cluster_count < MIN_CLUST_32):
            raise ImageError(f"vfat: no {kind} file system fits in {size} bytes",
                             hint='give another size, or size = "min"')
        need = sizes.clusters(geometry.cluster_size, geometry.fat_bits)
        if need > geometry.cluster_count:
            raise ImageError(f"vfat: the tree needs {need} clusters of {geometry.cluster_size}"
                             f" bytes, but {size} bytes hold {geometry.cluster_count}",
                             hint='give a larger size, or size = "min" for the smallest '
                                  "that fits")
        return geometry, size, need
    size = MIB
    largest = LARGEST.get(fat_bits or 32, LARGEST[32])
    while size <= largest:
        geometry = choose(size, fat_bits=fat_bits, root_entries=root_entries)
        if geometry is None or (geometry.fat_bits == 32
                                and geometry.cluster_count < MIN_CLUST_32):
            size += MIB
            continue
        need = sizes.clusters(geometry.cluster_size, geometry.fat_bits)
        short = need + _slack(need) - geometry.cluster_count
        if short <= 0:
            return geometry, size, need
        size += -(-short * geometry.cluster_size // MIB) * MIB
    raise ImageError(f"vfat: the tree does not fit in a FAT{fat_bits} file system",
                     hint="leave the option fat unset to let the size choose the type")


def copy_hardlinks(tree: Tree) -> Tree:
    """``tree`` with every hardlink replaced by a regular file: the primary's metadata
    and bytes under the link's path (what copying a tree onto FAT does)."""
    out = Tree(tree.root)
    for entry in tree:
        if entry.type is EntryType.HARDLINK:
            entry = replace(tree.resolve(entry), path=entry.path)
        if entry.path:
            out.add(entry)
    return out


def plan(tree: Tree, options: ImageOptions, *, fat_bits: int | None) -> Layout:
    """The whole layout of the image of ``tree``."""
    check_epoch(options.epoch)
    if options.get("hardlinks") == "copy":
        tree = copy_hardlinks(tree)
    if options.size is not None and options.size % SECTOR:
        raise ImageError(f"vfat size {options.size} is not a multiple of {SECTOR} bytes",
                         hint='give a size like "64M", or "min"')
    label = check_label(options.label)
    scan = _scan(tree)
    names = _check_entries(scan)
    counts = _entry_counts(tree, names, label)
    geometry, size, used = _geometry(_sizes(scan, counts), options, fat_bits)
    cluster_size = geometry.cluster_size
    extents: dict[bytes, Extent] = {}
    files = []
    next_cluster = 2
    regular = EntryType.REGULAR
    for entry in scan.entries:
        if entry.type is regular:
            count = -(-entry.size // cluster_size)
            if count:
                files.append(entry)
        elif entry.path or geometry.fat_bits == 32:
            count = max(1, -(-counts[entry.path] * DIR_ENTRY_SIZE // cluster_size))
        else:
            continue
        extents[entry.path] = Extent(next_cluster if count else 0, count)
        next_cluster += count
    stamps = _Stamps(options.epoch)
    directories = {entry.path: _directory_bytes(entry, scan.children[entry.path],
                                                names[entry.path], extents, geometry, label,
                                                stamps)
                   for _, entry in scan.directories}
    return Layout(geometry, size, extents, tuple(files), directories, used, label)


class _Stamps:
    """The FAT (date, time) of each mtime: clamped to the epoch, at least FAT_FIRST."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.known: dict[int, tuple[int, int]] = {}

    def of(self, mtime_ns: int) -> tuple[int, int]:
        stamp = self.known.get(mtime_ns)
        if stamp is None:
            seconds = min(mtime_ns // NS, self.epoch)
            stamp = self.known[mtime_ns] = fat_time(max(seconds, FAT_FIRST))
        return stamp


_NO_EXTENT = Extent(0, 0)


def _short_entry(name: bytes, attr: int, case_bits: int, stamp: tuple[int, int],
                 cluster: int, size: int) -> bytes:
    date, time = stamp
    return MSDOS_DIR_ENTRY.pack(name, attr, case_bits, 0, time, date, date, cluster >> 16,
                                time, date, cluster & 0xFFFF, size)


def _directory_bytes(entry: Entry, children: list[Entry], stored: list[DirName],
                     extents: dict[bytes, Extent], geometry: Geometry, label: bytes | None,
                     stamps: _Stamps) -> bytes:
    path = entry.path
    parts = []
    if path:
        stamp = stamps.of(entry.mtime_ns)
        parent = extents.get(entry.parent, _NO_EXTENT).first if entry.parent else 0
        parts.append(_short_entry(b".".ljust(11), ATTR_DIR, 0, stamp, extents[path].first, 0))
        parts.append(_short_entry(b"..".ljust(11), ATTR_DIR, 0, stamp, parent, 0))
    elif label is not None:
        stamp = fat_time(max(stamps.epoch, FAT_FIRST))
        parts.append(_short_entry(label, ATTR_VOLUME, 0, stamp, 0, 0))
    pack = MSDOS_DIR_ENTRY.pack
    directory = EntryType.DIRECTORY
    for child, name in zip(children, stored, strict=True):
        parts.extend(name.slots)
        first = extents.get(child.path, _NO_EXTENT).first
        if child.type is directory:
            attr, size = ATTR_DIR, 0
        else:
            attr, size = ATTR_ARCH | (0 if child.mode & 0o222 else ATTR_RO), child.size
        date, time = stamps.of(child.mtime_ns)
        parts.append(pack(name.short, attr, name.case_bits, 0, time, date, date, first >> 16,
                          time, date, first & 0xFFFF, size))
    raw = b"".join(parts)
    if path or geometry.fat_bits == 32:
        room = extents[path].count * geometry.cluster_size
    else:
        room = geometry.root_entries * DIR_ENTRY_SIZE
    return raw + bytes(room - len(raw))
