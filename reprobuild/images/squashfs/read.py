"""Read a squashfs 4.0 image back into a tree whose file contents stream from the image.

Used by ``reprobuild diff`` and the tests. It parses the superblock, the id, fragment and
xattr tables, then walks the directory table from the root inode. Files that share an
inode become one regular entry (the first path in canonical order) and hardlinks to it.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass, field
from typing import BinaryIO

from reprobuild.errors import ImageError
from reprobuild.images.squashfs.compressors import Compressor, compressor_from_superblock
from reprobuild.images.squashfs.ondisk import (
    SQUASHFS_BASE_INODE,
    SQUASHFS_BLKDEV_TYPE,
    SQUASHFS_CHRDEV_TYPE,
    SQUASHFS_COMPRESSED_BIT,
    SQUASHFS_COMPRESSED_BIT_BLOCK,
    SQUASHFS_DEV_INODE,
    SQUASHFS_DIR_ENTRY,
    SQUASHFS_DIR_HEADER,
    SQUASHFS_DIR_INODE,
    SQUASHFS_DIR_TYPE,
    SQUASHFS_EXTENDED,
    SQUASHFS_FIFO_TYPE,
    SQUASHFS_FRAGMENT_ENTRY,
    SQUASHFS_INVALID_BLK,
    SQUASHFS_INVALID_FRAG,
    SQUASHFS_INVALID_XATTR,
    SQUASHFS_LDIR_INODE,
    SQUASHFS_LDIR_TYPE,
    SQUASHFS_LREG_INODE,
    SQUASHFS_LREG_TYPE,
    SQUASHFS_MAGIC,
    SQUASHFS_METADATA_HEADER,
    SQUASHFS_METADATA_SIZE,
    SQUASHFS_REG_INODE,
    SQUASHFS_REG_TYPE,
    SQUASHFS_SOCKET_TYPE,
    SQUASHFS_SUPER_BLOCK,
    SQUASHFS_SYMLINK_INODE,
    SQUASHFS_SYMLINK_TYPE,
    SQUASHFS_XATTR_ENTRY,
    SQUASHFS_XATTR_ID,
    SQUASHFS_XATTR_ID_TABLE,
    SQUASHFS_XATTR_VAL,
    SQUASHFS_XATTR_VALUE_OOL,
    U32,
    U64,
    XATTR_PREFIXES,
    decode_rdev,
)
from reprobuild.trees.region import EntryBudget
from reprobuild.trees.tree import Content, Entry, EntryType, Tree, path_key, sort_xattrs


@dataclass(frozen=True)
class Superblock:
    inode_count: int
    mkfs_time: int
    block_size: int
    fragment_count: int
    compression: int
    flags: int
    id_count: int
    root_inode: int
    bytes_used: int
    id_table_start: int
    xattr_id_table_start: int
    inode_table_start: int
    directory_table_start: int
    fragment_table_start: int
    lookup_table_start: int


def read_superblock(image: BinaryIO) -> Superblock:
    image.seek(0)
    raw = image.read(SQUASHFS_SUPER_BLOCK.size)
    if len(raw) < SQUASHFS_SUPER_BLOCK.size:
        raise ImageError("squashfs: the image is shorter than a superblock")
    (magic, inodes, mkfs_time, block_size, fragments, compression, block_log, flags, ids,
     major, minor, root, bytes_used, id_start, xattr_start, inode_start, dir_start,
     frag_start, lookup_start) = SQUASHFS_SUPER_BLOCK.unpack(raw)
    if magic != SQUASHFS_MAGIC:
        raise ImageError("squashfs: bad magic; this is not a squashfs image")
    if (major, minor) != (4, 0):
        raise ImageError(f"squashfs: version {major}.{minor} is not supported (only 4.0)")
    if block_size != 1 << block_log:
        raise ImageError(f"squashfs: block size {block_size} disagrees with log {block_log}")
    return Superblock(inodes, mkfs_time, block_size, fragments, compression, flags, ids,
                      root, bytes_used, id_start, xattr_start, inode_start, dir_start,
                      frag_start, lookup_start)


class MetadataReader:
    """Reads byte ranges that span metadata blocks, caching decompressed blocks."""

    def __init__(self, image: BinaryIO, compressor: Compressor) -> None:
        self.image = image
        self.compressor = compressor
        self.cache: dict[int, tuple[bytes, int]] = {}
        self.file_size = os.fstat(image.fileno()).st_size
        # What a metadata read may ask for: every 8 KiB block takes at least 3 bytes of
        # the image, so a longer read can only come from a damaged length or count.
        self.limit = SQUASHFS_METADATA_SIZE * (self.file_size // 3 + 1)

    def block(self, position: int) -> tuple[bytes, int]:
        """The decompressed block at ``position`` and the position of the next one."""
        cached = self.cache.get(position)
        if cached is not None:
            return cached
        if not 0 <= position <= self.file_size - 2:
            raise ImageError(f"squashfs: metadata block at {position} lies outside the image")
        self.image.seek(position)
        (header,) = SQUASHFS_METADATA_HEADER.unpack(self.image.read(2))
        length = header & ~SQUASHFS_COMPRESSED_BIT
        raw = self.image.read(length)
        if len(raw) != length or length == 0 or length > SQUASHFS_METADATA_SIZE:
            raise ImageError(f"squashfs: bad metadata block at {position}")
        data = raw if header & SQUASHFS_COMPRESSED_BIT else self.compressor.decompress(
            raw, SQUASHFS_METADATA_SIZE)
        result = (data, position + 2 + length)
        self.cache[position] = result
        return result

    def read(self, position: int, offset: int, size: int) -> tuple[bytes, int, int]:
        """``size`` bytes from (block at ``position``, ``offset``); and where they end."""
        if size > self.limit:
            raise ImageError(f"squashfs: a metadata read of {size} bytes is more than the "
                             "image can hold")
        out = bytearray()
        while len(out) < size:
            data, following = self.block(position)
            if offset >= len(data):
                if offset > len(data):
                    raise ImageError("squashfs: metadata reference past a block's end")
                position, offset = following, 0
                continue
            take = data[offset:offset + size - len(out)]
            out += take
            offset += len(take)
            if offset == len(data) and len(out) < size:
                position, offset = following, 0
        return bytes(out), position, offset

    def lookup_table(self, start: int, count: int, entry_size: int) -> bytes:
        """A table of ``count`` entries stored as metadata blocks listed at ``start``."""
        total = count * entry_size
        blocks = (total + SQUASHFS_METADATA_SIZE - 1) // SQUASHFS_METADATA_SIZE
        if total > self.limit or not 0 <= start <= self.file_size - 8 * blocks:
            raise ImageError(f"squashfs: a table of {count} entries at {start} does not fit "
                             "in the image")
        self.image.seek(start)
        index = self.image.read(8 * blocks)
        out = bytearray()
        for i in range(blocks):
            (position,) = U64.unpack_from(index, 8 * i)
            out += self.block(position)[0]
        return bytes(out[:total])


@dataclass(frozen=True)
class BlockSource:
    """A regular file's bytes, decompressed from the image block by block."""

    image_path: bytes
    compressor: Compressor = field(compare=False)
    block_size: int
    file_size: int
    start: int
    block_sizes: tuple[int, ...]
    fragment: tuple[int, int, int] | None  # (block position, size field, offset)

    def open(self) -> BinaryIO:
        return io.BufferedReader(_BlockStream(self), buffer_size=self.block_size)


class _BlockStream(io.RawIOBase):
    def __init__(self, source: BlockSource) -> None:
        self.source = source
        self.image = open(source.image_path, "rb")  # noqa: SIM115 - closed in close()
        self.file_size = os.fstat(self.image.fileno()).st_size
        self.block_number = 0
        self.position = source.start
        self.buffer = b""
        self.remaining = source.file_size

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.image.close()
        super().close()

    def _next_block(self) -> bytes:
        source = self.source
        want = min(source.block_size, self.remaining)
        if self.block_number < len(source.block_sizes):
            size_field = source.block_sizes[self.block_number]
            self.block_number += 1
            if size_field == 0:
                return bytes(want)
            data = self._load(self.position, size_field, want)
            self.position += size_field & ~SQUASHFS_COMPRESSED_BIT_BLOCK
            return data
        if source.fragment is None:
            raise ImageError("squashfs: a file's blocks end before its size")
        position, size_field, offset = source.fragment
        block = self._load(position, size_field, offset + want)
        return block[offset:offset + want]

    def _load(self, position: int, size_field: int, want: int) -> bytes:
        length = size_field & ~SQUASHFS_COMPRESSED_BIT_BLOCK
        if length > self.source.block_size or not 0 <= position <= self.file_size - length:
            raise ImageError(f"squashfs: a data block of {length} bytes at {position} lies "
                             "outside the image", hint="the image is truncated or damaged")
        self.image.seek(position)
        raw = self.image.read(length)
        if size_field & SQUASHFS_COMPRESSED_BIT_BLOCK:
            data = raw
        else:
            data = self.source.compressor.decompress(raw, self.source.block_size)
        if len(data) < want:
            raise ImageError(f"squashfs: a data block at {position} is short")
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if not self.buffer:
            if self.remaining <= 0:
                return 0
            block = self._next_block()
            block = block[:self.remaining]
            self.remaining -= len(block)
            self.buffer = block
        n = min(len(buffer), len(self.buffer))
        buffer[:n] = self.buffer[:n]
        self.buffer = self.buffer[n:]
        return n


@dataclass
class _Reader:
    path: bytes
    image: BinaryIO
    sb: Superblock
    compressor: Compressor
    metadata: MetadataReader
    ids: tuple[int, ...] = ()
    fragments: tuple[tuple[int, int], ...] = ()
    xattr_ids: tuple[tuple[int, int, int], ...] = ()
    xattr_start: int = 0
    # path -> (on-disk inode type, directory headers); filled by the walk, for inspection
    layout: dict[bytes, tuple[int, int]] = field(default_factory=dict)
    last_kind: int = 0
    last_headers: int = 0

    def xattrs(self, index: int) -> tuple[tuple[bytes, bytes], ...]:
        if index == SQUASHFS_INVALID_XATTR:
            return ()
        ref, count, _ = self.xattr_ids[index]
        position, offset = self.xattr_start + (ref >> 16), ref & 0xFFFF
        pairs = []
        for _ in range(count):
            head, position, offset = self.metadata.read(position, offset,
                                                        SQUASHFS_XATTR_ENTRY.size)
            kind, name_size = SQUASHFS_XATTR_ENTRY.unpack(head)
            name, position, offset = self.metadata.read(position, offset, name_size)
            head, position, offset = self.metadata.read(position, offset,
                                                        SQUASHFS_XATTR_VAL.size)
            (value_size,) = SQUASHFS_XATTR_VAL.unpack(head)
            value, position, offset = self.metadata.read(position, offset, value_size)
            if kind & SQUASHFS_XATTR_VALUE_OOL:
                (ool,) = U64.unpack(value)
                vpos, voff = self.xattr_start + (ool >> 16), ool & 0xFFFF
                head, vpos, voff = self.metadata.read(vpos, voff, SQUASHFS_XATTR_VAL.size)
                (value_size,) = SQUASHFS_XATTR_VAL.unpack(head)
                value = self.metadata.read(vpos, voff, value_size)[0]
            prefix = XATTR_PREFIXES[kind & 0xFF]
            pairs.append((prefix + name, value))
        return sort_xattrs(pairs)

    def inode(self, ref: int) -> tuple[int, dict[str, object], tuple[int, ...]]:
        """(inode type, fields for an Entry, (number, extra...)) of the inode at ``ref``."""
        position = self.sb.inode_table_start + (ref >> 16)
        offset = ref & 0xFFFF

        def take(size: int) -> bytes:
            nonlocal position, offset
            data, position, offset = self.metadata.read(position, offset, size)
            return data

        kind, mode, uid, gid, mtime, number = SQUASHFS_BASE_INODE.unpack(
            take(SQUASHFS_BASE_INODE.size))
        fields: dict[str, object] = {"mode": mode & 0o7777, "uid": self.ids[uid],
                                     "gid": self.ids[gid],
                                     "mtime_ns": mtime * 1_000_000_000}
        xattr = SQUASHFS_INVALID_XATTR
        extra: tuple[int, ...]
        basic = kind - SQUASHFS_EXTENDED if kind > SQUASHFS_EXTENDED else kind
        self.last_kind = kind
        if kind == SQUASHFS_DIR_TYPE:
            start, _, size, off, _ = SQUASHFS_DIR_INODE.unpack(take(SQUASHFS_DIR_INODE.size))
            extra = (number, start, off, size)
        elif kind == SQUASHFS_LDIR_TYPE:
            _, size, start, _, _, off, xattr = SQUASHFS_LDIR_INODE.unpack(
                take(SQUASHFS_LDIR_INODE.size))
            extra = (number, start, off, size)
        elif kind in (SQUASHFS_REG_TYPE, SQUASHFS_LREG_TYPE):
            if kind == SQUASHFS_REG_TYPE:
                start, frag, frag_off, size = SQUASHFS_REG_INODE.unpack(
                    take(SQUASHFS_REG_INODE.size))
            else:
                start, size, _, _, frag, frag_off, xattr = SQUASHFS_LREG_INODE.unpack(
                    take(SQUASHFS_LREG_INODE.size))
            count = size // self.sb.block_size
            if frag == SQUASHFS_INVALID_FRAG and size % self.sb.block_size:
                count += 1
            raw_sizes = take(4 * count)
            sizes = tuple(U32.unpack_from(raw_sizes, 4 * i)[0] for i in range(count))
            fragment = None
            if frag != SQUASHFS_INVALID_FRAG:
                fpos, fsize = self.fragments[frag]
                fragment = (fpos, fsize, frag_off)
            source = BlockSource(self.path, self.compressor, self.sb.block_size, size,
                                 start, sizes, fragment)
            fields["content"] = Content(size, source)
            extra = (number,)
        elif basic == SQUASHFS_SYMLINK_TYPE:
            _, target_size = SQUASHFS_SYMLINK_INODE.unpack(take(SQUASHFS_SYMLINK_INODE.size))
            fields["target"] = take(target_size)
            if kind != SQUASHFS_SYMLINK_TYPE:
                (xattr,) = U32.unpack(take(4))
            extra = (number,)
        elif basic in (SQUASHFS_BLKDEV_TYPE, SQUASHFS_CHRDEV_TYPE):
            _, rdev = SQUASHFS_DEV_INODE.unpack(take(SQUASHFS_DEV_INODE.size))
            if kind != basic:
                (xattr,) = U32.unpack(take(4))
            fields["rdev_major"], fields["rdev_minor"] = decode_rdev(rdev)
            extra = (number,)
        elif basic in (SQUASHFS_FIFO_TYPE, SQUASHFS_SOCKET_TYPE):
            take(4)
            if kind != basic:
                (xattr,) = U32.unpack(take(4))
            extra = (number,)
        else:
            raise ImageError(f"squashfs: unknown inode type {kind} at reference {ref:#x}")
        fields["xattrs"] = self.xattrs(xattr)
        return basic, fields, extra

    def listing(self, start: int, offset: int, size: int) -> list[tuple[bytes, int]]:
        """(name, inode reference) of a directory's entries."""
        position = self.sb.directory_table_start + start
        remaining = size - 3
        out = []
        self.last_headers = 0
        while remaining > 0:
            self.last_headers += 1
            head, position, offset = self.metadata.read(position, offset,
                                                        SQUASHFS_DIR_HEADER.size)
            remaining -= len(head)
            count, inode_block, _ = SQUASHFS_DIR_HEADER.unpack(head)
            for _ in range(count + 1):
                raw, position, offset = self.metadata.read(position, offset,
                                                           SQUASHFS_DIR_ENTRY.size)
                inode_offset, _, _, name_size = SQUASHFS_DIR_ENTRY.unpack(raw)
                name, position, offset = self.metadata.read(position, offset, name_size + 1)
                remaining -= len(raw) + len(name)
                out.append((name, (inode_block << 16) | inode_offset))
        return out


TYPES = {
    SQUASHFS_DIR_TYPE: EntryType.DIRECTORY,
    SQUASHFS_REG_TYPE: EntryType.REGULAR,
    SQUASHFS_SYMLINK_TYPE: EntryType.SYMLINK,
    SQUASHFS_BLKDEV_TYPE: EntryType.BLOCK,
    SQUASHFS_CHRDEV_TYPE: EntryType.CHAR,
    SQUASHFS_FIFO_TYPE: EntryType.FIFO,
    SQUASHFS_SOCKET_TYPE: EntryType.SOCKET,
}


def read_image(path: str | bytes) -> Tree:
    """The tree stored in the squashfs image at ``path``."""
    return _read(path)[0]


def _corrupt(path: bytes, error: Exception) -> ImageError:
    return ImageError(f"squashfs: {path.decode(errors='replace')} is corrupt or not a"
                      f" squashfs 4.0 image ({type(error).__name__}: {error})",
                      hint="check the image with unsquashfs -s")


def inspect_image(path: str | bytes) -> dict[bytes, tuple[int, int]]:
    """Per path: the on-disk inode type and, for directories, the number of headers."""
    return _read(path)[1]


def _read(path: str | bytes) -> tuple[Tree, dict[bytes, tuple[int, int]]]:
    image_path = os.fsencode(path)
    try:
        return _read_tables(image_path)
    except (IndexError, KeyError, ValueError, struct.error, RecursionError) as error:
        raise _corrupt(image_path, error) from None


def _read_tables(image_path: bytes) -> tuple[Tree, dict[bytes, tuple[int, int]]]:
    with open(image_path, "rb") as image:
        sb = read_superblock(image)
        # Every block says whether it is compressed; compressor options only tune
        # compression, so decompression needs none of them.
        compressor = compressor_from_superblock(sb.compression, sb.block_size)
        metadata = MetadataReader(image, compressor)
        reader = _Reader(image_path, image, sb, compressor, metadata)
        raw_ids = metadata.lookup_table(sb.id_table_start, sb.id_count, 4)
        reader.ids = tuple(U32.unpack_from(raw_ids, 4 * i)[0] for i in range(sb.id_count))
        raw_frags = metadata.lookup_table(sb.fragment_table_start, sb.fragment_count,
                                          SQUASHFS_FRAGMENT_ENTRY.size)
        reader.fragments = tuple(
            SQUASHFS_FRAGMENT_ENTRY.unpack_from(raw_frags, 16 * i)[:2]
            for i in range(sb.fragment_count))
        if sb.xattr_id_table_start != SQUASHFS_INVALID_BLK:
            image.seek(sb.xattr_id_table_start)
            start, count, _ = SQUASHFS_XATTR_ID_TABLE.unpack(
                image.read(SQUASHFS_XATTR_ID_TABLE.size))
            raw_xids = metadata.lookup_table(
                sb.xattr_id_table_start + SQUASHFS_XATTR_ID_TABLE.size, count,
                SQUASHFS_XATTR_ID.size)
            reader.xattr_start = start
            reader.xattr_ids = tuple(SQUASHFS_XATTR_ID.unpack_from(raw_xids, 16 * i)
                                     for i in range(count))
        return _walk(reader), reader.layout


def _walk(reader: _Reader) -> Tree:
    kind, fields, extra = reader.inode(reader.sb.root_inode)
    if kind != SQUASHFS_DIR_TYPE:
        raise ImageError("squashfs: the root inode is not a directory")
    tree = Tree(Entry(b"", EntryType.DIRECTORY, **fields))  # type: ignore[arg-type]
    found: list[tuple[bytes, EntryType, dict[str, object], int]] = []
    reader.layout[b""] = (reader.last_kind, 0)
    stack: list[tuple[bytes, tuple[int, ...]]] = [(b"", extra)]
    seen_directories: set[int] = set()
    # Listings are compressed: allow many entries per image byte, but not without bound.
    budget = EntryBudget(8 * reader.metadata.file_size, reader.path)
    while stack:
        path, (number, start, offset, size) = stack.pop()
        if number in seen_directories:
            raise ImageError(f"squashfs: directory inode {number} appears twice; the"
                             " image is corrupt")
        seen_directories.add(number)
        listing = reader.listing(start, offset, size)
        budget.take(len(listing))
        reader.layout[path] = (reader.layout[path][0], reader.last_headers)
        for name, ref in listing:
            child = path + b"/" + name if path else name
            kind, fields, extra = reader.inode(ref)
            reader.layout[child] = (reader.last_kind, 0)
            found.append((child, TYPES[kind], fields, extra[0]))
            if kind == SQUASHFS_DIR_TYPE:
                stack.append((child, extra))
    # In canonical order, the first path of a shared inode is its primary.
    found.sort(key=lambda item: path_key(item[0]))
    seen: dict[int, bytes] = {}
    for path, entry_type, fields, number in found:
        if entry_type is EntryType.REGULAR and number in seen:
            tree.add(Entry(path, EntryType.HARDLINK, mode=fields["mode"],  # type: ignore[arg-type]
                           target=seen[number]))
            continue
        if entry_type is EntryType.REGULAR:
            seen[number] = path
        tree.add(Entry(path, entry_type, **fields))  # type: ignore[arg-type]
    return tree
