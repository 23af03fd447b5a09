"""Plan a composefs image: the tree rewritten as libcomposefs rewrites it, then every
inode's number, nid, padding, xattrs and blocks, as data (no bytes yet).

The order of work is libcomposefs 1.0.8's (``lcfs-writer-erofs.c``): escape user
``trusted.overlay.*`` xattrs, add ``metacopy`` and ``redirect`` to files stored by
reference, turn whiteout devices into escaped whiteouts, mark the root opaque and add
its 256 whiteouts; then number the inodes breadth first with children in bytewise name
order (``.`` and ``..`` included), share the xattrs used more than once, and place
each inode on a 32-byte slot so that no inline tail crosses a block.
"""

from __future__ import annotations

import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain
from stat import S_IFBLK, S_IFCHR, S_IFLNK, S_IFREG

from reprobuild.errors import ImageError
from reprobuild.images.composefs import ondisk
from reprobuild.images.erofs.ondisk import BLOCK_SIZE, EROFS_SUPER_OFFSET, ISLOT_SIZE
from reprobuild.trees.tree import S_IFMT_OF_TYPE, Entry, EntryType, Tree

SUPER_BLOCK_SIZE = 128
DIRENT_SIZE = 12
COMPACT_SIZE = 32
EXTENDED_SIZE = 64
U16 = 0xFFFF
U32 = 0xFFFFFFFF

DigestOf = Callable[[Entry], bytes]


class Node:
    """One inode of the image."""

    __slots__ = ("children", "compact", "content", "digest", "gid", "ino", "ipad",
                 "isize", "kind", "mode", "mtime", "n_blocks", "nid", "nlink", "only_ref",
                 "rdev", "shared", "size", "tail", "target", "uid", "unshared", "xattr_size",
                 "xattrs")

    def __init__(self, entry: Entry) -> None:
        kind = self.kind = S_IFMT_OF_TYPE[entry.type]  # kept equal to S_IFMT(mode)
        self.mode = kind | entry.mode
        self.uid = entry.uid
        self.gid = entry.gid
        self.mtime = divmod(entry.mtime_ns, 1_000_000_000)
        content = entry.content
        self.size = content.size if kind == S_IFREG and content is not None else 0
        self.rdev = (ondisk.encode_rdev(entry.rdev_major, entry.rdev_minor)
                     if kind in (S_IFCHR, S_IFBLK) else 0)
        self.target = entry.target if kind == S_IFLNK else None
        self.xattrs: dict[bytes, bytes] = dict(entry.xattrs) if entry.xattrs else {}
        self.children: list[tuple[bytes, Node, bool]] = []  # name, inode, is a link
        self.content: bytes | None = None  # inline file bytes
        self.digest: bytes | None = None
        self.nlink = 1
        self.ino = self.nid = self.ipad = self.isize = self.n_blocks = self.tail = 0
        self.xattr_size = 0  # of the xattr header, shared ids and inline entries
        self.compact = True
        self.shared: list[int] = []  # offsets into the shared xattr area
        self.unshared: list[tuple[bytes, bytes]] = []
        # Stored by reference, its only xattrs metacopy and redirect, both its own (no
        # other file has its content): they are unshared, in that order.
        self.only_ref = False

    def set_xattr(self, name: bytes, value: bytes) -> None:
        self.xattrs.pop(name, None)
        self.xattrs[name] = value

    def sorted_xattrs(self) -> list[tuple[bytes, bytes]]:
        return sorted(self.xattrs.items())


@dataclass
class Layout:
    """Everything the serialiser needs, in write order."""

    nodes: list[Node]
    root: Node
    version: int
    has_acl: bool
    build_time: tuple[int, int]
    inodes_end: int = 0
    shared_xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)
    shared_size: int = 0
    data_start: int = 0
    n_data_blocks: int = 0


@dataclass
class Draft:
    """The part of a plan that needs no content digest: the rewritten tree in inode
    order, and the files stored by reference (in tree order) whose xattrs are to come."""

    nodes: list[Node]
    version: int
    has_acl: bool
    build_time: tuple[int, int]
    by_reference: list[tuple[Node, Entry]]
    uses: Counter[tuple[bytes, bytes]]
    """How many inodes carry each xattr (name, value), before metacopy and redirect."""


def plan(tree: Tree, digest_of: DigestOf) -> Layout:
    """The layout of ``tree``'s composefs image; ``digest_of`` gives a regular file's
    fs-verity sha256 digest (called once per inode stored by reference)."""
    return finish(prepare(tree), digest_of)


def prepare(tree: Tree) -> Draft:
    """What :func:`finish` completes once the content digests are known (the digests
    only add xattrs, which share, size and place the inodes, not number them)."""
    root, version, by_reference = _rewrite(tree)
    nodes = _breadth_first(root)
    build_time = min(node.mtime for node in nodes)
    has_acl = False
    for node in nodes:
        if node.kind == stat.S_IFDIR:
            node.nlink = 2 + sum(1 for _, child, link in node.children
                                 if not link and child.kind == stat.S_IFDIR)
        if node.xattrs and not has_acl:
            has_acl = (b"system.posix_acl_access" in node.xattrs
                       or b"system.posix_acl_default" in node.xattrs)
    uses = Counter(chain.from_iterable(node.xattrs.items() for node in nodes if node.xattrs))
    return Draft(nodes, version, has_acl, build_time, by_reference, uses)


def finish(draft: Draft, digest_of: DigestOf) -> Layout:
    """The layout from a :func:`prepare` draft; ``digest_of`` as for :func:`plan`."""
    by_reference = draft.by_reference
    found = [digest_of(entry) for _, entry in by_reference]
    copies = Counter(found)
    uses = draft.uses.copy()
    metacopy, redirect = ondisk.METACOPY, ondisk.REDIRECT
    for (node, _), digest in zip(by_reference, found, strict=True):  # metacopy, redirect
        node.digest = digest
        text = digest.hex().encode()
        # New names: user trusted.overlay.* names were escaped by _rewrite.
        xattrs = node.xattrs
        items = ((metacopy, _METACOPY_HEAD + digest),
                 (redirect, b"/" + text[:2] + b"/" + text[2:]))
        if not xattrs and copies[digest] == 1:  # the usual file: nothing to share
            node.xattrs = dict(items)
            node.unshared = list(items)
            node.xattr_size = ONLY_REF_XATTR_SIZE
            node.only_ref = True
        else:
            xattrs.update(items)
            uses.update(items)
    layout = Layout(draft.nodes, draft.nodes[0], draft.version, draft.has_acl,
                    draft.build_time)
    _share_xattrs(layout, uses)
    _place_inodes(layout)
    return layout


def _rewrite(tree: Tree) -> tuple[Node, int, list[tuple[Node, Entry]]]:
    """Nodes for the tree's inodes, with composefs's xattrs but those of the files
    stored by reference (listed instead); the format version (1 when the tree holds a
    whiteout device). One pass over the tree (a parent comes before its children),
    then hardlinks, whiteouts and each directory's ``.`` and ``..``."""
    nodes: dict[bytes, Node] = {}
    links: list[Entry] = []
    whiteouts: list[tuple[Node, Node]] = []
    directories: list[tuple[Node, Node]] = []  # a directory and its parent
    by_reference: list[tuple[Node, Entry]] = []
    version = 0
    for entry in tree:
        path = entry.path
        parent_path, _, name = path.rpartition(b"/")
        if entry.type is EntryType.HARDLINK:
            links.append(entry)
            continue
        node = Node(entry)
        nodes[path] = node
        parent = nodes[parent_path] if path else node
        if path:
            parent.children.append((name, node, False))
        if entry.xattrs:
            _escape(node, entry)
        if node.kind == stat.S_IFREG:
            if entry.content is not None and node.size:
                if node.size <= ondisk.INLINE_CONTENT_MAX:
                    node.content = entry.content.read()
                    if len(node.content) != node.size:
                        raise ImageError(f"{entry.display()}: content changed while reading")
                else:
                    by_reference.append((node, entry))
        elif node.kind == stat.S_IFDIR:
            directories.append((node, parent))
        elif node.kind == stat.S_IFCHR and node.rdev == 0:
            whiteouts.append((node, parent))
            if (entry.rdev_major, entry.rdev_minor) == (0, 0):
                version = 1
    for entry in links:
        parent_path, _, name = entry.path.rpartition(b"/")
        primary = nodes[tree.resolve(entry).path]
        primary.nlink += 1
        nodes[parent_path].children.append((name, primary, True))
    for node, parent in whiteouts:
        _escape_whiteout(node, parent, version)
    root = nodes[b""]
    root.set_xattr(ondisk.OPAQUE, b"y")
    _add_root_whiteouts(root)
    for node, parent in directories:
        node.children.append((b".", node, True))
        node.children.append((b"..", parent, True))
        node.children.sort(key=_child_name)
    return root, version, by_reference


def _child_name(child: tuple[bytes, Node, bool]) -> bytes:
    return child[0]


def _escape(node: Node, entry: Entry) -> None:
    space = 0
    for name, value in entry.xattrs:
        if len(value) > U16:
            raise ImageError(f"{entry.display()}: xattr {name!r} has {len(value)} bytes",
                             hint="composefs stores values of at most 65535 bytes")
        space += 2 * 4 - 1 + len(name) + len(value)
    if space and space + ondisk.XATTR_HEADER_SPACE > ondisk.XATTR_SPACE_MAX:
        raise ImageError(f"{entry.display()}: its xattrs take {space} bytes",
                         hint="libcomposefs stores at most 32767 bytes of xattrs a file")
    if any(name.startswith(ondisk.OVERLAY_PREFIX) for name in node.xattrs):
        node.xattrs = {
            (ondisk.OVERLAY_ESCAPE_PREFIX + name[len(ondisk.OVERLAY_PREFIX):]
             if name.startswith(ondisk.OVERLAY_PREFIX) else name): value
            for name, value in node.xattrs.items()}


def object_path(digest: bytes) -> str:
    """The digest store path of an object: ``xx/rest`` of the hex digest."""
    text = digest.hex()
    return f"{text[:2]}/{text[2:]}"


_METACOPY_HEAD = bytes((0, 4 + 32, 0, ondisk.FS_VERITY_HASH_ALG_SHA256))
"""A metacopy value before its sha256 digest (struct ovl_metacopy: version, length,
flags, digest algorithm)."""
ONLY_REF_XATTR_SIZE = (12 + ondisk.entry_size(ondisk.METACOPY, bytes(4 + 32))
                        + ondisk.entry_size(ondisk.REDIRECT, bytes(1 + 2 + 1 + 62)))
"""The xattr body of an inode whose only xattrs are its own metacopy and redirect."""


def _escape_whiteout(node: Node, parent: Node, version: int) -> None:
    node.size = 0
    node.mode = stat.S_IFREG | stat.S_IMODE(node.mode)
    node.kind = stat.S_IFREG
    node.set_xattr(ondisk.ESCAPED_WHITEOUT, b"")
    node.set_xattr(ondisk.USERXATTR_WHITEOUT, b"")
    parent.set_xattr(ondisk.ESCAPED_WHITEOUTS, b"")
    parent.set_xattr(ondisk.USERXATTR_WHITEOUTS, b"")
    if version >= 1:
        parent.set_xattr(ondisk.ESCAPED_OPAQUE, b"x")
        parent.set_xattr(ondisk.USERXATTR_OPAQUE, b"x")


def _add_root_whiteouts(root: Node) -> None:
    taken = {name for name, _, _ in root.children}
    selinux = root.xattrs.get(b"security.selinux")
    for i in range(256):
        name = b"%02x" % i
        if name in taken:
            continue
        whiteout = Node(Entry(name, EntryType.CHAR, 0o644, root.uid, root.gid))
        whiteout.mtime = root.mtime
        if selinux is not None:
            whiteout.xattrs[b"security.selinux"] = selinux
        root.children.append((name, whiteout, False))


def _breadth_first(root: Node) -> list[Node]:
    """Inodes in breadth-first order; a hardlink is numbered where its primary is."""
    order = [root]
    for node in order:  # grows while iterated: a queue
        order.extend(child for _, child, link in node.children if not link)
    for index, node in enumerate(order):
        node.ino = index
    return order


def _share_xattrs(layout: Layout, uses: Counter[tuple[bytes, bytes]]) -> None:
    """xattrs (name and value) used by more than one inode (``uses``: but those of the
    inodes marked ``only_ref``, used once) go to the shared area, in libcomposefs's
    order (names, then value lengths, then values, all descending). Each inode's xattr
    body size is set on the way (an ``only_ref`` inode's is set already)."""
    shared = sorted((item for item, count in uses.items() if count > 1),
                    key=lambda item: (item[0], len(item[1]), item[1]), reverse=True)
    offsets: dict[tuple[bytes, bytes], int] = {}
    offset = 0
    entry_size = ondisk.entry_size
    for name, value in shared:
        offsets[(name, value)] = offset
        offset += entry_size(name, value)
    layout.shared_xattrs = shared
    layout.shared_size = offset
    most = ondisk.MAX_SHARED_PER_INODE
    for node in layout.nodes:
        if not node.xattrs or node.only_ref:
            continue
        size = 12
        for item in sorted(node.xattrs.items()):
            at = offsets.get(item)
            if at is not None and len(node.shared) < most:
                node.shared.append(at)
                size += 4
            else:
                node.unshared.append(item)
                size += entry_size(*item)
        node.xattr_size = size


def _data_size(node: Node) -> None:
    """n_blocks and tail (compute_erofs_inode_size)."""
    kind = node.kind
    node.n_blocks = node.tail = 0
    if kind == stat.S_IFDIR:
        size = 0
        for name, _, _ in node.children:
            length = DIRENT_SIZE + len(name)
            if size + length > BLOCK_SIZE:
                node.n_blocks += 1
                size = 0
            size += length
        if size > BLOCK_SIZE // 2:  # never inline more than half a block
            node.n_blocks += 1
            size = 0
        node.tail = size
    elif kind == stat.S_IFLNK:
        assert node.target is not None
        node.tail = len(node.target)
    elif kind == stat.S_IFREG and node.size:
        if node.content is not None:
            node.n_blocks, node.tail = divmod(node.size, BLOCK_SIZE)
            if node.tail > BLOCK_SIZE // 2:
                node.n_blocks += 1
                node.tail = 0
        else:
            node.tail = 4 * chunking(node.size)[1]


ONE_CHUNK_MAX = 1 << (12 + 31)
"""A file stored by reference of up to this size has one chunk (see :func:`chunking`)."""


def chunking(size: int) -> tuple[int, int]:
    """(chunk bits, chunk count) of a file stored by reference (erofs_compute_chunking)."""
    bits = max((size - 1).bit_length(), 12)
    bits = min(bits, 12 + 31)
    return bits, -(-size // (1 << bits))


def inode_size_field(node: Node) -> int:
    kind = node.kind
    if kind == stat.S_IFDIR:
        return node.n_blocks * BLOCK_SIZE + node.tail
    if kind == stat.S_IFREG:
        return node.size
    if kind == stat.S_IFLNK:
        assert node.target is not None
        return node.tail if node.n_blocks == 0 else len(node.target)
    return 0


def _tail_padding(node: Node, pos: int, inode_size: int, xattr_size: int) -> int:
    """Padding before an inode so that its inline tail does not cross a block."""
    total = inode_size + xattr_size + node.tail
    if node.kind == stat.S_IFLNK:
        if total // BLOCK_SIZE > 0:
            node.n_blocks += 1
            node.tail = 0
        if pos // BLOCK_SIZE != (pos + total - 1) // BLOCK_SIZE:
            return -pos % BLOCK_SIZE
        return 0
    remainder = BLOCK_SIZE - (pos + inode_size + xattr_size) % BLOCK_SIZE
    if remainder < node.tail:
        pad = -(-remainder // ISLOT_SIZE) * ISLOT_SIZE
        remainder = BLOCK_SIZE - (pos + inode_size + xattr_size + pad) % BLOCK_SIZE
        if node.tail <= remainder:
            return pad
        node.n_blocks += 1
        node.tail = 0
        return -pos % BLOCK_SIZE
    return 0


def _place_inodes(layout: Layout) -> None:
    pos = EROFS_SUPER_OFFSET + SUPER_BLOCK_SIZE
    build_time = layout.build_time
    for node in layout.nodes:
        if node.digest is not None:  # stored by reference: no data, its chunk indexes
            size = node.size
            node.n_blocks = 0
            node.tail = 4 if size <= ONE_CHUNK_MAX else 4 * chunking(size)[1]
        else:
            _data_size(node)
            size = inode_size_field(node)
        node.compact = (node.mtime == build_time and node.nlink <= U16
                        and node.uid <= U16 and node.gid <= U16 and size <= U32)
        inode_size = COMPACT_SIZE if node.compact else EXTENDED_SIZE
        xattr_size = node.xattr_size
        start = -(-pos // ISLOT_SIZE) * ISLOT_SIZE
        pad = _tail_padding(node, start, inode_size, xattr_size)
        node.ipad = start - pos + pad
        pos = start + pad
        node.isize = inode_size + xattr_size + node.tail
        layout.n_data_blocks += node.n_blocks
        node.nid = pos // ISLOT_SIZE
        pos += node.isize
    layout.inodes_end = -(-pos // ISLOT_SIZE) * ISLOT_SIZE
    end = layout.inodes_end + layout.shared_size
    layout.data_start = -(-end // BLOCK_SIZE) * BLOCK_SIZE
    if layout.root.nid >= U16:
        raise ImageError("the root directory's inode is beyond what composefs can address",
                         hint="the root has too many xattrs")
