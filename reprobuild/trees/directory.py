"""A directory on disk as a :class:`~reprobuild.trees.tree.Tree`, independent of the
host's quirks: children sorted, hardlink groups made canonical by the one mechanism that
does it, :class:`~reprobuild.trees.builder.TreeBuilder`."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from reprobuild.errors import ImageError
from reprobuild.trees.builder import TreeBuilder
from reprobuild.trees.tree import Content, Entry, EntryType, FileSource, Tree, sort_xattrs

FileHook = Callable[[bytes, os.stat_result], Content | None]


def tree_from_directory(
    root: str | bytes | os.PathLike[str],
    *,
    epoch: int | None = None,
    preserve_owner: bool = False,
    preserve_mtime: bool = False,
    read_xattrs: bool = False,
    detect_hardlinks: bool = True,
    file_hook: FileHook | None = None,
) -> Tree:
    """Describe a directory on disk as a tree, independent of the host's quirks.

    By default this is how a store output becomes a tree: owner and group root, mtimes
    equal to ``epoch`` (or 0), no xattrs, permission bits as found (the store has
    canonicalised them). ``preserve_owner``, ``preserve_mtime`` and ``read_xattrs``
    read back a mounted image faithfully. Directory order never matters: children are
    sorted. Hardlinks (same device and inode) become HARDLINK entries pointing at the
    first path in canonical order when ``detect_hardlinks`` is set.
    """
    top = os.fsencode(root)
    st = os.lstat(top)
    if not stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{top.decode(errors='replace')} is not a directory")
    reader = _MetadataReader(epoch, preserve_owner=preserve_owner,
                             preserve_mtime=preserve_mtime, read_xattrs=read_xattrs)
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
            entry = _entry(reader, rel, path, st, file_hook)
            builder.add(entry, shown)
            if entry.type is EntryType.DIRECTORY:
                subdirs.append(rel)
        stack.extend(reversed(subdirs))
    return builder.build()


def _entry(reader: _MetadataReader, rel: bytes, path: bytes, st: os.stat_result,
           file_hook: FileHook | None) -> Entry:
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return reader.entry(rel, path, st, EntryType.DIRECTORY)
    if stat.S_ISREG(mode):
        content = file_hook(path, st) if file_hook else None
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

    def entry(self, rel: bytes, path: bytes, st: os.stat_result, kind: EntryType, *,
              content: Content | None = None, target: bytes | None = None,
              rdev_major: int = 0, rdev_minor: int = 0) -> Entry:
        xattrs: tuple[tuple[bytes, bytes], ...] = ()
        if self.read_xattrs:
            try:
                names = os.listxattr(path, follow_symlinks=False)
            except OSError:
                names = []
            xattrs = sort_xattrs(
                (os.fsencode(n), os.getxattr(path, n, follow_symlinks=False)) for n in names)
        mtime = st.st_mtime_ns if self.preserve_mtime else (self.epoch or 0) * 1_000_000_000
        if self.preserve_mtime and self.epoch is not None:
            mtime = min(mtime, self.epoch * 1_000_000_000)
        return Entry(rel, kind, stat.S_IMODE(st.st_mode),
                     st.st_uid if self.preserve_owner else 0,
                     st.st_gid if self.preserve_owner else 0, mtime, xattrs,
                     target=target, rdev_major=rdev_major, rdev_minor=rdev_minor,
                     content=content)
