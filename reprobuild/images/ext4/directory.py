"""ext4 directory blocks (linear and htree) and xattr regions, as bytes without checksums.

Checksums depend on the filesystem UUID and the block or inode number, so the serialiser
fills them in (see :func:`reprobuild.images.ext4.write.seal_dir_block`); everything else
about a directory's or an xattr region's bytes is decided here.
"""

from __future__ import annotations

from dataclasses import dataclass

from reprobuild.errors import ImageError
from reprobuild.images.ext4.ondisk import (
    BLOCK_SIZE,
    DIRENT_TAIL_SIZE,
    DIRENT_TAIL_TYPE,
    DX_COUNTLIMIT,
    DX_ENTRY,
    DX_NODE_LIMIT,
    DX_ROOT_INFO,
    DX_ROOT_LIMIT,
    EXT4_DIR_ENTRY_2,
    EXT4_XATTR_ENTRY,
    EXT4_XATTR_HEADER,
    FT_DIR,
    IBODY_XATTR_START,
    INODE_SIZE,
    XATTR_MAGIC,
    acl_to_disk,
    dir_hash,
    split_xattr_name,
    xattr_block_hash,
    xattr_entry_hash,
)

LEAF_SPACE = BLOCK_SIZE - DIRENT_TAIL_SIZE  # 4084 bytes of entries before the dirent tail
# struct ext4_dir_entry_tail: inode 0, rec_len 12, name_len 0, file_type 0xDE, checksum
DIRENT_TAIL = EXT4_DIR_ENTRY_2.pack(0, DIRENT_TAIL_SIZE, 0, DIRENT_TAIL_TYPE) + bytes(4)

KIND_LEAF = 0
KIND_DX_ROOT = 1
KIND_DX_NODE = 2


@dataclass(frozen=True, slots=True)
class DirChild:
    name: bytes
    ino: int
    file_type: int


@dataclass(frozen=True, slots=True)
class DirBlock:
    """One logical directory block; ``count`` is the dx entry count for index blocks.

    A leaf's ``data`` is compact: its bytes before the dirent tail, trailing zeros
    dropped (most directories are small); :meth:`block` gives all 4096 bytes.
    """

    data: bytes
    kind: int
    count: int = 0

    def block(self) -> bytes:
        """The whole block, the checksum of a leaf's dirent tail still zero."""
        if self.kind == KIND_LEAF:
            return self.data.ljust(LEAF_SPACE, b"\0") + DIRENT_TAIL
        return self.data


def _rec_len(name: bytes) -> int:
    return (8 + len(name) + 3) & ~3


def _leaf_block(entries: list[tuple[int, bytes, int]]) -> bytes:
    """Dirents in the given order; the last one's rec_len reaches the tail."""
    block = bytearray(LEAF_SPACE)
    pos = 0
    for i, (ino, name, ftype) in enumerate(entries):
        rec = _rec_len(name) if i + 1 < len(entries) else LEAF_SPACE - pos
        EXT4_DIR_ENTRY_2.pack_into(block, pos, ino, rec, len(name), ftype)
        block[pos + 8: pos + 8 + len(name)] = name
        pos += rec
    if not entries:
        EXT4_DIR_ENTRY_2.pack_into(block, 0, 0, LEAF_SPACE, 0, 0)
    return bytes(block).rstrip(b"\0")  # the compact form of DirBlock


def directory_blocks(self_ino: int, parent_ino: int, children: list[DirChild], *,
                     hash_version: int, hash_seed: tuple[int, int, int, int],
                     ) -> tuple[list[DirBlock], bool]:
    """The logical blocks of a directory and whether it is an htree (dir_index).

    One block holds ``.``, ``..`` and the children in name order when they fit; a bigger
    directory becomes an htree whose leaves hold the children in hash order.
    """
    dots = [(self_ino, b".", FT_DIR), (parent_ino, b"..", FT_DIR)]
    total = 24 + sum(_rec_len(c.name) for c in children)
    if total <= LEAF_SPACE:
        entries = dots + [(c.ino, c.name, c.file_type) for c in children]
        return [DirBlock(_leaf_block(entries), KIND_LEAF)], False
    return _htree_blocks(self_ino, parent_ino, children, hash_version, hash_seed), True


def _htree_blocks(self_ino: int, parent_ino: int, children: list[DirChild],
                  hash_version: int, seed: tuple[int, int, int, int]) -> list[DirBlock]:
    hashed = sorted(
        (dir_hash(c.name, hash_version, seed), c.name, c.ino, c.file_type) for c in children
    )
    # Leaves: (first hash with the collision bit, entries).
    leaves: list[tuple[int, list[tuple[int, bytes, int]]]] = []
    used = LEAF_SPACE
    prev_major = -1
    for (major, _minor), name, ino, ftype in hashed:
        size = _rec_len(name)
        if used + size > LEAF_SPACE:
            # A leaf that starts inside a run of equal hashes carries the continuation bit.
            start = major | 1 if major == prev_major else major
            leaves.append((start, []))
            used = 0
        leaves[-1][1].append((ino, name, ftype))
        used += size
        prev_major = major
    leaf_blocks = [_leaf_block(entries) for _, entries in leaves]
    hashes = [h for h, _ in leaves]
    hashes[0] = 0

    if len(leaves) <= DX_ROOT_LIMIT:
        levels = 0
        nodes: list[tuple[int, list[tuple[int, int]]]] = []
        root_entries = [(h, 1 + i) for i, h in enumerate(hashes)]
    else:
        levels = 1
        node_count = -(-len(leaves) // DX_NODE_LIMIT)
        if node_count > DX_ROOT_LIMIT:
            raise ImageError(
                f"a directory of {len(children)} entries needs more than two htree levels",
                hint="split the directory; the largedir feature is not written")
        first_leaf = 1 + node_count
        nodes = []
        for n in range(node_count):
            part = range(n * DX_NODE_LIMIT, min(len(leaves), (n + 1) * DX_NODE_LIMIT))
            nodes.append((hashes[part[0]], [(hashes[i], first_leaf + i) for i in part]))
        root_entries = [(h, 1 + n) for n, (h, _) in enumerate(nodes)]

    root = bytearray(BLOCK_SIZE)
    EXT4_DIR_ENTRY_2.pack_into(root, 0, self_ino, 12, 1, FT_DIR)
    root[8:9] = b"."
    EXT4_DIR_ENTRY_2.pack_into(root, 12, parent_ino, BLOCK_SIZE - 12, 2, FT_DIR)
    root[20:22] = b".."
    DX_ROOT_INFO.pack_into(root, 24, 0, hash_version, 8, levels, 0)
    _pack_dx_entries(root, 32, DX_ROOT_LIMIT, root_entries)
    blocks = [DirBlock(bytes(root), KIND_DX_ROOT, len(root_entries))]
    for _, entries in nodes:
        node = bytearray(BLOCK_SIZE)
        EXT4_DIR_ENTRY_2.pack_into(node, 0, 0, BLOCK_SIZE, 0, 0)
        _pack_dx_entries(node, 8, DX_NODE_LIMIT, entries)
        blocks.append(DirBlock(bytes(node), KIND_DX_NODE, len(entries)))
    blocks.extend(DirBlock(b, KIND_LEAF) for b in leaf_blocks)
    return blocks


def _pack_dx_entries(block: bytearray, offset: int, limit: int,
                     entries: list[tuple[int, int]]) -> None:
    DX_COUNTLIMIT.pack_into(block, offset, limit, len(entries), entries[0][1])
    for i, (h, blk) in enumerate(entries[1:], start=1):
        DX_ENTRY.pack_into(block, offset + 8 * i, h, blk)


# -- xattrs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiskXattr:
    """One xattr as stored: prefix index, name suffix and on-disk value."""

    index: int
    suffix: bytes
    value: bytes

    @property
    def entry_size(self) -> int:
        return (EXT4_XATTR_ENTRY.size + len(self.suffix) + 3) & ~3

    @property
    def value_size(self) -> int:
        return (len(self.value) + 3) & ~3


IBODY_SPACE = INODE_SIZE - IBODY_XATTR_START  # 96 bytes: magic, entries, values
BLOCK_XATTR_SPACE = BLOCK_SIZE - EXT4_XATTR_HEADER.size


def disk_xattrs(xattrs: tuple[tuple[bytes, bytes], ...], where: str) -> list[DiskXattr]:
    """Xattrs in the kernel's sorted order (prefix index, name length, name)."""
    out = []
    for name, value in xattrs:
        index, suffix = split_xattr_name(name)
        if index in (2, 3):
            try:
                value = acl_to_disk(value)
            except ValueError:
                raise ImageError(f"{where}: xattr {name!r} is not a valid POSIX ACL") from None
        if len(suffix) > 255:
            raise ImageError(f"{where}: xattr name {name!r} is longer than 255 bytes")
        out.append(DiskXattr(index, suffix, value))
    out.sort(key=lambda x: (x.index, len(x.suffix), x.suffix))
    return out


def place_xattrs(items: list[DiskXattr], where: str
                 ) -> tuple[list[DiskXattr], list[DiskXattr]]:
    """Split into (in-inode, block) xattrs: a sorted prefix that fits the inode body."""
    used = 4 + 4  # magic and the terminating zero entry
    split = 0
    for item in items:
        need = item.entry_size + item.value_size
        if used + need > IBODY_SPACE:
            break
        used += need
        split += 1
    inline, block = items[:split], items[split:]
    if block:
        need = 4 + sum(x.entry_size + x.value_size for x in block)
        if need > BLOCK_XATTR_SPACE:
            raise ImageError(
                f"{where}: xattrs need {need} bytes, more than one {BLOCK_SIZE}-byte block",
                hint="ext4 without ea_inode keeps a file's xattrs in its inode and one block")
    return inline, block


def _pack_xattr_entries(region: bytearray, entries_at: int, values_end: int,
                        value_base: int, items: list[DiskXattr]) -> list[int]:
    """Entries from ``entries_at``, values downward from ``values_end``; returns hashes."""
    pos = entries_at
    end = values_end
    hashes = []
    for item in items:
        if item.value:
            end -= item.value_size
            region[end: end + len(item.value)] = item.value
            offset = end - value_base
        else:
            offset = 0
        h = xattr_entry_hash(item.suffix, item.value)
        hashes.append(h)
        EXT4_XATTR_ENTRY.pack_into(region, pos, len(item.suffix), item.index, offset, 0,
                                   len(item.value), h)
        region[pos + 16: pos + 16 + len(item.suffix)] = item.suffix
        pos += item.entry_size
    return hashes


def ibody_xattr_region(items: list[DiskXattr]) -> bytes:
    """The 96 bytes after i_extra_isize: magic, entries, values (offsets from entry 0)."""
    if not items:
        return b""
    region = bytearray(IBODY_SPACE)
    region[0:4] = XATTR_MAGIC.to_bytes(4, "little")
    _pack_xattr_entries(region, 4, IBODY_SPACE, 4, items)
    return bytes(region)


def xattr_block(items: list[DiskXattr], refcount: int) -> bytes:
    """An xattr block without its checksum (which depends on the block number)."""
    block = bytearray(BLOCK_SIZE)
    hashes = _pack_xattr_entries(block, EXT4_XATTR_HEADER.size, BLOCK_SIZE, 0, items)
    EXT4_XATTR_HEADER.pack_into(block, 0, XATTR_MAGIC, refcount, 1, xattr_block_hash(hashes),
                                0, b"")
    return bytes(block)
