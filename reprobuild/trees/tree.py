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
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields, replace
from itertools import pairwise

from reprobuild.errors import ImageError

# Content and its sources live in trees.content; their names stay importable from here.
from reprobuild.trees.content import CHUNK as CHUNK
from reprobuild.trees.content import ZERO_BLAKE3 as ZERO_BLAKE3
from reprobuild.trees.content import BytesSource as BytesSource
from reprobuild.trees.content import Content as Content
from reprobuild.trees.content import ContentReader as ContentReader
from reprobuild.trees.content import ContentSource as ContentSource
from reprobuild.trees.content import FileSource as FileSource
from reprobuild.trees.content import slot_setters


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


@dataclass(frozen=True, slots=True, init=False)
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

    def __init__(self, path: bytes, type: EntryType, mode: int, uid: int = 0,
                 gid: int = 0, mtime_ns: int = 0,
                 xattrs: tuple[tuple[bytes, bytes], ...] = (), content: Content | None = None,
                 target: bytes | None = None, rdev_major: int = 0,
                 rdev_minor: int = 0) -> None:
        # Through the slots' descriptors: see slot_setters.
        _set_path(self, path)
        _set_type(self, type)
        _set_mode(self, mode)
        _set_uid(self, uid)
        _set_gid(self, gid)
        _set_mtime_ns(self, mtime_ns)
        _set_xattrs(self, xattrs)
        _set_content(self, content)
        _set_target(self, target)
        _set_rdev_major(self, rdev_major)
        _set_rdev_minor(self, rdev_minor)

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


(_set_path, _set_type, _set_mode, _set_uid, _set_gid, _set_mtime_ns, _set_xattrs,
 _set_content, _set_target, _set_rdev_major, _set_rdev_minor) = slot_setters(
    Entry, *(f.name for f in fields(Entry)))


def _with_mtime(entry: Entry, mtime_ns: int) -> Entry:
    """``replace(entry, mtime_ns=mtime_ns)`` at a third of the cost (a tar of a tree
    newer than the epoch clamps every entry)."""
    return Entry(entry.path, entry.type, entry.mode, entry.uid, entry.gid, mtime_ns,
                 entry.xattrs, entry.content, entry.target, entry.rdev_major,
                 entry.rdev_minor)


def path_key(path: bytes) -> tuple[bytes, ...]:
    """Canonical order: depth-first, parents before children, siblings bytewise."""
    return tuple(path.split(b"/")) if path else ()


def sort_key(path: bytes) -> bytes:
    """The order of :func:`path_key` as one bytes value (cheaper to make and to hold):
    the separator becomes NUL, which no name contains and every other byte follows."""
    return path.replace(b"/", b"\0")


def canonical_relative_path(path: bytes) -> bytes | None:
    """``path`` (less a leading ``./``) when it is already in the tree's relative form -
    no empty, ``.``, ``..`` or NUL component, not absolute - else None (then ask
    :func:`check_relative_path`)."""
    body = path[2:] if path.startswith(b"./") else path
    if (body and body[0] not in b"/." and b"//" not in body and b"/." not in body
            and not body.endswith(b"/") and b"\0" not in body):
        return body
    return None


def check_relative_path(path: bytes, what: str) -> bytes:
    """Normalise a member name to the tree's relative form, refusing hostile names."""
    canonical = canonical_relative_path(path)
    if canonical is not None:
        return canonical
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
        # Made on first use by _child_index() for trees assembled by try_canonical.
        self._children: dict[bytes, list[bytes]] | None = {b"": []}
        self._sorted: list[Entry] | None = None
        # Set when known: no mtime is later than this (ns), xattrs are sorted and unique.
        self._normal_below: int | None = None

    @classmethod
    def from_canonical(cls, root: Entry, entries: Iterable[Entry]) -> Tree:
        """A tree of ``entries`` given in canonical order (as iteration yields them and
        :class:`~reprobuild.trees.builder.TreeBuilder` makes them), checked as
        :meth:`add` checks them, without sorting again."""
        tree = cls(root)
        tree._extend_canonical(entries)
        return tree

    @classmethod
    def try_canonical(cls, root: Entry, entries: Iterable[Entry], *,
                      clamp_ns: int | None = None) -> Tree | None:
        """The tree of ``entries`` when they are already what a tree holds, else None.

        For readers whose input is usually canonical (a sorted tar, a directory walked in
        order): each entry must follow the one before in canonical order, have its parent
        directory before it, and, for a hardlink, name an earlier regular file; regular
        files carry their content, xattrs are sorted and unique. Then the tree is made in
        one pass, without :meth:`add`'s bookkeeping. With ``clamp_ns``, mtimes later than
        it are clamped, so the tree is already :meth:`normalized`. On None the caller
        takes its general path (:class:`~reprobuild.trees.builder.TreeBuilder`), which
        decides what the input means and names what is wrong with it.
        """
        if root.path != b"" or root.type is not EntryType.DIRECTORY:
            return None
        if clamp_ns is not None and root.mtime_ns > clamp_ns:
            root = replace(root, mtime_ns=clamp_ns)
        if root.xattrs and not _xattrs_normal(root.xattrs):
            return None
        known: dict[bytes, Entry] = {b"": root}
        ordered = [root]
        append = ordered.append
        directory, regular, hardlink = EntryType.DIRECTORY, EntryType.REGULAR, \
            EntryType.HARDLINK
        last_key = b""
        for entry in entries:
            path = entry.path
            key = path.replace(b"/", b"\0")  # sort_key, inline: this loop is per entry
            parent = known.get(path.rpartition(b"/")[0])
            if key <= last_key or parent is None or parent.type is not directory:
                return None  # out of order, a duplicate, the root again, or no parent
            kind = entry.type
            if kind is regular:
                if entry.content is None:
                    return None
            elif kind is hardlink:
                primary = known.get(entry.target or b"")
                if primary is None or primary.type is not regular:
                    return None
            if entry.xattrs and not _xattrs_normal(entry.xattrs):
                return None
            if clamp_ns is not None and entry.mtime_ns > clamp_ns:
                entry = _with_mtime(entry, clamp_ns)
            known[path] = entry
            append(entry)
            last_key = key
        tree = cls(root)
        tree._assemble(known, ordered, normal_below=clamp_ns)
        return tree

    def _assemble(self, entries: dict[bytes, Entry], ordered: list[Entry], *,
                  normal_below: int | None) -> None:
        """Take checked entries as they are (the child index is made on first use)."""
        self._entries = entries
        self._children = None
        self._sorted = ordered
        self._normal_below = normal_below

    def _child_index(self) -> dict[bytes, list[bytes]]:
        """Paths of each directory's children (in canonical order when first made)."""
        if self._children is None:
            children: dict[bytes, list[bytes]] = {b"": []}
            directory = EntryType.DIRECTORY
            for entry in self:
                path = entry.path
                if path:
                    children[path.rpartition(b"/")[0]].append(path)
                if entry.type is directory:
                    children[path] = []
            self._children = children
        return self._children

    def _extend_canonical(self, entries: Iterable[Entry]) -> None:
        ordered = list(self)
        append = ordered.append
        known, children = self._entries, self._child_index()
        directory, regular = EntryType.DIRECTORY, EntryType.REGULAR
        last_key = sort_key(ordered[-1].path)
        for entry in entries:
            path = entry.path
            parent_path, _, _ = path.rpartition(b"/")
            parent = known.get(parent_path)
            if (parent is None or parent.type is not directory or path in known
                    or entry.type is EntryType.HARDLINK or not path):
                self._sorted = None
                self.add(entry)  # the general checks and their messages
                entry = known[path]
            else:
                if entry.type is regular and entry.content is None:
                    entry = replace(entry, content=Content.from_bytes(b""))
                known[path] = entry
                children[parent_path].append(path)
                if entry.type is directory:
                    children[path] = []
            key = sort_key(path)
            if key < last_key:
                raise ImageError(f"{entry.display()}: entries out of canonical order")
            last_key = key
            append(entry)
        self._sorted = ordered

    # -- building -------------------------------------------------------------------
    def add(self, entry: Entry, *, replace_existing: bool = False) -> None:
        """Add an entry; its parent directory must already be present."""
        if entry.path == b"":
            if entry.type is not EntryType.DIRECTORY:
                raise ImageError("the root of a tree must be a directory")
            self._entries[b""] = entry
            self._sorted = None
            self._normal_below = None
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
            self._normal_below = None
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
        children = self._child_index()
        self._entries[entry.path] = entry
        children[entry.parent].append(entry.path)
        if entry.type is EntryType.DIRECTORY:
            children[entry.path] = []
        self._sorted = None
        self._normal_below = None

    def remove(self, path: bytes) -> None:
        """Remove an entry and, for a directory, everything under it. Removing the
        primary of a hardlink group whose links stay is refused: which path then holds
        the inode is :class:`~reprobuild.trees.builder.TreeBuilder`'s decision."""
        under = path + b"/"
        doomed = {p for p in self._entries if p == path or p.startswith(under)}
        orphans = sorted(e.display() for e in self._entries.values()
                         if e.type is EntryType.HARDLINK and e.target in doomed
                         and e.path not in doomed)
        if orphans:
            raise ImageError(f"/{path.decode(errors='replace')} holds the inode of the "
                             f"hardlinks {', '.join(orphans)}",
                             hint="build the changed tree with TreeBuilder")
        self._drop(path)

    def _drop(self, path: bytes) -> None:
        children = self._child_index()
        entry = self._entries.pop(path)
        if entry.type is EntryType.DIRECTORY:
            for child in list(children.pop(path, [])):
                if child in self._entries:
                    self._drop(child)
        siblings = children.get(entry.parent)
        if siblings is not None and path in siblings:
            siblings.remove(path)
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
            self._sorted = sorted(self._entries.values(), key=lambda e: sort_key(e.path))
        return iter(self._sorted)

    def children(self, path: bytes) -> list[Entry]:
        """The entries directly inside directory ``path``, sorted bytewise by name."""
        names = sorted(self._child_index().get(path, []), key=lambda p: p.rsplit(b"/", 1)[-1])
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

    # -- normalising ----------------------------------------------------------------
    def is_normal(self, *, epoch: int | None) -> bool:
        """True when :meth:`normalized` would change nothing (no mtime after ``epoch``,
        xattrs sorted and unique)."""
        clamp = None if epoch is None else epoch * 1_000_000_000
        if self._normal_below is not None and (clamp is None or self._normal_below <= clamp):
            return True  # made normal (try_canonical with a clamp) and not changed since
        return all(_normalize_entry(entry, clamp) is entry for entry in self)

    def normalized(self, *, epoch: int | None) -> Tree:
        """A copy with mtimes clamped to ``epoch`` (seconds) and xattrs sorted."""
        clamp = None if epoch is None else epoch * 1_000_000_000
        entries = iter(self)
        next(entries)  # the root
        tree = Tree.from_canonical(_normalize_entry(self.root, clamp),
                                   (_normalize_entry(e, clamp) for e in entries))
        tree._known_normal(clamp)
        return tree

    def _known_normal(self, clamp_ns: int | None) -> None:
        self._normal_below = clamp_ns


def _normalize_entry(entry: Entry, clamp_ns: int | None) -> Entry:
    """``entry`` itself when it is already normal (the common case), else a copy."""
    mtime = entry.mtime_ns if clamp_ns is None else min(entry.mtime_ns, clamp_ns)
    xattrs = sort_xattrs(entry.xattrs) if entry.xattrs else ()
    if mtime == entry.mtime_ns and xattrs == entry.xattrs:
        return entry
    return replace(entry, mtime_ns=mtime, xattrs=xattrs)


def _xattrs_normal(xattrs: tuple[tuple[bytes, bytes], ...]) -> bool:
    """True when the names are in strictly increasing bytewise order (sorted, unique)."""
    return all(a[0] < b[0] for a, b in pairwise(xattrs))


def sort_xattrs(xattrs: Iterable[tuple[bytes, bytes]]) -> tuple[tuple[bytes, bytes], ...]:
    """Xattrs in canonical (bytewise name) order; duplicates are an error."""
    ordered = tuple(sorted(xattrs))
    names = [n for n, _ in ordered]
    if len(set(names)) != len(names):
        raise ImageError(f"duplicate xattr names in {names!r}")
    return ordered
