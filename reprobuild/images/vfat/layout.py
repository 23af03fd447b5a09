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


@dataclass(frozen=True)
class Extent:
    """A file's or directory's contiguous clusters (first 0 and count 0: no clusters)."""

    first: int
    count: int


@dataclass(frozen=True)
class Layout:
    geometry: Geometry
    image_size: int  # bytes of the image file (at least the volume's sectors)
    extents: dict[bytes, Extent]  # every path but a FAT12/16 root
    files: tuple[Entry, ...]  # regular files with data, in cluster order
    directories: dict[bytes, bytes]  # path -> the directory's entries, zero-padded
    used_clusters: int
    label: bytes | None


def _stamp(entry: Entry, epoch: int) -> tuple[int, int]:
    seconds = min(entry.mtime_ns // NS, epoch)
    return fat_time(max(seconds, FAT_FIRST))


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


def _check_entries(tree: Tree) -> dict[bytes, list[DirName]]:
    """Every directory's stored names; refuses what FAT cannot hold."""
    names: dict[bytes, list[DirName]] = {}
    for entry in tree:
        what = REFUSED_TYPES.get(entry.type)
        if what is not None:
            raise ImageError(f"{entry.display()} is {what}, which FAT cannot hold",
                             hint='set hardlinks = "copy" to store a copy of the file'
                             if entry.type is EntryType.HARDLINK else
                             "remove it from the tree (or replace it with a copy of the "
                             "file) for a vfat image")
        if entry.type is EntryType.REGULAR and entry.size > MAX_FILE_SIZE:
            raise ImageError(f"{entry.display()} is {entry.size} bytes, over FAT's limit of "
                             f"{MAX_FILE_SIZE} bytes", hint="split the file")
        if entry.type is EntryType.DIRECTORY:
            children = [child.name for child in tree.children(entry.path)]
            names[entry.path] = directory_names(children, entry.display())
    return names


def _entry_counts(tree: Tree, names: dict[bytes, list[DirName]],
                  label: bytes | None) -> dict[bytes, int]:
    counts = {}
    for path, stored in names.items():
        count = sum(name.entry_count for name in stored)
        count += (1 if label else 0) if path == b"" else 2
        if count > MAX_DIR_ENTRIES:
            shown = tree.get(path).display()  # type: ignore[union-attr]
            raise ImageError(f"{shown} needs {count} directory entries, over FAT's "
                             f"{MAX_DIR_ENTRIES}", hint="spread the files over directories")
        counts[path] = count
    return counts


def _clusters_needed(tree: Tree, counts: dict[bytes, int], cluster_size: int,
                     fat_bits: int) -> int:
    total = 0
    for entry in tree:
        if entry.type is EntryType.REGULAR:
            total += -(-entry.size // cluster_size)
        elif entry.path or fat_bits == 32:
            total += max(1, -(-counts[entry.path] * DIR_ENTRY_SIZE // cluster_size))
    return total


def _slack(clusters: int) -> int:
    """Free clusters "min" leaves: a sixteenth of what the tree uses, and 16 more."""
    return clusters // 16 + 16


def _geometry(tree: Tree, counts: dict[bytes, int], options: ImageOptions,
              fat_bits: int | None) -> tuple[Geometry, int, int]:
    """(geometry, image size, clusters used) for the given or smallest size."""
    root_entries = max(DEFAULT_ROOT_ENTRIES, -(-counts[b""] // 16) * 16)
    if options.size is not None:
        size = options.size
        geometry = choose(size, fat_bits=fat_bits, root_entries=root_entries)
        kind = f"FAT{fat_bits}" if fat_bits else "FAT"
        if geometry is None or (geometry.fat_bits == 32
                                and geometry.cluster_count < MIN_CLUST_32):
            raise ImageError(f"vfat: no {kind} file system fits in {size} bytes",
                             hint='give another size, or size = "min"')
        need = _clusters_needed(tree, counts, geometry.cluster_size, geometry.fat_bits)
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
        need = _clusters_needed(tree, counts, geometry.cluster_size, geometry.fat_bits)
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
    names = _check_entries(tree)
    counts = _entry_counts(tree, names, label)
    geometry, size, used = _geometry(tree, counts, options, fat_bits)
    extents: dict[bytes, Extent] = {}
    files = []
    next_cluster = 2
    for entry in tree:
        if entry.type is EntryType.REGULAR:
            count = -(-entry.size // geometry.cluster_size)
            if count:
                files.append(entry)
        elif entry.path or geometry.fat_bits == 32:
            count = max(1, -(-counts[entry.path] * DIR_ENTRY_SIZE // geometry.cluster_size))
        else:
            continue
        extents[entry.path] = Extent(next_cluster if count else 0, count)
        next_cluster += count
    directories = {path: _directory_bytes(tree, path, stored, extents, geometry, label,
                                          options.epoch)
                   for path, stored in names.items()}
    return Layout(geometry, size, extents, tuple(files), directories, used, label)


def _short_entry(name: bytes, attr: int, case_bits: int, stamp: tuple[int, int],
                 cluster: int, size: int) -> bytes:
    date, time = stamp
    return MSDOS_DIR_ENTRY.pack(name, attr, case_bits, 0, time, date, date, cluster >> 16,
                                time, date, cluster & 0xFFFF, size)


def _directory_bytes(tree: Tree, path: bytes, stored: list[DirName],
                     extents: dict[bytes, Extent], geometry: Geometry, label: bytes | None,
                     epoch: int) -> bytes:
    entry = tree.get(path)
    assert entry is not None
    parts = []
    if path:
        stamp = _stamp(entry, epoch)
        parent = extents.get(entry.parent, Extent(0, 0)).first if entry.parent else 0
        parts.append(_short_entry(b".".ljust(11), ATTR_DIR, 0, stamp, extents[path].first, 0))
        parts.append(_short_entry(b"..".ljust(11), ATTR_DIR, 0, stamp, parent, 0))
    elif label is not None:
        stamp = fat_time(max(epoch, FAT_FIRST))
        parts.append(_short_entry(label, ATTR_VOLUME, 0, stamp, 0, 0))
    for child, name in zip(tree.children(path), stored, strict=True):
        parts.extend(name.slots)
        extent = extents.get(child.path, Extent(0, 0))
        if child.type is EntryType.DIRECTORY:
            attr, size = ATTR_DIR, 0
        else:
            attr, size = ATTR_ARCH | (0 if child.mode & 0o222 else ATTR_RO), child.size
        parts.append(_short_entry(name.short, attr, name.case_bits, _stamp(child, epoch),
                                  extent.first, size))
    raw = b"".join(parts)
    if path or geometry.fat_bits == 32:
        room = extents[path].count * geometry.cluster_size
    else:
        room = geometry.root_entries * DIR_ENTRY_SIZE
    return raw + bytes(room - len(raw))
