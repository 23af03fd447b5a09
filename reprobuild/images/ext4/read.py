"""Read an ext4 image back into a :class:`~reprobuild.trees.tree.Tree` (for diff and tests).

Understands what the writer makes and what mke2fs makes with the usual features:
extents (with index blocks), linear and htree directories (read linearly, as the kernel
can), in-inode and block xattrs, fast and slow symlinks, device numbers in both
encodings, hardlinks by inode number. File contents stream from the image file.
``lost+found`` is kept: it is part of the image.
"""

from __future__ import annotations

import io
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


class _ExtentReader(io.RawIOBase):
    """A file's bytes read through its extents; holes read as zeros."""

    def __init__(self, path: bytes, extents: tuple[ImageExtent, ...], size: int,
                 block_size: int) -> None:
        super().__init__()
        self._image = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._extents = extents
        self._size = size
        self._bs = block_size
        self._pos = 0
        self._index = 0

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._image.close()
        super().close()

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        want = min(len(buffer), self._size - self._pos)
        if want <= 0:
            return 0
        bs = self._bs
        block = self._pos // bs
        while (self._index < len(self._extents)
               and self._extents[self._index].logical + self._extents[self._index].length
               <= block):
            self._index += 1
        view = memoryview(buffer).cast("B")
        if self._index < len(self._extents) and self._extents[self._index].logical <= block:
            ext = self._extents[self._index]
            end = (ext.logical + ext.length) * bs
            n = min(want, end - self._pos)
            self._image.seek(ext.physical * bs + self._pos - ext.logical * bs)
            data = self._image.read(n)
            if len(data) != n:
                raise ImageError("ext4 image is truncated: a file extent lies past its end")
            view[:n] = data
        else:
            nxt = (self._extents[self._index].logical * bs
                   if self._index < len(self._extents) else self._size)
            n = min(want, nxt - self._pos)
            view[:n] = bytes(n)
        self._pos += n
        return n


@dataclass(frozen=True)
class ExtentSource:
    """A regular file's bytes inside an ext4 image."""

    image: bytes
    extents: tuple[ImageExtent, ...]
    size: int
    block_size: int

    def open(self) -> BinaryIO:
        return io.BufferedReader(_ExtentReader(self.image, self.extents, self.size,
                                               self.block_size), 1 << 20)


class Ext4Image:
    """Random access to the structures of one ext4 image file."""

    def __init__(self, path: bytes, stream: BinaryIO) -> None:
        self.path = path
        self.stream = stream
        stream.seek(SUPERBLOCK_OFFSET)
        sb = stream.read(1024)
        if len(sb) < 1024 or struct.unpack_from("<H", sb, 56)[0] != EXT4_SUPER_MAGIC:
            raise ImageError(f"{path.decode(errors='replace')} is not an ext2/3/4 image",
                             hint="check the path and the --format")
        (self.inodes_count, blocks_lo, _r, _f, _fi, self.first_data_block, log_bs, _lc,
         self.blocks_per_group, _cpg, self.inodes_per_group) = struct.unpack_from("<11I", sb)
        self.block_size = 1024 << log_bs
        self.inode_size = struct.unpack_from("<H", sb, 88)[0]
        incompat = struct.unpack_from("<I", sb, 96)[0]
        self.desc_size = struct.unpack_from("<H", sb, 254)[0] if incompat & INCOMPAT_64BIT \
            else 32
        self.desc_size = self.desc_size or 32
        blocks_hi = struct.unpack_from("<I", sb, 336)[0] if incompat & INCOMPAT_64BIT else 0
        self.blocks_count = blocks_lo | (blocks_hi << 32)
        groups = -(-(self.blocks_count - self.first_data_block) // self.blocks_per_group)
        gdt_block = self.first_data_block + 1
        stream.seek(gdt_block * self.block_size)
        gdt = stream.read(groups * self.desc_size)
        self.inode_tables = []
        for g in range(groups):
            lo = struct.unpack_from("<I", gdt, g * self.desc_size + 8)[0]
            hi = struct.unpack_from("<I", gdt, g * self.desc_size + 40)[0] \
                if self.desc_size >= 64 else 0
            self.inode_tables.append(lo | (hi << 32))

    def read_block(self, block: int) -> bytes:
        self.stream.seek(block * self.block_size)
        data = self.stream.read(self.block_size)
        if len(data) != self.block_size:
            raise ImageError(f"ext4 image is truncated: block {block} lies past its end")
        return data

    def inode(self, ino: int) -> bytes:
        group, index = divmod(ino - 1, self.inodes_per_group)
        self.stream.seek(self.inode_tables[group] * self.block_size + index * self.inode_size)
        return self.stream.read(self.inode_size)

    def extents(self, node: bytes, ino: int) -> list[ImageExtent]:
        magic, entries, _max, depth, _gen = EXT4_EXTENT_HEADER.unpack_from(node)
        if magic != EXTENT_MAGIC:
            raise ImageError(f"ext4 inode {ino}: bad extent header")
        out: list[ImageExtent] = []
        for i in range(entries):
            off = 12 + 12 * i
            if depth == 0:
                logical, length, hi, lo = EXT4_EXTENT.unpack_from(node, off)
                if length > 32768:
                    length -= 32768  # unwritten extent: reads as zeros
                    continue
                out.append(ImageExtent(logical, length, lo | (hi << 32)))
            else:
                _logical, lo, hi, _ = EXT4_EXTENT_IDX.unpack_from(node, off)
                out.extend(self.extents(self.read_block(lo | (hi << 32)), ino))
        return out

    def file_extents(self, raw: bytes, ino: int) -> list[ImageExtent]:
        flags = struct.unpack_from("<I", raw, 32)[0]
        if not flags & EXTENTS_FL:
            raise ImageError(f"ext4 inode {ino} uses block maps, which this reader skips",
                             hint="only extent-mapped files are read")
        return self.extents(raw[40:100], ino)

    def data(self, raw: bytes, ino: int, size: int) -> bytes:
        """Small files only (directories, symlinks)."""
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
        for base in range(0, len(data), bs):
            pos = base
            while pos < base + bs - 8:
                child, rec_len, name_len, _ = EXT4_DIR_ENTRY_2.unpack_from(data, pos)
                if rec_len < 8:
                    raise ImageError(f"ext4 directory inode {ino}: corrupt entry at {pos}")
                name = data[pos + 8: pos + 8 + name_len]
                if child and name not in (b".", b".."):
                    out.append((name, child))
                pos += rec_len
        return sorted(out)

    def xattrs(self, raw: bytes, ino: int) -> tuple[tuple[bytes, bytes], ...]:
        found: list[tuple[bytes, bytes]] = []
        if self.inode_size > 128:
            extra = struct.unpack_from("<H", raw, 128)[0]
            start = 128 + extra
            if start + 4 <= len(raw) and struct.unpack_from("<I", raw, start)[0] == XATTR_MAGIC:
                found += _xattr_entries(raw, start + 4, start + 4)
        block = struct.unpack_from("<I", raw, 104)[0] | (struct.unpack_from("<H", raw, 118)[0]
                                                         << 32)
        if block:
            data = self.read_block(block)
            if struct.unpack_from("<I", data)[0] != XATTR_MAGIC:
                raise ImageError(f"ext4 inode {ino}: bad xattr block {block}")
            found += _xattr_entries(data, 32, 0)
        return tuple(sorted(found))


def _xattr_entries(region: bytes, pos: int, value_base: int) -> list[tuple[bytes, bytes]]:
    out = []
    while pos + 16 <= len(region) and struct.unpack_from("<I", region, pos)[0]:
        name_len, index, value_offs, _inum, value_size, _h = \
            EXT4_XATTR_ENTRY.unpack_from(region, pos)
        suffix = region[pos + 16: pos + 16 + name_len]
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
        # Depth-first, children in name order: canonical order, so the first path of a
        # hardlink group (the primary) is the one the tree model expects.
        stack = [(b"", iter(image.dir_entries(root_raw, ROOT_INO)))]
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
                stack.append((child_path, iter(image.dir_entries(child_raw, child))))
    return tree


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
    if kind is EntryType.REGULAR:
        extents = tuple(image.file_extents(raw, ino))
        fields["content"] = Content(size, ExtentSource(image.path, extents, size,
                                                       image.block_size))
    elif kind is EntryType.SYMLINK:
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
