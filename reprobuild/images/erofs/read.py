"""Read an uncompressed EROFS image back into a :class:`Tree` (for diff and tests).

Parses the superblock, compact and extended inodes, FLAT_PLAIN and FLAT_INLINE data,
directory blocks and inline and shared xattrs. Metadata is read through a read-only
memory map; file contents are not copied but stream from the image on demand.
"""

from __future__ import annotations

import io
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from typing import BinaryIO

from reprobuild.errors import ImageError
from reprobuild.images.erofs.compress import COMPRESSED_FULL, index_area_size, read_compressed
from reprobuild.images.erofs.ondisk import (
    EROFS_DIRENT,
    EROFS_INODE_COMPACT,
    EROFS_INODE_EXTENDED,
    EROFS_SUPER_BLOCK,
    EROFS_SUPER_MAGIC,
    EROFS_SUPER_OFFSET,
    EROFS_XATTR_ENTRY,
    EROFS_XATTR_IBODY_HEADER,
    FEATURE_COMPAT_SB_CHKSUM,
    INODE_CHUNK_BASED,
    INODE_FLAT_INLINE,
    INODE_FLAT_PLAIN,
    ISLOT_SIZE,
    SB_CHECKSUM_OFFSET,
    XATTR_PREFIX_OF_INDEX,
    decode_dev,
    superblock_crc32c,
    xattr_align,
)
from reprobuild.trees.region import EntryBudget, file_region
from reprobuild.trees.tree import Content, Entry, EntryType, Tree, sort_xattrs

_TYPE_OF_MODE = {
    stat.S_IFREG: EntryType.REGULAR,
    stat.S_IFDIR: EntryType.DIRECTORY,
    stat.S_IFLNK: EntryType.SYMLINK,
    stat.S_IFCHR: EntryType.CHAR,
    stat.S_IFBLK: EntryType.BLOCK,
    stat.S_IFIFO: EntryType.FIFO,
    stat.S_IFSOCK: EntryType.SOCKET,
}


@dataclass(frozen=True)
class ErofsCompressedSource:
    """A compressed regular file inside an EROFS image, decompressed when opened."""

    image: bytes
    index_base: int
    size: int

    def open(self) -> BinaryIO:
        with open(self.image, "rb") as stream, \
                mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                return io.BytesIO(read_compressed(data, self.index_base, self.size))
            except (struct.error, IndexError, ValueError) as exc:
                raise ImageError(f"{self.image.decode(errors='replace')}: damaged compressed "
                                 f"file data in an EROFS image ({exc})") from None


@dataclass(frozen=True)
class _Inode:
    st_mode: int
    nlink: int
    size: int
    uid: int
    gid: int
    mtime_ns: int
    rdev: int
    ranges: tuple[tuple[int, int], ...]
    xattrs: tuple[tuple[bytes, bytes], ...]
    index_base: int | None = None  # compressed: where the lcluster indexes start
    hole: bool = False  # chunk-based with no chunk allocated: reads as zeros (composefs)


class _Image:
    def __init__(self, path: bytes, data: mmap.mmap) -> None:
        self.path = path
        self.data = data
        if len(data) < EROFS_SUPER_OFFSET + EROFS_SUPER_BLOCK.size:
            raise ImageError(f"{path.decode(errors='replace')} is too small for EROFS")
        (magic, checksum, compat, blkszbits, _extslots, self.root_nid, _inos, self.build_time,
         self.build_time_nsec, _blocks, meta_blkaddr, xattr_blkaddr, _uuid, _name,
         _incompat, *_rest) = EROFS_SUPER_BLOCK.unpack_from(data, EROFS_SUPER_OFFSET)
        if magic != EROFS_SUPER_MAGIC:
            raise ImageError(f"{path.decode(errors='replace')} is not an EROFS image")
        if not 9 <= blkszbits <= 16:
            raise ImageError(f"{path.decode(errors='replace')}: EROFS block size 2^{blkszbits}"
                             " is not one the kernel reads (512 bytes to 64 KiB)")
        self.block_size = 1 << blkszbits
        if compat & FEATURE_COMPAT_SB_CHKSUM:
            block = bytearray(data[EROFS_SUPER_OFFSET:max(self.block_size, 4096)])
            block[SB_CHECKSUM_OFFSET:SB_CHECKSUM_OFFSET + 4] = bytes(4)
            if superblock_crc32c(bytes(block)) ^ 0xFFFFFFFF != checksum:
                raise ImageError(f"{path.decode(errors='replace')}: bad superblock checksum")
        self.meta = meta_blkaddr * self.block_size
        self.xattr_base = xattr_blkaddr * self.block_size

    def inode(self, nid: int) -> _Inode:
        at = self.meta + nid * ISLOT_SIZE
        self.inside(at, 2, f"inode {nid}")
        i_format = int.from_bytes(self.data[at:at + 2], "little")
        self.inside(at, EROFS_INODE_EXTENDED.size if i_format & 1 else EROFS_INODE_COMPACT.size,
                    f"inode {nid}")
        extended = i_format & 1
        datalayout = (i_format >> 1) & 7
        if extended:
            (_, icount, mode, _, size, i_u, _, uid, gid, mtime, mtime_nsec, nlink,
             _) = EROFS_INODE_EXTENDED.unpack_from(self.data, at)
            isize = EROFS_INODE_EXTENDED.size
        else:
            (_, icount, mode, nlink, size, mtime_offset, i_u, _, uid, gid,
             _) = EROFS_INODE_COMPACT.unpack_from(self.data, at)
            mtime = self.build_time + mtime_offset
            mtime_nsec = self.build_time_nsec
            isize = EROFS_INODE_COMPACT.size
        xattr_size = EROFS_XATTR_IBODY_HEADER.size + 4 * (icount - 1) if icount else 0
        self.inside(at, isize + xattr_size, f"inode {nid} with its xattrs")
        xattrs = self._xattrs(at + isize, xattr_size) if icount else ()
        ranges: tuple[tuple[int, int], ...] = ()
        index_base = None
        hole = False
        kind = stat.S_IFMT(mode)
        if kind in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK) and size:
            if datalayout == COMPRESSED_FULL and kind == stat.S_IFREG:
                end = at + isize + xattr_size
                index_base = end + index_area_size(isize + xattr_size, 0)
                if end + index_area_size(isize + xattr_size, size) > len(self.data):
                    raise ImageError(f"EROFS inode {nid}: {size} bytes need more cluster "
                                     "indexes than the image holds")
            elif datalayout == INODE_FLAT_PLAIN:
                ranges = ((i_u * self.block_size, size),)
            elif datalayout == INODE_FLAT_INLINE:
                plain = (-(-size // self.block_size) - 1) * self.block_size
                ranges = ((i_u * self.block_size, plain), (at + isize + xattr_size, size - plain))
            elif datalayout == INODE_CHUNK_BASED and kind == stat.S_IFREG:
                hole = self._unallocated(nid, at + isize + xattr_size, i_u, size)
            else:
                raise ImageError(
                    f"EROFS inode {nid} uses data layout {datalayout}, which reprobuild"
                    " cannot read", hint="only uncompressed flat EROFS images can be read")
        return _Inode(mode, nlink, size, uid, gid, mtime * 1_000_000_000 + mtime_nsec,
                      i_u, tuple(r for r in ranges if r[1]), xattrs, index_base, hole)

    def _unallocated(self, nid: int, at: int, chunk_format: int, size: int) -> bool:
        """True for a chunk-based file whose block map allocates no chunk (composefs
        writes files stored elsewhere so); allocated chunks are refused."""
        bits = self.block_size.bit_length() - 1 + (chunk_format & 0x1F)
        count = -(-size // (1 << bits))
        if chunk_format & 0x20 or count > len(self.data) // 4:  # 8-byte chunk indexes
            raise ImageError(f"EROFS inode {nid} uses chunk indexes, which reprobuild "
                             "cannot read")
        self.inside(at, 4 * count, f"inode {nid}'s chunk map")
        if self.data[at:at + 4 * count] != b"\xff" * (4 * count):
            raise ImageError(f"EROFS inode {nid} has allocated chunks, which reprobuild "
                             "cannot read", hint="only unallocated (composefs) chunk maps")
        return True

    def inside(self, at: int, size: int, what: str) -> None:
        """Refuse a structure of ``size`` bytes at ``at`` that is not inside the image."""
        if at < 0 or at + size > len(self.data):
            raise ImageError(f"{self.path.decode(errors='replace')}: EROFS {what} at offset "
                             f"{at} lies past the end of the image ({len(self.data)} bytes)")

    def _xattrs(self, at: int, size: int) -> tuple[tuple[bytes, bytes], ...]:
        _, shared_count, _ = EROFS_XATTR_IBODY_HEADER.unpack_from(self.data, at)
        found: list[tuple[bytes, bytes]] = []
        pos = at + EROFS_XATTR_IBODY_HEADER.size
        for _ in range(shared_count):
            xattr_id = int.from_bytes(self.data[pos:pos + 4], "little")
            found.append(self._xattr_entry(self.xattr_base + 4 * xattr_id)[0])
            pos += 4
        while pos < at + size:
            xattr, length = self._xattr_entry(pos)
            found.append(xattr)
            pos += length
        return sort_xattrs(found)

    def _xattr_entry(self, at: int) -> tuple[tuple[bytes, bytes], int]:
        self.inside(at, EROFS_XATTR_ENTRY.size, "xattr")
        name_len, index, value_size = EROFS_XATTR_ENTRY.unpack_from(self.data, at)
        prefix = XATTR_PREFIX_OF_INDEX.get(index)
        if prefix is None:
            raise ImageError(f"EROFS xattr name index {index} is not supported")
        start = at + EROFS_XATTR_ENTRY.size
        name = prefix + self.data[start:start + name_len]
        value = self.data[start + name_len:start + name_len + value_size]
        return (name, value), xattr_align(EROFS_XATTR_ENTRY.size + name_len + value_size)

    def bytes_of(self, inode: _Inode) -> bytes:
        for offset, length in inode.ranges:
            if offset + length > len(self.data):
                raise ImageError(f"{self.path.decode(errors='replace')}: {length} bytes at "
                                 f"offset {offset} lie past the end of the EROFS image")
        return b"".join(self.data[offset:offset + length] for offset, length in inode.ranges)

    def dirents(self, inode: _Inode) -> list[tuple[bytes, int]]:
        """(name, nid) of every entry but "." and "..", in on-disk (sorted) order."""
        data = self.bytes_of(inode)
        found: list[tuple[bytes, int]] = []
        for start in range(0, len(data), self.block_size):
            block = data[start:start + self.block_size]
            count = EROFS_DIRENT.unpack_from(block, 0)[1] // EROFS_DIRENT.size
            heads = [EROFS_DIRENT.unpack_from(block, i * EROFS_DIRENT.size)
                     for i in range(count)]
            for i, (nid, nameoff, _, _) in enumerate(heads):
                end = heads[i + 1][1] if i + 1 < count else len(block)
                name = block[nameoff:end]
                if i + 1 == count:
                    name = name.split(b"\0", 1)[0]
                if name not in (b".", b".."):
                    found.append((name, nid))
        return found


def read_image(path: str | bytes | os.PathLike[str]) -> Tree:
    """The tree stored in the EROFS image at ``path``; a damaged image is an ImageError."""
    image_path = os.fsencode(path)
    with open(image_path, "rb") as stream:
        if os.fstat(stream.fileno()).st_size == 0:
            raise ImageError(f"{image_path.decode(errors='replace')} is empty, not EROFS")
        with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                return _walk(_Image(image_path, data))
            except (struct.error, IndexError, ValueError, UnicodeError) as exc:
                raise ImageError(f"{image_path.decode(errors='replace')}: damaged EROFS"
                                 f" image ({exc})") from None


def _walk(image: _Image) -> Tree:
    root = image.inode(image.root_nid)
    tree = Tree(_entry(image, b"", root))
    first_path: dict[int, bytes] = {}
    seen_dirs = {image.root_nid}
    stack: list[tuple[bytes, int, _Inode]] = [(b"", image.root_nid, root)]
    budget = EntryBudget(len(image.data), image.path)
    while stack:
        dir_path, _, directory = stack.pop()
        subdirs: list[tuple[bytes, int, _Inode]] = []
        listing = image.dirents(directory)
        budget.take(len(listing))
        for name, child_nid in sorted(listing):
            path = dir_path + b"/" + name if dir_path else name
            if b"/" in name or not name:
                raise ImageError(f"EROFS directory entry {path!r} has an invalid name")
            if child_nid in first_path:
                tree.add(Entry(path, EntryType.HARDLINK, 0o644, target=first_path[child_nid]))
                continue
            child = image.inode(child_nid)
            tree.add(_entry(image, path, child))
            if stat.S_ISDIR(child.st_mode):
                if child_nid in seen_dirs:
                    raise ImageError(f"EROFS directory /{path.decode(errors='replace')}"
                                     " appears twice (a directory loop)")
                seen_dirs.add(child_nid)
                subdirs.append((path, child_nid, child))
            elif stat.S_ISREG(child.st_mode) and child.nlink > 1:
                first_path[child_nid] = path
        stack.extend(reversed(subdirs))
    return tree


def _entry(image: _Image, path: bytes, inode: _Inode) -> Entry:
    kind = _TYPE_OF_MODE.get(stat.S_IFMT(inode.st_mode))
    if kind is None:
        raise ImageError(f"/{path.decode(errors='replace')}: unknown file type in EROFS image")
    major, minor = decode_dev(inode.rdev) if kind in (EntryType.CHAR, EntryType.BLOCK) else (0, 0)
    content = None
    target = None
    if kind is EntryType.REGULAR and inode.hole:
        content = Content(inode.size, file_region(image.path, ((None, inode.size),),
                                                  file_size=len(image.data), what="hole"))
    elif kind is EntryType.REGULAR and inode.index_base is not None:
        content = Content(inode.size,
                          ErofsCompressedSource(image.path, inode.index_base, inode.size))
    elif kind is EntryType.REGULAR:
        content = Content(inode.size, file_region(
            image.path, inode.ranges, file_size=len(image.data),
            what=f"{image.path.decode(errors='replace')}: /{path.decode(errors='replace')}"))
    elif kind is EntryType.SYMLINK:
        target = image.bytes_of(inode)
    return Entry(path, kind, stat.S_IMODE(inode.st_mode), inode.uid, inode.gid,
                 inode.mtime_ns, inode.xattrs, content, target, major, minor)
