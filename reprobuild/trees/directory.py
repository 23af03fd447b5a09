"""A directory on disk as a :class:`~reprobuild.trees.tree.Tree`, independent of the
host's quirks: children sorted, hardlink groups made canonical by the one mechanism that
does it, :class:`~reprobuild.trees.builder.TreeBuilder`."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeAlias

from reprobuild import native
from reprobuild.errors import ImageError
from reprobuild.trees.builder import TreeBuilder
from reprobuild.trees.tree import Content, Entry, EntryType, FileSource, Tree, sort_xattrs

if TYPE_CHECKING:
    from reprobuild.trees._dirscan import stat as _CompiledStat

FileHook = Callable[[bytes, os.stat_result], Content | None]
FoundFile = Callable[[bytes, int], None]
"""Told each regular file the walk keeps, as it is found: its path on disk and size."""


Lstat: TypeAlias = "os.stat_result | _CompiledStat"
"""An entry's lstat as the walks read it: from ``os.lstat``, or the compiled scan's
lighter ``stat`` with the same values in the fields the walks read."""


def _scan_python(path: bytes) -> list[tuple[bytes, Lstat]]:
    """The names in the directory ``path`` in bytewise order, each with its lstat
    (looked up in the directory's descriptor, not through the whole path)."""
    names = sorted(os.listdir(path))  # bytes: listing a descriptor would give str
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return [(name, os.lstat(name, dir_fd=fd)) for name in names]
    finally:
        os.close(fd)


# The compiled scan (_dirscan.c): the same listing without an os.stat_result per name.
_DIRSCAN = native.load("reprobuild.trees._dirscan")


def tree_from_directory(
    root: str | bytes | os.PathLike[str],
    *,
    epoch: int | None = None,
    preserve_owner: bool = False,
    preserve_mtime: bool = False,
    read_xattrs: bool = False,
    detect_hardlinks: bool = True,
    file_hook: FileHook | None = None,
    found: FoundFile | None = None,
) -> Tree:
    """Describe a directory on disk as a tree, independent of the host's quirks.

    By default this is how a store output becomes a tree: owner and group root, mtimes
    equal to ``epoch`` (or 0), no xattrs, permission bits as found (the store has
    canonicalised them). ``preserve_owner``, ``preserve_mtime`` and ``read_xattrs``
    read back a mounted image faithfully. Directory order never matters: children are
    sorted. Hardlinks (same device and inode) become HARDLINK entries pointing at the
    first path in canonical order when ``detect_hardlinks`` is set. ``found`` is
    called with the path on disk and the size of each regular file read from disk (not
    for a hardlink to one already found), in the walk's order, while the walk goes on:
    a writer can start reading files before the tree is complete.
    """
    top = os.fsencode(root)
    st = os.lstat(top)
    if not stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{top.decode(errors='replace')} is not a directory")
    if not (preserve_owner or preserve_mtime or read_xattrs or file_hook):
        return _canonical_walk(top, st, (epoch or 0) * 1_000_000_000,
                               detect_hardlinks=detect_hardlinks, found=found)
    reader = _MetadataReader(epoch, preserve_owner=preserve_owner,
                             preserve_mtime=preserve_mtime, read_xattrs=read_xattrs)
    if file_hook is None:
        return _walk_as_found(top, st, reader, detect_hardlinks=detect_hardlinks,
                              found=found)
    builder = TreeBuilder(what=top.decode(errors="replace"))
    builder.add(reader.entry(b"", top, st, EntryType.DIRECTORY), "/")
    seen_inodes: dict[tuple[int, int], bytes] = {}
    stack = [b""]
    while stack:
        rel_dir = stack.pop()
        abs_dir = top + b"/" + rel_dir if rel_dir else top
        subdirs = []
        for name in sorted(os.listdir(abs_dir)):
            rel = rel_dir + b"/" + name if rel_dir else name
            path = abs_dir + b"/" + name
            st = os.lstat(path)
            shown = "/" + rel.decode(errors="replace")
            key = (st.st_dev, st.st_ino)
            if stat.S_ISREG(st.st_mode) and detect_hardlinks and st.st_nlink > 1:
                if key in seen_inodes:
                    builder.link(rel, seen_inodes[key], shown, replace_existing=False)
                    continue
                seen_inodes[key] = rel
            hooked = file_hook(path, st) if stat.S_ISREG(st.st_mode) else None
            entry = _entry(reader, rel, path, st, hooked)
            if found is not None and entry.type is EntryType.REGULAR:
                source = entry.content.source if entry.content is not None else None
                if isinstance(source, FileSource):
                    found(source.path, st.st_size)
            builder.add(entry, shown)
            if entry.type is EntryType.DIRECTORY:
                subdirs.append(rel)
        stack.extend(reversed(subdirs))
    return builder.build()


def _sorted_depth_first(top: bytes) -> Iterator[tuple[bytes, bytes, bytes, Lstat]]:
    """(path in the tree + "/" or b"", path on disk + "/", name, lstat) for everything
    below ``top``, depth-first with each directory's names sorted: a directory's
    entries come right after it, so the order is canonical. Each directory is listed
    when the walk reaches it, by the compiled scan when it is built."""
    scan = _DIRSCAN.scan if _DIRSCAN is not None else _scan_python
    stack = [(b"", top + b"/", iter(scan(top)))]
    while stack:
        prefix, disk_prefix, listing = stack[-1]
        for name, st in listing:
            yield prefix, disk_prefix, name, st
            if st.st_mode & 0o170000 == stat.S_IFDIR:
                path = disk_prefix + name
                stack.append((prefix + name + b"/", path + b"/", iter(scan(path))))
                break  # its entries come next, then the rest of this directory's
        else:
            stack.pop()


def _canonical_walk(top: bytes, top_st: os.stat_result, mtime_ns: int, *,
                    detect_hardlinks: bool, found: FoundFile | None) -> Tree:
    """The tree of a store output, made in one pass in its final form.

    Such a tree is normal as found (owners root, every mtime ``mtime_ns``, no xattrs),
    and walking it depth-first with each directory's names sorted meets the entries in
    canonical order, hardlinks after their first path: so each entry is made once,
    as the tree keeps it (what :class:`TreeBuilder` and :meth:`Tree.normalized` would
    make of the same walk, at a fraction of the cost on trees of many small files).
    """
    directory, regular, hardlink = EntryType.DIRECTORY, EntryType.REGULAR, EntryType.HARDLINK
    root = Entry(b"", directory, stat.S_IMODE(top_st.st_mode), 0, 0, mtime_ns)
    entries: list[Entry] = []
    append = entries.append
    first_path: dict[tuple[int, int], Entry] = {}
    for prefix, disk_prefix, name, st in _sorted_depth_first(top):
        mode = st.st_mode
        kind = mode & 0o170000
        if kind == stat.S_IFREG:
            path = disk_prefix + name
            content = Content(st.st_size, FileSource(path))
            if detect_hardlinks and st.st_nlink > 1:
                inode = (st.st_dev, st.st_ino)
                primary = first_path.get(inode)
                if primary is not None:
                    append(Entry(prefix + name, hardlink, primary.mode, 0, 0,
                                 mtime_ns, target=primary.path))
                    continue
                first_path[inode] = Entry(prefix + name, regular, mode & 0o7777, 0,
                                          0, mtime_ns, (), content)
                append(first_path[inode])
            else:
                append(Entry(prefix + name, regular, mode & 0o7777, 0, 0, mtime_ns,
                             (), content))
            if found is not None:
                found(path, st.st_size)
        elif kind == stat.S_IFDIR:
            append(Entry(prefix + name, directory, mode & 0o7777, 0, 0, mtime_ns))
        else:
            append(_special(prefix + name, disk_prefix + name, st, mtime_ns))
    tree = Tree.try_canonical(root, entries, clamp_ns=mtime_ns)
    assert tree is not None, "a sorted depth-first walk is in canonical order"
    return tree


def _walk_as_found(top: bytes, top_st: os.stat_result, reader: _MetadataReader, *,
                   detect_hardlinks: bool, found: FoundFile | None) -> Tree:
    """The tree of a directory read back with its owners, mtimes or xattrs, made in one
    pass as :func:`_canonical_walk` makes a store output's: the entries, in canonical
    order, are those :class:`TreeBuilder` makes of the general walk (a hardlink carries
    its primary's metadata, as the builder gives it)."""
    regular, directory, hardlink = EntryType.REGULAR, EntryType.DIRECTORY, EntryType.HARDLINK
    entry_of = reader.entry
    root = entry_of(b"", top, top_st, directory)
    entries: list[Entry] = []
    append = entries.append
    first_path: dict[tuple[int, int], Entry] = {}
    for prefix, disk_prefix, name, st in _sorted_depth_first(top):
        kind = st.st_mode & 0o170000
        rel, path = prefix + name, disk_prefix + name
        if kind == stat.S_IFREG:
            if detect_hardlinks and st.st_nlink > 1:
                inode = (st.st_dev, st.st_ino)
                primary = first_path.get(inode)
                if primary is not None:
                    append(Entry(rel, hardlink, primary.mode, primary.uid,
                                 primary.gid, primary.mtime_ns, primary.xattrs,
                                 target=primary.path))
                    continue
            entry = entry_of(rel, path, st, regular,
                             content=Content(st.st_size, FileSource(path)))
            if detect_hardlinks and st.st_nlink > 1:
                first_path[inode] = entry
            append(entry)
            if found is not None:
                found(path, st.st_size)
        elif kind == stat.S_IFDIR:
            append(entry_of(rel, path, st, directory))
        else:
            append(_entry(reader, rel, path, st, None))
    tree = Tree.try_canonical(root, entries)
    assert tree is not None, "a sorted depth-first walk is in canonical order"
    return tree


def _special(rel: bytes, path: bytes, st: Lstat, mtime_ns: int) -> Entry:
    """A symlink, device, fifo or socket of a store output as the tree holds it."""
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return Entry(rel, EntryType.SYMLINK, stat.S_IMODE(mode), 0, 0, mtime_ns,
                     target=os.readlink(path))
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return Entry(rel, EntryType.CHAR if stat.S_ISCHR(mode) else EntryType.BLOCK,
                     stat.S_IMODE(mode), 0, 0, mtime_ns, rdev_major=os.major(st.st_rdev),
                     rdev_minor=os.minor(st.st_rdev))
    if stat.S_ISFIFO(mode):
        return Entry(rel, EntryType.FIFO, stat.S_IMODE(mode), 0, 0, mtime_ns)
    if stat.S_ISSOCK(mode):
        return Entry(rel, EntryType.SOCKET, stat.S_IMODE(mode), 0, 0, mtime_ns)
    raise ImageError(f"/{rel.decode(errors='replace')}: unknown file type")


def _entry(reader: _MetadataReader, rel: bytes, path: bytes, st: Lstat,
           content: Content | None) -> Entry:
    """The entry of ``path``; ``content`` is a regular file's, when a hook gave one."""
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return reader.entry(rel, path, st, EntryType.DIRECTORY)
    if stat.S_ISREG(mode):
        if content is None:
            content = Content(st.st_size, FileSource(path))
        return reader.entry(rel, path, st, EntryType.REGULAR, content=content)
    if stat.S_ISLNK(mode):
        return reader.entry(rel, path, st, EntryType.SYMLINK, target=os.readlink(path))
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = EntryType.CHAR if stat.S_ISCHR(mode) else EntryType.BLOCK
        return reader.entry(rel, path, st, kind, rdev_major=os.major(st.st_rdev),
                            rdev_minor=os.minor(st.st_rdev))
    if stat.S_ISFIFO(mode):
        return reader.entry(rel, path, st, EntryType.FIFO)
    if stat.S_ISSOCK(mode):
        return reader.entry(rel, path, st, EntryType.SOCKET)
    raise ImageError(f"{path.decode(errors='replace')}: unknown file type")


class _MetadataReader:
    """Mode, owner, mtime and xattrs of a path, as the options of the walk ask."""

    def __init__(self, epoch: int | None, *, preserve_owner: bool, preserve_mtime: bool,
                 read_xattrs: bool) -> None:
        self.epoch = epoch
        self.preserve_owner = preserve_owner
        self.preserve_mtime = preserve_mtime
        self.read_xattrs = read_xattrs

    def entry(self, rel: bytes, path: bytes, st: Lstat, kind: EntryType, *,
              content: Content | None = None, target: bytes | None = None,
              rdev_major: int = 0, rdev_minor: int = 0) -> Entry:
        xattrs: tuple[tuple[bytes, bytes], ...] = ()
        if self.read_xattrs:
            try:
                names = os.listxattr(path, follow_symlinks=False)
            except OSError:
                names = []
            if names:  # most files have none
                xattrs = sort_xattrs((os.fsencode(n), os.getxattr(path, n, follow_symlinks=False))
                                     for n in names)
        mtime = st.st_mtime_ns if self.preserve_mtime else (self.epoch or 0) * 1_000_000_000
        if self.preserve_mtime and self.epoch is not None:
            mtime = min(mtime, self.epoch * 1_000_000_000)
        return Entry(rel, kind, stat.S_IMODE(st.st_mode),
                     st.st_uid if self.preserve_owner else 0,
                     st.st_gid if self.preserve_owner else 0, mtime, xattrs,
                     target=target, rdev_major=rdev_major, rdev_minor=rdev_minor,
                     content=content)
