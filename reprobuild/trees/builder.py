"""Assemble a :class:`~reprobuild.trees.tree.Tree` from archive members, refusing hostile input.

Archives (tar streams, OCI layers, cpio) list members in any order, name hardlinks by
path, may omit parent directories and may (in OCI layers) replace or delete what a lower
layer made. :class:`TreeBuilder` keeps that mutable state and produces a canonical Tree:

* regular files are *inodes*; a hardlink member adds another path to an inode, so a
  hardlink group's primary is always the first of its paths in canonical order, and
  replacing or deleting one path of a group leaves the other paths with the old bytes
  (as unpacking an archive onto a filesystem does);
* a missing parent directory is created root:root, mode 0755, mtime ``implied_mtime_ns``
  (the epoch when loading a source); a later member for that directory sets its metadata;
* a member whose parent is not a directory (a member through a symlink) is refused;
* in a single archive a path may appear only once (``add``); ``put`` replaces lower
  layers' entries (OCI), ``remove`` deletes a path and everything under it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from reprobuild.errors import ImageError
from reprobuild.trees.tree import Entry, EntryType, Tree, sort_key


class _Link:
    """A path that names a regular-file inode (inode metadata lives in ``inodes``).

    A plain slotted class, not a dataclass: it is only made, tested with isinstance and
    read, and a dataclass costs every start-up the making of its methods."""

    __slots__ = ("inode",)

    def __init__(self, inode: int) -> None:
        self.inode = inode

    def __repr__(self) -> str:
        return f"_Link(inode={self.inode})"


def _show(path: bytes) -> str:
    return "/" + path.decode("utf-8", "backslashreplace")


class TreeBuilder:
    """Mutable archive state; :meth:`build` turns it into a canonical :class:`Tree`."""

    def __init__(self, *, what: str, implied_mtime_ns: int = 0) -> None:
        self.what = what
        self.implied_mtime_ns = implied_mtime_ns
        # path -> Entry (non-regular) or _Link (regular file, metadata in inodes)
        self.nodes: dict[bytes, Entry | _Link] = {
            b"": Entry(b"", EntryType.DIRECTORY, 0o755, mtime_ns=implied_mtime_ns)}
        self.children: dict[bytes, dict[bytes, None]] = {b"": {}}
        self.inodes: dict[int, Entry] = {}
        self.implied: set[bytes] = {b""}
        self.root_given = False
        self._next_inode = 1

    # -- queries ----------------------------------------------------------------------
    def exists(self, path: bytes) -> bool:
        return path in self.nodes

    def entry(self, path: bytes) -> Entry:
        node = self.nodes[path]
        if isinstance(node, _Link):
            inode = self.inodes[node.inode]
            return inode if inode.path == path else replace(inode, path=path)
        return node

    def is_dir(self, path: bytes) -> bool:
        node = self.nodes.get(path)
        return isinstance(node, Entry) and node.type is EntryType.DIRECTORY

    def newest_mtime_ns(self) -> int:
        """The latest mtime of any path but the root (0 for an empty tree)."""
        return max((self.entry(path).mtime_ns for path in self.nodes if path), default=0)

    # -- changes ----------------------------------------------------------------------
    def _ensure_parents(self, path: bytes, member: str) -> None:
        parent = self.nodes.get(path.rpartition(b"/")[0])
        if isinstance(parent, Entry) and parent.type is EntryType.DIRECTORY:
            return  # the common case: the parent is there
        parts = path.split(b"/")[:-1]
        current = b""
        for part in parts:
            current = current + b"/" + part if current else part
            node = self.nodes.get(current)
            if node is None:
                self._insert(Entry(current, EntryType.DIRECTORY, 0o755,
                                   mtime_ns=self.implied_mtime_ns))
                self.implied.add(current)
            elif not (isinstance(node, Entry) and node.type is EntryType.DIRECTORY):
                kind = "regular file" if isinstance(node, _Link) else node.type.value
                raise ImageError(
                    f"{self.what}: member {member!r} lies under {_show(current)}, which is a"
                    f" {kind}, not a directory",
                    hint="a member through a symlink (or a file) is refused")

    def _insert(self, entry: Entry) -> None:
        parent = entry.parent
        self.children[parent][entry.path] = None
        if entry.type is EntryType.DIRECTORY:
            self.children.setdefault(entry.path, {})
        if entry.type is EntryType.REGULAR:
            inode = self._next_inode
            self._next_inode += 1
            self.inodes[inode] = entry  # its path is the first one; build() picks the primary
            self.nodes[entry.path] = _Link(inode)
        else:
            self.nodes[entry.path] = entry

    def add(self, entry: Entry, member: str) -> None:
        """Add a member of a single archive: a path given twice is refused."""
        path = entry.path
        if path == b"":
            self._set_root(entry, member)
            return
        if path in self.nodes:
            if path in self.implied and entry.type is EntryType.DIRECTORY:
                self.implied.discard(path)
                self.nodes[path] = entry
                return
            raise ImageError(
                f"{self.what}: duplicate member {member!r} ({_show(path)} appears twice)",
                hint="each path may appear only once in an archive")
        self._ensure_parents(path, member)
        self._insert(entry)

    def put(self, entry: Entry, member: str) -> None:
        """Add or replace (an upper OCI layer over a lower one)."""
        path = entry.path
        if path == b"":
            self._set_root(entry, member, allow_again=True)
            return
        old = self.nodes.get(path)
        if old is not None:
            if (entry.type is EntryType.DIRECTORY and isinstance(old, Entry)
                    and old.type is EntryType.DIRECTORY):
                self.implied.discard(path)
                self.nodes[path] = entry  # a directory over a directory keeps its content
                return
            self.remove(path)
        self._ensure_parents(path, member)
        self._insert(entry)

    def link(self, path: bytes, target: bytes, member: str, *, replace_existing: bool) -> None:
        """Add ``path`` as a hardlink to the earlier member ``target``."""
        node = self.nodes.get(target)
        if node is None:
            raise ImageError(
                f"{self.what}: hardlink member {member!r} points at {_show(target)}, which is not"
                " an earlier member",
                hint="a hardlink must name a file that comes before it in the archive")
        if path in self.nodes:
            if not replace_existing:
                raise ImageError(
                    f"{self.what}: duplicate member {member!r} ({_show(path)} appears twice)",
                    hint="each path may appear only once in an archive")
            if path == target:
                return
            self.remove(path)
        if isinstance(node, Entry):
            if node.type is EntryType.DIRECTORY:
                raise ImageError(f"{self.what}: hardlink member {member!r} points at directory"
                                 f" {_show(target)}")
            # A hardlinked symlink or device has no inode sharing in the tree model: it
            # becomes a copy with the same metadata.
            self._ensure_parents(path, member)
            self._insert(replace(node, path=path))
            return
        self._ensure_parents(path, member)
        self.children[path.rsplit(b"/", 1)[0] if b"/" in path else b""][path] = None
        self.nodes[path] = node

    def remove(self, path: bytes) -> None:
        """Delete a path and, for a directory, everything under it (other hardlinks stay)."""
        node = self.nodes.pop(path, None)
        if node is None:
            return
        self.implied.discard(path)
        parent = path.rsplit(b"/", 1)[0] if b"/" in path else b""
        self.children.get(parent, {}).pop(path, None)
        for child in list(self.children.pop(path, {})):
            self.remove(child)

    def clear_directory(self, path: bytes, keep: set[bytes]) -> None:
        """Remove everything under ``path`` except the paths in ``keep`` (OCI opaque dirs).

        A kept directory keeps only its kept descendants: an opaque directory hides all
        of the lower layers' content beneath it.
        """
        for child in list(self.children.get(path, {})):
            if child not in keep:
                self.remove(child)
            elif self.is_dir(child):
                self.clear_directory(child, keep)

    def _set_root(self, entry: Entry, member: str, *, allow_again: bool = False) -> None:
        if entry.type is not EntryType.DIRECTORY:
            raise ImageError(f"{self.what}: member {member!r} names the root but is a"
                             f" {entry.type.value}, not a directory")
        if self.root_given and not allow_again:
            raise ImageError(f"{self.what}: duplicate member {member!r} (the root appears"
                             " twice)", hint="each path may appear only once in an archive")
        self.root_given = True
        self.implied.discard(b"")
        self.nodes[b""] = entry

    # -- result -----------------------------------------------------------------------
    def build(self, *, root: Entry | None = None) -> Tree:
        """The canonical tree; ``root`` overrides the root directory's metadata."""
        root_entry = root if root is not None else self.entry(b"")
        return Tree.from_canonical(root_entry, self._canonical_entries())

    def _canonical_entries(self) -> Iterator[Entry]:
        primaries: dict[int, bytes] = {}
        for path in sorted(self.nodes, key=sort_key):
            if not path:
                continue
            node = self.nodes[path]
            if isinstance(node, _Link):
                inode = self.inodes[node.inode]
                primary = primaries.get(node.inode)
                if primary is None:
                    primaries[node.inode] = path
                    yield inode if inode.path == path else replace(inode, path=path)
                else:
                    yield Entry(path, EntryType.HARDLINK, inode.mode, inode.uid,
                                inode.gid, inode.mtime_ns, inode.xattrs, target=primary)
            else:
                yield node
