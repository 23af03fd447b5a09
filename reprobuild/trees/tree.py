"""The canonical file-tree model every image writer and reader shares.

A :class:`Tree` is a set of :class:`Entry` values keyed by their path (bytes, relative,
no leading slash; the root directory is ``b""``). It owns no file data: regular files
carry a :class:`Content` reference whose bytes are streamed from a :class:`ContentSource`
(a store file, an image, a tar member spooled to disk, or bytes in memory).

Everything a writer needs to be deterministic lives here: children are listed in
bytewise name order, xattrs are sorted, hardlinks are explicit entries that point at a
primary regular file, and no value depends on the host that made the tree.
"""

from __future__ import annotations

import enum
import io
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import BinaryIO, Protocol

import blake3

from reprobuild.errors import ImageError

CHUNK = 1 << 20
"""Read size when streaming file contents."""

ZERO_BLAKE3 = blake3.blake3(b"").digest()


class EntryType(enum.Enum):
    """The kind of a tree entry; the values are stable and used in serialisations."""

    REGULAR = "regular"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"
    SOCKET = "socket"


S_IFMT_OF_TYPE: dict[EntryType, int] = {
    EntryType.REGULAR: stat.S_IFREG,
    EntryType.DIRECTORY: stat.S_IFDIR,
    EntryType.SYMLINK: stat.S_IFLNK,
    EntryType.HARDLINK: stat.S_IFREG,
    EntryType.CHAR: stat.S_IFCHR,
    EntryType.BLOCK: stat.S_IFBLK,
    EntryType.FIFO: stat.S_IFIFO,
    EntryType.SOCKET: stat.S_IFSOCK,
}


class ContentSource(Protocol):
    """Where the bytes of a regular file come from."""

    def open(self) -> BinaryIO:
        """Open the bytes for reading from offset 0."""
        ...


@dataclass(frozen=True)
class FileSource:
    """File bytes read from a path on disk (a store file, a spooled tar member)."""

    path: bytes

    def open(self) -> BinaryIO:
        return open(self.path, "rb")


@dataclass(frozen=True)
class BytesSource:
    """File bytes held in memory (small files, overrides, tests)."""

    data: bytes

    def open(self) -> BinaryIO:
        return io.BytesIO(self.data)


@dataclass(frozen=True)
class Content:
    """A regular file's bytes: their size and where to stream them from.

    The blake3 digest is computed on first use (or given when already known, e.g. from
    the store), so building a tree does not read every file twice.
    """

    size: int
    source: ContentSource = field(compare=False, repr=False)
    known_blake3: bytes | None = field(default=None, compare=False, repr=False)

    @cached_property
    def blake3(self) -> bytes:
        if self.known_blake3 is not None:
            return self.known_blake3
        hasher = blake3.blake3()
        size = 0
        for chunk in self.chunks():
            hasher.update(chunk)
            size += len(chunk)
        if size != self.size:
            raise ImageError(
                f"file content changed while reading: expected {self.size} bytes, got {size}",
                hint="do not modify the source tree during a build",
            )
        return hasher.digest()

    def chunks(self, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """Yield the file's bytes in order, ``chunk_size`` at a time."""
        with self.source.open() as stream:
            while True:
                chunk = stream.read(chunk_size)
                if not chunk:
                    return
                yield chunk

    def read(self) -> bytes:
        """The whole content in memory; only for small files (symlink-sized, tests)."""
        return b"".join(self.chunks())

    @staticmethod
    def from_bytes(data: bytes) -> Content:
        return Content(len(data), BytesSource(data), blake3.blake3(data).digest())


@dataclass(frozen=True)
class Entry:
    """One file, directory, link or special file of a tree.

    ``mode`` holds only the permission bits (``0o7777``); the type is ``type``.
    For ``HARDLINK`` entries ``target`` is the path of the primary regular file; for
    ``SYMLINK`` entries it is the link target. ``mtime_ns`` is nanoseconds since the epoch.
    """

    path: bytes
    type: EntryType
    mode: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    content: Content | None = None
    target: bytes | None = None
    rdev_major: int = 0
    rdev_minor: int = 0

    @property
    def name(self) -> bytes:
        return self.path.rsplit(b"/", 1)[-1]

    @property
    def parent(self) -> bytes:
        return self.path.rsplit(b"/", 1)[0] if b"/" in self.path else b""

    @property
    def size(self) -> int:
        return self.content.size if self.content is not None else 0

    @property
    def st_mode(self) -> int:
        """Type and permission bits as in ``struct stat``."""
        return S_IFMT_OF_TYPE[self.type] | self.mode

    def display(self) -> str:
        return "/" + self.path.decode("utf-8", "backslashreplace")


def path_key(path: bytes) -> tuple[bytes, ...]:
    """Canonical order: depth-first, parents before children, siblings bytewise."""
    return tuple(path.split(b"/")) if path else ()


def check_relative_path(path: bytes, what: str) -> bytes:
    """Normalise a member name to the tree's relative form, refusing hostile names."""
    if path.startswith(b"/"):
        raise ImageError(
            f"{what}: absolute member name {path!r} is refused",
            hint="archive members and tree paths must be relative",
        )
    parts = [p for p in path.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise ImageError(
            f"{what}: member name {path!r} contains '..'",
            hint="refusing a path that could escape the tree",
        )
    if any(b"\0" in p for p in parts):
        raise ImageError(f"{what}: member name {path!r} contains a NUL byte")
    return b"/".join(parts)


class Tree:
    """A validated set of entries with a root directory.

    Invariants kept by :meth:`add`: every entry's parent exists and is a directory, no path
    appears twice, and a hardlink's target is an existing regular file.
    """

    def __init__(self, root: Entry | None = None) -> None:
        root = root or Entry(b"", EntryType.DIRECTORY, 0o755)
        if root.path != b"" or root.type is not EntryType.DIRECTORY:
            raise ImageError("the root of a tree must be a directory with path ''")
        self._entries: dict[bytes, Entry] = {b"": root}
        self._children: dict[bytes, list[bytes]] = {b"": []}
        self._sorted: list[Entry] | None = None

    # -- building -------------------------------------------------------------------
    def add(self, entry: Entry, *, replace_existing: bool = False) -> None:
        """Add an entry; its parent directory must already be present."""
        if entry.path == b"":
            if entry.type is not EntryType.DIRECTORY:
                raise ImageError("the root of a tree must be a directory")
            self._entries[b""] = entry
            self._sorted = None
            return
        if entry.path in self._entries:
            if not replace_existing:
                raise ImageError(
                    f"duplicate path {entry.display()} in the tree",
                    hint="each path may appear only once in an archive or tree",
                )
            old = self._entries[entry.path]
            if old.type is EntryType.DIRECTORY and entry.type is not EntryType.DIRECTORY:
                self.remove(entry.path)
                return self.add(entry)
            self._entries[entry.path] = entry
            self._sorted = None
            return
        parent = self._entries.get(entry.parent)
        if parent is None:
            raise ImageError(
                f"{entry.display()}: parent directory /{entry.parent.decode(errors='replace')}"
                " is missing"
            )
        if parent.type is not EntryType.DIRECTORY:
            raise ImageError(
                f"{entry.display()}: parent {parent.display()} is a {parent.type.value},"
                " not a directory (a member through a symlink is refused)"
            )
        if entry.type is EntryType.HARDLINK:
            primary = self._entries.get(entry.target or b"")
            if primary is None or primary.type is not EntryType.REGULAR:
                raise ImageError(
                    f"{entry.display()}: hardlink target {entry.target!r} is missing or"
                    " not a regular file",
                    hint="a hardlink must point at a regular file that comes before it",
                )
        if entry.type is EntryType.REGULAR and entry.content is None:
            entry = replace(entry, content=Content.from_bytes(b""))
        self._entries[entry.path] = entry
        self._children[entry.parent].append(entry.path)
        if entry.type is EntryType.DIRECTORY:
            self._children[entry.path] = []
        self._sorted = None

    def remove(self, path: bytes) -> None:
        """Remove an entry and, for a directory, everything under it."""
        entry = self._entries.pop(path)
        if entry.type is EntryType.DIRECTORY:
            for child in list(self._children.pop(path, [])):
                if child in self._entries:
                    self.remove(child)
        siblings = self._children.get(entry.parent)
        if siblings is not None and path in siblings:
            siblings.remove(path)
        # Hardlinks whose primary vanished: promote the first remaining link.
        if entry.type is EntryType.REGULAR:
            links = [e for e in self._entries.values()
                     if e.type is EntryType.HARDLINK and e.target == path]
            if links:
                links.sort(key=lambda e: path_key(e.path))
                first = links[0]
                self._entries[first.path] = replace(
                    entry, path=first.path)
                for other in links[1:]:
                    self._entries[other.path] = replace(other, target=first.path)
        self._sorted = None

    def replace_entry(self, entry: Entry) -> None:
        """Swap the metadata of an existing entry (same path)."""
        if entry.path not in self._entries:
            raise ImageError(f"{entry.display()} is not in the tree")
        self.add(entry, replace_existing=True)

    # -- reading --------------------------------------------------------------------
    @property
    def root(self) -> Entry:
        return self._entries[b""]

    def get(self, path: bytes) -> Entry | None:
        return self._entries.get(path)

    def __contains__(self, path: object) -> bool:
        return path in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        """Entries in canonical order (root first, depth-first, siblings bytewise)."""
        if self._sorted is None:
            self._sorted = sorted(self._entries.values(), key=lambda e: path_key(e.path))
        return iter(self._sorted)

    def children(self, path: bytes) -> list[Entry]:
        """The entries directly inside directory ``path``, sorted bytewise by name."""
        names = sorted(self._children.get(path, []), key=lambda p: p.rsplit(b"/", 1)[-1])
        return [self._entries[p] for p in names]

    def hardlink_groups(self) -> dict[bytes, list[bytes]]:
        """Primary path -> all paths of that inode (primary first, then links sorted)."""
        groups: dict[bytes, list[bytes]] = {}
        for entry in self:
            if entry.type is EntryType.HARDLINK:
                assert entry.target is not None
                groups.setdefault(entry.target, [entry.target]).append(entry.path)
        return groups

    def resolve(self, entry: Entry) -> Entry:
        """For a hardlink, the primary regular entry; otherwise the entry itself."""
        if entry.type is EntryType.HARDLINK:
            assert entry.target is not None
            return self._entries[entry.target]
        return entry

    def total_content_size(self) -> int:
        return sum(e.size for e in self._entries.values() if e.type is EntryType.REGULAR)

    # -- normalising ----------------------------------------------------------------
    def normalized(self, *, epoch: int | None) -> Tree:
        """A copy with mtimes clamped to ``epoch`` (seconds) and xattrs sorted."""
        clamp = None if epoch is None else epoch * 1_000_000_000
        out = Tree(_normalize_entry(self.root, clamp))
        for entry in self:
            if entry.path:
                out.add(_normalize_entry(entry, clamp))
        return out


def _normalize_entry(entry: Entry, clamp_ns: int | None) -> Entry:
    mtime = entry.mtime_ns if clamp_ns is None else min(entry.mtime_ns, clamp_ns)
    return replace(entry, mtime_ns=mtime, xattrs=sort_xattrs(entry.xattrs))


def sort_xattrs(xattrs: Iterable[tuple[bytes, bytes]]) -> tuple[tuple[bytes, bytes], ...]:
    """Xattrs in canonical (bytewise name) order; duplicates are an error."""
    ordered = tuple(sorted(xattrs))
    names = [n for n, _ in ordered]
    if len(set(names)) != len(names):
        raise ImageError(f"duplicate xattr names in {names!r}")
    return ordered


# -- building a tree from a directory on disk --------------------------------------------
def tree_from_directory(
    root: str | bytes | os.PathLike[str],
    *,
    epoch: int | None = None,
    preserve_owner: bool = False,
    preserve_mtime: bool = False,
    read_xattrs: bool = False,
    detect_hardlinks: bool = True,
    file_hook: Callable[[bytes, os.stat_result], Content | None] | None = None,
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
    default_mtime = (epoch or 0) * 1_000_000_000

    def meta(path: bytes, st: os.stat_result) -> dict[str, object]:
        xattrs: tuple[tuple[bytes, bytes], ...] = ()
        if read_xattrs:
            try:
                names = os.listxattr(path, follow_symlinks=False)
            except OSError:
                names = []
            xattrs = sort_xattrs(
                (os.fsencode(n), os.getxattr(path, n, follow_symlinks=False)) for n in names
            )
        mtime = st.st_mtime_ns if preserve_mtime else default_mtime
        if preserve_mtime and epoch is not None:
            mtime = min(mtime, epoch * 1_000_000_000)
        return {
            "mode": stat.S_IMODE(st.st_mode),
            "uid": st.st_uid if preserve_owner else 0,
            "gid": st.st_gid if preserve_owner else 0,
            "mtime_ns": mtime,
            "xattrs": xattrs,
        }

    tree = Tree(Entry(b"", EntryType.DIRECTORY, **meta(top, st)))  # type: ignore[arg-type]
    seen_inodes: dict[tuple[int, int], bytes] = {}
    stack = [b""]
    while stack:
        rel_dir = stack.pop()
        abs_dir = top + b"/" + rel_dir if rel_dir else top
        names = sorted(os.listdir(abs_dir))
        subdirs = []
        for name in names:
            rel = rel_dir + b"/" + name if rel_dir else name
            path = abs_dir + b"/" + name
            st = os.lstat(path)
            fields = meta(path, st)
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                tree.add(Entry(rel, EntryType.DIRECTORY, **fields))  # type: ignore[arg-type]
                subdirs.append(rel)
            elif stat.S_ISREG(mode):
                key = (st.st_dev, st.st_ino)
                if detect_hardlinks and st.st_nlink > 1 and key in seen_inodes:
                    tree.add(Entry(rel, EntryType.HARDLINK, target=seen_inodes[key],
                                   **fields))  # type: ignore[arg-type]
                    continue
                if detect_hardlinks and st.st_nlink > 1:
                    seen_inodes[key] = rel
                content = file_hook(path, st) if file_hook else None
                if content is None:
                    content = Content(st.st_size, FileSource(path))
                tree.add(Entry(rel, EntryType.REGULAR, content=content,
                               **fields))  # type: ignore[arg-type]
            elif stat.S_ISLNK(mode):
                tree.add(Entry(rel, EntryType.SYMLINK, target=os.readlink(path),
                               **fields))  # type: ignore[arg-type]
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                kind = EntryType.CHAR if stat.S_ISCHR(mode) else EntryType.BLOCK
                tree.add(Entry(rel, kind, rdev_major=os.major(st.st_rdev),
                               rdev_minor=os.minor(st.st_rdev), **fields))  # type: ignore[arg-type]
            elif stat.S_ISFIFO(mode):
                tree.add(Entry(rel, EntryType.FIFO, **fields))  # type: ignore[arg-type]
            elif stat.S_ISSOCK(mode):
                tree.add(Entry(rel, EntryType.SOCKET, **fields))  # type: ignore[arg-type]
            else:
                raise ImageError(f"{path.decode(errors='replace')}: unknown file type")
        # Depth-first in sorted order; the hardlink primary is then the first path in
        # canonical order, whatever the order the directory was created in.
        stack.extend(reversed(subdirs))
    return _canonical_hardlinks(tree)


def _canonical_hardlinks(tree: Tree) -> Tree:
    """Make every hardlink group's primary the first path in canonical order."""
    groups = tree.hardlink_groups()
    if not groups:
        return tree
    for primary, paths in groups.items():
        first = min(paths, key=path_key)
        if first == primary:
            continue
        primary_entry = tree.get(primary)
        assert primary_entry is not None
        # Inode metadata (mode, owner, time, xattrs) travels with the content.
        tree._entries[first] = replace(primary_entry, path=first)
        tree._entries[primary] = replace(
            tree._entries[primary], type=EntryType.HARDLINK, target=first, content=None)
        for other in paths:
            if other not in (first, primary):
                tree._entries[other] = replace(tree._entries[other], target=first)
    tree._sorted = None
    return tree
