"""Read an ext4 image back into a :class:`~reprobuild.trees.tree.Tree` (for diff and tests).

Understands what the writer makes and what mke2fs makes with the usual features:
extents (with index blocks), linear and htree directories (read linearly, as the kernel
can), in-inode and block xattrs, fast and slow symlinks, device numbers in both
encodings, hardlinks by inode number. File contents stream from the image file.
``lost+found`` is kept: it is part of the image.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from typing import BinaryIO

from reprobuild.errors import ImageError
from reprobuild.images.ext4.ondisk import (
    EXT4_DIR_ENTRY_2,
    EXT4_EXTENT,
    EXT4_EXTENT_HEADER,
    EXT4_EXTENT_IDX,
    EXT4_INODE,
    EXT4_SUPER_MAGIC,
    EXT4_XATTR_ENTRY,
    EXTENT_MAGIC,
    EXTENTS_FL,
    INCOMPAT_64BIT,
    ROOT_INO,
    SUPERBLOCK_OFFSET,
    XATTR_MAGIC,
    XATTR_PREFIX_OF_INDEX,
    acl_from_disk,
    decode_device,
    decode_time,
)
from reprobuild.trees.region import EntryBudget, file_region
from reprobuild.trees.tree import Content, Entry, EntryType, Tree

_TYPES = {
    stat.S_IFREG: EntryType.REGULAR, stat.S_IFDIR: EntryType.DIRECTORY,
    stat.S_IFLNK: EntryType.SYMLINK, stat.S_IFCHR: EntryType.CHAR,
    stat.S_IFBLK: EntryType.BLOCK, stat.S_IFIFO: EntryType.FIFO,
    stat.S_IFSOCK: EntryType.SOCKET,
}


@dataclass(frozen=True)
class ImageExtent:
    logical: int
    length: int
    physical: int


MAX_DEPTH = 5  # extent tree levels the kernel accepts (EXT4_MAX_EXTENT_DEPTH)
MAX_SYMLINK = 4096  # PATH_MAX


def _pieces(extents: list[ImageExtent], size: int, block_size: int, what: str
            ) -> list[tuple[int | None, int]]:
    """A file's extents as (image offset or None for a hole, length) pieces of ``size``."""
    pieces: list[tuple[int | None, int]] = []
    position = 0  # bytes of the file covered so far
    for ext in sorted(extents, key=lambda e: e.logical):
        start = ext.logical * block_size
        if start < position:
            raise ImageError(f"{what}: extents overlap at logical block {ext.logical}")
        if start >= size:
            break
        if start > position:
            pieces.append((None, start - position))
        length = min(ext.length * block_size, size - start)
        pieces.append((ext.physical * block_size, length))
        position = start + length
    if position < size:
        pieces.append((None, size - position))
    return pieces


class Ext4Image:
    """Random access to the structures of one ext4 image file, every field checked first."""

    def __init__(self, path: bytes, stream: BinaryIO) -> None:
        self.path = path
        self.stream = stream
        self.file_size = os.fstat(stream.fileno()).st_size
        stream.seek(SUPERBLOCK_OFFSET)
        sb = stream.read(1024)
        if len(sb) < 1024 or struct.unpack_from("<H", sb, 56)[0] != EXT4_SUPER_MAGIC:
            raise ImageError(f"{self.shown} is not an ext2/3/4 image",
                             hint="check the path and the --format")
        (self.inodes_count, blocks_lo, _r, _f, _fi, self.first_data_block, log_bs, _lc,
         self.blocks_per_group, _cpg, self.inodes_per_group) = struct.unpack_from("<11I", sb)
        self.inode_size = struct.unpack_from("<H", sb, 88)[0]
        incompat = struct.unpack_from("<I", sb, 96)[0]
        self.desc_size = struct.unpack_from("<H", sb, 254)[0] if incompat & INCOMPAT_64BIT \
            else 32
        self.desc_size = self.desc_size or 32
        if log_bs > 6 or not self.blocks_per_group or not self.inodes_per_group \
                or self.inode_size < 128 or self.inode_size & (self.inode_size - 1) \
                or self.inode_size > (1024 << log_bs) or self.desc_size < 32 \
                or self.first_data_block > 1:
            raise self.damaged("superblock fields out of range (block size, group sizes, "
                               "inode or descriptor size)")
        self.block_size = 1024 << log_bs
        blocks_hi = struct.unpack_from("<I", sb, 336)[0] if incompat & INCOMPAT_64BIT else 0
        self.blocks_count = blocks_lo | (blocks_hi << 32)
        groups = -(-(self.blocks_count - self.first_data_block) // self.blocks_per_group)
        if groups <= 0 or groups * self.desc_size > self.file_size \
                or self.inodes_count > groups * self.inodes_per_group:
            raise self.damaged(f"{groups} block groups do not fit in the image")
        gdt = self.read_bytes((self.first_data_block + 1) * self.block_size,
                              groups * self.desc_size, "group descriptors")
        self.inode_tables = []
        for g in range(groups):
            lo = struct.unpack_from("<I", gdt, g * self.desc_size + 8)[0]
            hi = struct.unpack_from("<I", gdt, g * self.desc_size + 40)[0] \
                if self.desc_size >= 64 else 0
            self.inode_tables.append(lo | (hi << 32))

    @property
    def shown(self) -> str:
        return self.path.decode("utf-8", "backslashreplace")

    def damaged(self, detail: str) -> ImageError:
        return ImageError(f"{self.shown}: damaged ext4 image: {detail}",
                          hint="check it with e2fsck -fn")

    def read_bytes(self, offset: int, size: int, what: str) -> bytes:
        if offset < 0 or size < 0 or offset + size > self.file_size:
            raise self.damaged(f"{what} ({size} bytes at offset {offset}) lie past the end "
                               f"of the image ({self.file_size} bytes)")
        self.stream.seek(offset)
        return self.stream.read(size)

    def read_block(self, block: int) -> bytes:
        return self.read_bytes(block * self.block_size, self.block_size, f"block {block}")

    def inode(self, ino: int) -> bytes:
        if not 1 <= ino <= self.inodes_count:
            raise self.damaged(f"inode number {ino} is outside 1..{self.inodes_count}")
        group, index = divmod(ino - 1, self.inodes_per_group)
        return self.read_bytes(self.inode_tables[group] * self.block_size
                               + index * self.inode_size, self.inode_size, f"inode {ino}")

    def extents(self, node: bytes, ino: int, depth_above: int | None = None
                ) -> list[ImageExtent]:
        magic, entries, maximum, depth, _gen = EXT4_EXTENT_HEADER.unpack_from(node)
        if magic != EXTENT_MAGIC:
            raise self.damaged(f"inode {ino}: bad extent header")
        if depth > MAX_DEPTH or (depth_above is not None and depth != depth_above - 1) \
                or entries > maximum or 12 + 12 * entries > len(node):
            raise self.damaged(f"inode {ino}: extent node of depth {depth} with {entries} "
                               f"entries does not fit its place")
        out: list[ImageExtent] = []
        blocks = self.file_size // self.block_size
        for i in range(entries):
            off = 12 + 12 * i
            if depth == 0:
                logical, length, hi, lo = EXT4_EXTENT.unpack_from(node, off)
                if length > 32768:
                    continue  # unwritten extent: reads as zeros
                physical = lo | (hi << 32)
                if physical + length > blocks:
                    raise self.damaged(f"inode {ino}: extent of {length} blocks at block "
                                       f"{physical} lies past the end of the image")
                out.append(ImageExtent(logical, length, physical))
            else:
                _logical, lo, hi, _ = EXT4_EXTENT_IDX.unpack_from(node, off)
                out.extend(self.extents(self.read_block(lo | (hi << 32)), ino, depth))
        return out

    def file_extents(self, raw: bytes, ino: int) -> list[ImageExtent]:
        flags = struct.unpack_from("<I", raw, 32)[0]
        if not flags & EXTENTS_FL:
            raise ImageError(f"ext4 inode {ino} uses block maps, which this reader skips",
                             hint="only extent-mapped files are read")
        return self.extents(raw[40:100], ino)

    def data(self, raw: bytes, ino: int, size: int) -> bytes:
        """Small files only (directories, symlinks): at most the image's size."""
        if size > self.file_size:
            raise self.damaged(f"inode {ino} claims {size} bytes of metadata, more than "
                               "the image holds")
        out = bytearray(size)
        bs = self.block_size
        for ext in self.file_extents(raw, ino):
            for i in range(ext.length):
                pos = (ext.logical + i) * bs
                if pos >= size:
                    break
                out[pos: pos + bs] = self.read_block(ext.physical + i)[: size - pos]
        return bytes(out)

    def dir_entries(self, raw: bytes, ino: int) -> list[tuple[bytes, int]]:
        size = struct.unpack_from("<I", raw, 4)[0]
        data = self.data(raw, ino, size)
        out = []
        bs = self.block_size
        for base in range(0, len(data) - len(data) % bs, bs):
            pos = base
            while pos < base + bs - 8:
                child, rec_len, name_len, _ = EXT4_DIR_ENTRY_2.unpack_from(data, pos)
                if rec_len < 8 or rec_len % 4 or pos + rec_len > base + bs \
                        or 8 + name_len > rec_len:
                    raise self.damaged(f"directory inode {ino}: corrupt entry at {pos}")
                name = data[pos + 8: pos + 8 + name_len]
                if child and name not in (b".", b".."):
                    if not name or b"/" in name or b"\0" in name:
                        raise self.damaged(f"directory inode {ino}: bad name {name!r}")
                    out.append((name, child))
                pos += rec_len
        return sorted(out)

    def xattrs(self, raw: bytes, ino: int) -> tuple[tuple[bytes, bytes], ...]:
        found: list[tuple[bytes, bytes]] = []
        if self.inode_size > 128:
            extra = struct.unpack_from("<H", raw, 128)[0]
            start = 128 + extra
            if start + 4 <= len(raw) and struct.unpack_from("<I", raw, start)[0] == XATTR_MAGIC:
                found += self._entries(raw, start + 4, start + 4, ino)
        block = struct.unpack_from("<I", raw, 104)[0] | (struct.unpack_from("<H", raw, 118)[0]
                                                         << 32)
        if block:
            data = self.read_block(block)
            if struct.unpack_from("<I", data)[0] != XATTR_MAGIC:
                raise self.damaged(f"inode {ino}: bad xattr block {block}")
            found += self._entries(data, 32, 0, ino)
        names = [name for name, _ in found]
        if len(set(names)) != len(names):
            raise self.damaged(f"inode {ino}: an xattr name appears twice")
        return tuple(sorted(found))

    def _entries(self, region: bytes, pos: int, base: int, ino: int
                 ) -> list[tuple[bytes, bytes]]:
        try:
            return _xattr_entries(region, pos, base)
        except (struct.error, ValueError) as exc:
            raise self.damaged(f"inode {ino}: bad xattr entry ({exc})") from None


def _xattr_entries(region: bytes, pos: int, value_base: int) -> list[tuple[bytes, bytes]]:
    out = []
    while pos + 16 <= len(region) and struct.unpack_from("<I", region, pos)[0]:
        name_len, index, value_offs, _inum, value_size, _h = \
            EXT4_XATTR_ENTRY.unpack_from(region, pos)
        suffix = region[pos + 16: pos + 16 + name_len]
        if pos + 16 + name_len > len(region) \
                or value_base + value_offs + value_size > len(region):
            raise ValueError("a name or value lies past the end of its block")
        value = region[value_base + value_offs: value_base + value_offs + value_size]
        if index in (2, 3):
            value = acl_from_disk(value)
        out.append((XATTR_PREFIX_OF_INDEX.get(index, b"") + suffix, value))
        pos += (16 + name_len + 3) & ~3
    return out


def read_image(path: str | bytes | os.PathLike[str]) -> Tree:
    """Every file, directory and link in the image, in canonical order."""
    image_path = os.fsencode(path)
    with open(image_path, "rb") as stream:
        image = Ext4Image(image_path, stream)
        root_raw = image.inode(ROOT_INO)
        tree = Tree(_entry(image, b"", ROOT_INO, root_raw))
        seen: dict[int, bytes] = {}
        seen_dirs = {ROOT_INO}
        budget = EntryBudget(image.file_size, image_path)
        # Depth-first, children in name order: canonical order, so the first path of a
        # hardlink group (the primary) is the one the tree model expects.
        stack = [(b"", iter(_listing(image, root_raw, ROOT_INO, budget)))]
        while stack:
            parent, children = stack[-1]
            step = next(children, None)
            if step is None:
                stack.pop()
                continue
            name, child = step
            child_path = parent + b"/" + name if parent else name
            if child in seen:
                tree.add(Entry(child_path, EntryType.HARDLINK, 0, target=seen[child]))
                continue
            child_raw = image.inode(child)
            entry = _entry(image, child_path, child, child_raw)
            if entry.type is EntryType.REGULAR and struct.unpack_from("<H", child_raw, 26)[0] > 1:
                seen[child] = child_path
            tree.add(entry)
            if entry.type is EntryType.DIRECTORY:
                if child in seen_dirs:
                    raise image.damaged(f"directory inode {child} appears twice (a loop)")
                seen_dirs.add(child)
                stack.append((child_path, iter(_listing(image, child_raw, child, budget))))
    return tree


def _listing(image: Ext4Image, raw: bytes, ino: int, budget: EntryBudget
             ) -> list[tuple[bytes, int]]:
    entries = image.dir_entries(raw, ino)
    budget.take(len(entries))
    return entries


def _entry(image: Ext4Image, path: bytes, ino: int, raw: bytes) -> Entry:
    (mode, uid_lo, size_lo, _atime, _ctime, mtime, _dtime, gid_lo, _links, _blocks, flags,
     _osd1, i_block, _gen, _acl, size_hi, _faddr, _bh, _ah, uid_hi, gid_hi, _cl, _r,
     extra_isize, _ch, _cx, mtime_extra, *_rest) = EXT4_INODE.unpack_from(
        raw.ljust(160, b"\0"))
    kind = _TYPES.get(stat.S_IFMT(mode))
    if kind is None:
        raise ImageError(f"ext4 inode {ino} (/{path.decode(errors='replace')}) has an unknown"
                         f" file type {mode:o}")
    size = size_lo | (size_hi << 32)
    mtime_ns = decode_time(mtime, mtime_extra if extra_isize >= 12 else 0)
    fields: dict[str, object] = {}
    what = f"{image.shown}: /{path.decode(errors='replace')}"
    if kind is EntryType.REGULAR:
        if size > image.block_size << 32:
            raise image.damaged(f"inode {ino} claims {size} bytes, more than ext4 holds")
        pieces = _pieces(image.file_extents(raw, ino), size, image.block_size, what)
        fields["content"] = Content(size, file_region(image.path, pieces,
                                                      file_size=image.file_size, what=what))
    elif kind is EntryType.SYMLINK:
        if not 0 < size <= MAX_SYMLINK:
            raise image.damaged(f"symlink inode {ino} has a target of {size} bytes")
        if flags & EXTENTS_FL:
            fields["target"] = image.data(raw, ino, size)
        else:
            fields["target"] = i_block[:size]
    elif kind in (EntryType.CHAR, EntryType.BLOCK):
        b0, b1 = struct.unpack_from("<II", i_block)
        fields["rdev_major"], fields["rdev_minor"] = decode_device(b0, b1)
    return Entry(path, kind, stat.S_IMODE(mode), uid=uid_lo | (uid_hi << 16),
                 gid=gid_lo | (gid_hi << 16), mtime_ns=mtime_ns,
                 xattrs=image.xattrs(raw, ino), **fields)  # type: ignore[arg-type]
