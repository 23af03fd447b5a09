"""Serialise a composefs :class:`~reprobuild.images.composefs.layout.Layout`: header,
superblock, inodes with their xattrs and inline tails, shared xattrs, directory and
symlink blocks, in the order libcomposefs 1.0.8 writes them."""

from __future__ import annotations

import functools
import stat
from typing import BinaryIO

from reprobuild.images.composefs import ondisk
from reprobuild.images.composefs.layout import (
    ONLY_REF_XATTR_SIZE,
    Layout,
    Node,
    chunking,
    inode_size_field,
)
from reprobuild.images.erofs.ondisk import (
    BLOCK_BITS,
    BLOCK_SIZE,
    EROFS_DIRENT,
    EROFS_INODE_COMPACT,
    EROFS_INODE_EXTENDED,
    EROFS_SUPER_BLOCK,
    EROFS_SUPER_MAGIC,
    EROFS_SUPER_OFFSET,
    EROFS_XATTR_ENTRY,
    EROFS_XATTR_IBODY_HEADER,
    FEATURE_COMPAT_MTIME,
    INODE_CHUNK_BASED,
    INODE_FLAT_INLINE,
    INODE_FLAT_PLAIN,
    NULL_ADDR,
)

_FILE_TYPE = {stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFCHR: 3, stat.S_IFBLK: 4,
              stat.S_IFIFO: 5, stat.S_IFSOCK: 6, stat.S_IFLNK: 7}
_NULL_CHUNK = NULL_ADDR.to_bytes(4, "little")
_PADDING = (b"", bytes(1), bytes(2), bytes(3))


def write_image(layout: Layout, output: BinaryIO) -> None:
    """Write the whole image to ``output`` from its start."""
    out = bytearray(ondisk.LCFS_EROFS_HEADER.pack(
        ondisk.LCFS_EROFS_MAGIC, ondisk.LCFS_EROFS_VERSION,
        ondisk.LCFS_EROFS_FLAGS_HAS_ACL if layout.has_acl else 0, layout.version))
    out += bytes(EROFS_SUPER_OFFSET - len(out))
    out += EROFS_SUPER_BLOCK.pack(
        EROFS_SUPER_MAGIC, 0, FEATURE_COMPAT_MTIME | ondisk.FEATURE_COMPAT_XATTR_FILTER,
        BLOCK_BITS, 0, layout.root.nid, len(layout.nodes), layout.build_time[0],
        layout.build_time[1], layout.data_start // BLOCK_SIZE + layout.n_data_blocks,
        0, layout.inodes_end // BLOCK_SIZE, bytes(16), bytes(16), 0, 0, 0, 0, 0, 0, 0, 0, 0,
        b"")
    next_block = layout.data_start // BLOCK_SIZE
    shared_base = layout.inodes_end % BLOCK_SIZE
    for node in layout.nodes:
        if node.ipad:
            out += bytes(node.ipad)
        if node.only_ref and not node.n_blocks:  # most inodes of a root filesystem
            _only_ref_inode(out, node)
            continue
        blkaddr = 0
        if node.n_blocks and node.kind in (stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK):
            blkaddr = next_block
            next_block += node.n_blocks
        _inode(out, node, blkaddr)
        _xattrs(out, node, shared_base)
        _tail(out, node)
    out += bytes(-len(out) % 32)
    assert len(out) == layout.inodes_end
    for name, value in layout.shared_xattrs:
        _xattr_entry(out, name, value)
    out += bytes(-len(out) % BLOCK_SIZE)
    assert len(out) == layout.data_start
    for node in layout.nodes:
        _blocks(out, node)
    output.write(out)


def _only_ref_inode(out: bytearray, node: Node) -> None:
    """What _inode, _xattrs and _tail write for an inode marked ``only_ref`` whose chunk
    indexes are inline (no block): a chunk-based inode with no block address, its two
    xattrs, its null chunk indexes."""
    size = node.size
    bits = max((size - 1).bit_length(), BLOCK_BITS)
    i_u = min(bits, BLOCK_BITS + 31) - BLOCK_BITS  # chunking(size)[0], the chunk bits
    if node.compact:
        out += EROFS_INODE_COMPACT.pack(_ONLY_REF_FORMAT, _ONLY_REF_ICOUNT, node.mode & 0xFFFF,
                                        node.nlink, size, 0, i_u, node.ino, node.uid,
                                        node.gid, 0)
    else:
        out += EROFS_INODE_EXTENDED.pack(_ONLY_REF_FORMAT | 1, _ONLY_REF_ICOUNT,
                                         node.mode & 0xFFFF, 0, size, i_u, node.ino, node.uid,
                                         node.gid, node.mtime[0], node.mtime[1], node.nlink,
                                         b"")
    _only_ref_xattrs(out, node)
    out += _NULL_CHUNK * (node.tail // len(_NULL_CHUNK))


def _only_ref_xattrs(out: bytearray, node: Node) -> None:
    """The two xattr entries of an inode marked ``only_ref`` (its metacopy and redirect,
    of known shape), padded to 4 bytes."""
    (_, metacopy), (_, redirect) = node.unshared
    out += _ONLY_REF_HEAD
    out += metacopy
    out += _REDIRECT_HEAD
    out += redirect
    out += _PADDING[-len(out) % 4]


def _inode(out: bytearray, node: Node, blkaddr: int) -> None:
    kind = node.kind
    xattr_size = node.xattr_size
    icount = (xattr_size - 12) // 4 + 1 if xattr_size else 0
    layout = INODE_FLAT_INLINE if node.tail else INODE_FLAT_PLAIN
    i_u = blkaddr
    if kind in (stat.S_IFCHR, stat.S_IFBLK):
        i_u = node.rdev
    elif kind == stat.S_IFREG and node.size and node.content is None:
        layout = INODE_CHUNK_BASED
        i_u = blkaddr | (chunking(node.size)[0] - BLOCK_BITS)  # the chunk bits
    size = inode_size_field(node)
    i_format = layout << 1 | (0 if node.compact else 1)
    if node.compact:
        out += EROFS_INODE_COMPACT.pack(i_format, icount, node.mode & 0xFFFF, node.nlink,
                                        size, 0, i_u, node.ino, node.uid, node.gid, 0)
    else:
        out += EROFS_INODE_EXTENDED.pack(i_format, icount, node.mode & 0xFFFF, 0, size, i_u,
                                         node.ino, node.uid, node.gid, node.mtime[0],
                                         node.mtime[1], node.nlink, b"")


def _xattrs(out: bytearray, node: Node, shared_base: int) -> None:
    if node.only_ref:  # the usual file stored by reference: two entries of known shape
        _only_ref_xattrs(out, node)
        return
    if not node.shared and not node.unshared:
        return
    name_filter = 0
    for name in node.xattrs:
        name_filter |= ondisk.filter_bit(name)
    out += EROFS_XATTR_IBODY_HEADER.pack(0xFFFFFFFF & ~name_filter, len(node.shared), b"")
    for offset in node.shared:
        out += ((shared_base + offset) // 4).to_bytes(4, "little")
    for name, value in node.unshared:
        _xattr_entry(out, name, value)


def _xattr_entry(out: bytearray, name: bytes, value: bytes) -> None:
    out += _entry_head(name, len(value))
    out += value
    out += _PADDING[-len(out) % 4]


@functools.lru_cache(maxsize=4096)
def _entry_head(name: bytes, value_size: int) -> bytes:
    """An erofs_xattr_entry and its name suffix (the same for many inodes)."""
    index, suffix = ondisk.split_name(name)
    return EROFS_XATTR_ENTRY.pack(len(suffix), index, value_size) + suffix


# An inode marked only_ref: the ibody header (no shared xattr; the name filter of the
# two names) and the metacopy entry's head, then its value; the redirect entry's head,
# then its value. The metacopy entry ends 4-aligned (4 + 16 + 36 bytes).
_ONLY_REF_HEAD = EROFS_XATTR_IBODY_HEADER.pack(
    0xFFFFFFFF & ~(ondisk.filter_bit(ondisk.METACOPY) | ondisk.filter_bit(ondisk.REDIRECT)),
    0, b"") + _entry_head(ondisk.METACOPY, 4 + 32)
_REDIRECT_HEAD = _entry_head(ondisk.REDIRECT, 1 + 2 + 1 + 62)
_ONLY_REF_FORMAT = INODE_CHUNK_BASED << 1  # | 1 for an extended inode
_ONLY_REF_ICOUNT = (ONLY_REF_XATTR_SIZE - 12) // 4 + 1


def _dirents(out: bytearray, children: list[tuple[bytes, Node, bool]]) -> None:
    nameoff = len(children) * 12
    for name, child, _ in children:
        out += EROFS_DIRENT.pack(child.nid, nameoff, _FILE_TYPE[child.kind], 0)
        nameoff += len(name)
    for name, _, _ in children:
        out += name


def _dir_chunks(node: Node) -> list[list[tuple[bytes, Node, bool]]]:
    """The children of each full directory block, then those of the tail (maybe empty)."""
    chunks: list[list[tuple[bytes, Node, bool]]] = []
    current: list[tuple[bytes, Node, bool]] = []
    size = 0
    for child in node.children:
        length = 12 + len(child[0])
        if size + length > BLOCK_SIZE:
            chunks.append(current)
            current = []
            size = 0
        current.append(child)
        size += length
    if len(chunks) < node.n_blocks:
        chunks.append(current)
        current = []
    chunks.append(current)
    return chunks


def _tail(out: bytearray, node: Node) -> None:
    kind = node.kind
    if kind == stat.S_IFDIR:
        tail = _dir_chunks(node)[-1]
        if tail:
            _dirents(out, tail)
    elif kind == stat.S_IFLNK:
        if node.n_blocks == 0:
            assert node.target is not None
            out += node.target
    elif kind == stat.S_IFREG and node.tail:
        if node.content is not None:
            out += node.content[node.size - node.tail:]
        else:
            out += _NULL_CHUNK * (node.tail // len(_NULL_CHUNK))  # the chunk indexes


def _blocks(out: bytearray, node: Node) -> None:
    kind = node.kind
    if kind == stat.S_IFDIR:
        for chunk in _dir_chunks(node)[:-1]:
            _dirents(out, chunk)
            out += bytes(-len(out) % BLOCK_SIZE)
    elif node.n_blocks and kind == stat.S_IFREG:
        if node.content is None:
            out += _NULL_CHUNK * ondisk.MAX_NONINLINE_CHUNKS
            return
        out += node.content[:BLOCK_SIZE]
        out += bytes(-len(out) % BLOCK_SIZE)
    elif node.n_blocks and kind == stat.S_IFLNK:
        assert node.target is not None
        out += node.target[:BLOCK_SIZE]
        out += bytes(-len(out) % BLOCK_SIZE)
