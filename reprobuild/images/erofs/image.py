"""Write EROFS images (and read them back) without mkfs.erofs.

The image depends only on the tree and the options: 4 KiB blocks, superblock with a
crc32c checksum, compact inodes wherever they can hold the metadata, FLAT_PLAIN and
FLAT_INLINE (tail-packed) data, name-sorted directory blocks, inline and shared xattrs,
build time from the epoch, UUID from the content unless given, label as volume name.
``compress="lz4"`` stores regular files longer than a block LZ4-compressed
(:mod:`reprobuild.images.erofs.compress`); the default is uncompressed.
The layout is planned first (:mod:`reprobuild.images.erofs.layout`), then serialised;
file bytes are read once, through :class:`~reprobuild.images.contents.ContentStreamer`,
straight into the data area.
"""

from __future__ import annotations

import os
import uuid as uuidlib
from dataclasses import replace
from typing import BinaryIO, NoReturn

import blake3

from reprobuild.errors import ImageError, ImageTooSmall
from reprobuild.images.contents import ContentStreamer
from reprobuild.images.erofs.compress import (
    AVAILABLE_COMPR_ALGS,
    COMPR_CFGS,
    COMPRESSED_FULL,
    FEATURE_INCOMPAT_COMPR_CFGS,
    FEATURE_INCOMPAT_ZERO_PADDING,
    write_compressed,
)
from reprobuild.images.erofs.compress import identity as compress_identity
from reprobuild.images.erofs.layout import DirentPlan, InodePlan, Layout, plan
from reprobuild.images.erofs.metaarea import MetaArea
from reprobuild.images.erofs.ondisk import (
    BLOCK_BITS,
    BLOCK_SIZE,
    EROFS_DIRENT,
    EROFS_INODE_COMPACT,
    EROFS_INODE_EXTENDED,
    EROFS_SUPER_BLOCK,
    EROFS_SUPER_MAGIC,
    EROFS_SUPER_OFFSET,
    FEATURE_COMPAT_MTIME,
    FEATURE_COMPAT_SB_CHKSUM,
    ISLOT_SIZE,
    SB_CHECKSUM_OFFSET,
    encode_dev,
    superblock_crc32c,
)
from reprobuild.images.erofs.read import read_image
from reprobuild.images.registry import ImageOptions
from reprobuild.images.timestamps import EROFS_TIMES, check_times
from reprobuild.integrity.fsverity import digest_file
from reprobuild.trees.gcpause import collector_paused
from reprobuild.trees.tree import S_IFMT_OF_TYPE, EntryType, Tree

__all__ = ["VERSION", "fsverity_digest", "identity", "read", "write"]

VERSION = "1"
"""The writer's code version: bump it whenever the bytes for a given tree change."""

_ZEROS = bytes(BLOCK_SIZE)


def identity(options: ImageOptions) -> dict[str, str]:
    """The LZ4 library's version for compressed images; nothing for uncompressed ones."""
    _check_options(options)
    return compress_identity() if options.compress == "lz4" else {}


def write(tree: Tree, output: BinaryIO, options: ImageOptions) -> None:
    """Write ``tree`` as an EROFS image to the empty, seekable ``output``."""
    _check_options(options)
    check_times(tree, options.epoch, EROFS_TIMES, "EROFS")
    volume_name = _volume_name(options.label)
    given_uuid = _parse_uuid(options.uuid) if options.uuid is not None else None
    with collector_paused():
        layout = plan(tree, options.epoch, compress=options.compress == "lz4")
        meta = MetaArea(output, layout, read_back=given_uuid is None)
        try:
            _write_image(output, layout, meta, options, volume_name, given_uuid)
        finally:
            meta.close()


def _write_image(output: BinaryIO, layout: Layout, meta: MetaArea, options: ImageOptions,
                 volume_name: bytes, given_uuid: bytes | None) -> None:
    hasher = blake3.blake3() if given_uuid is None else None

    for offset, xattr_entry in layout.shared_xattrs:
        meta.put(offset, xattr_entry)
    output.seek(layout.data_blkaddr * BLOCK_SIZE)
    with ContentStreamer() as reader:
        compressed = _write_inodes(layout, output, meta, reader, hasher)
        blocks = layout.blocks
        for inode in compressed:  # their blocks follow the planned data area
            blocks += _write_compressed(output, inode, blocks, meta, hasher, reader)
    size = blocks * BLOCK_SIZE
    if options.size is not None:
        if options.size < size:
            raise ImageTooSmall(f"the tree needs an EROFS image of at least {size} bytes; "
                                f"the size given is {options.size}", minimum=size)
        if options.size % BLOCK_SIZE:
            raise ImageError(f"EROFS image size {options.size} is not a multiple of 4096",
                             hint=f"give a multiple of 4096 of at least {size} bytes, or no "
                                  "size for the smallest image")
        size = options.size
        output.seek(size - 1)
        output.write(b"\0")

    if given_uuid is not None:
        volume_uuid = given_uuid
    else:
        assert hasher is not None
        meta.hash_into(hasher)
        hasher.update(b"reprobuild-erofs\0%d\0%d\0" % (options.epoch, size) + volume_name)
        raw = bytearray(hasher.digest(length=16))
        raw[6] = (raw[6] & 0x0F) | 0x40  # shaped like an RFC 4122 version 4 UUID
        raw[8] = (raw[8] & 0x3F) | 0x80
        volume_uuid = bytes(raw)
    _put_superblock(meta.block(0), layout, size // BLOCK_SIZE, volume_uuid, volume_name,
                    compress=options.compress == "lz4")
    meta.finish()
    output.seek(size)


def _check_options(options: ImageOptions) -> None:
    if options.block_size not in (None, BLOCK_SIZE):
        raise ImageError(f"EROFS block size {options.block_size} is not supported",
                         hint="reprobuild writes EROFS with 4096-byte blocks")
    if options.compress not in (None, "none", "lz4"):
        raise ImageError(f"EROFS compression {options.compress!r} is not supported",
                         hint='use compress = "none" (the default) or "lz4"')


def _volume_name(label: str | None) -> bytes:
    name = (label or "").encode()
    if len(name) > 16:
        raise ImageError(f"EROFS volume label {label!r} is longer than 16 bytes")
    return name


def _parse_uuid(text: str) -> bytes:
    try:
        return uuidlib.UUID(text).bytes
    except ValueError:
        raise ImageError(f"{text!r} is not a UUID",
                         hint="give the EROFS UUID as 8-4-4-4-12 hex digits") from None


def _write_inodes(layout: Layout, output: BinaryIO, meta: MetaArea, reader: ContentStreamer,
                  hasher: blake3.blake3 | None) -> list[InodePlan]:
    """Put every uncompressed inode (header, xattrs, inline tail) into ``meta`` and its
    whole blocks into the data area, in plan order; return the compressed inodes."""
    nid_of = [inode.nid for inode in layout.inodes]
    compressed: list[InodePlan] = []
    pack_compact = EROFS_INODE_COMPACT.pack
    regular, directory, symlink = EntryType.REGULAR, EntryType.DIRECTORY, EntryType.SYMLINK
    s_ifmt = {kind._name_: bits for kind, bits in S_IFMT_OF_TYPE.items()}  # str keys hash fast
    put, written, closes, open_blocks = meta.put, meta.written, meta.closes, meta.blocks
    for inode in layout.inodes:
        entry = inode.entry
        kind = entry.type
        if inode.datalayout == COMPRESSED_FULL:
            compressed.append(inode)
            continue
        if inode.extended or inode.xattr_ibody or kind not in (regular, directory, symlink):
            record = _inode_header(inode) + inode.xattr_ibody
        else:  # the common case, packed here: a compact inode without xattrs
            record = pack_compact(inode.datalayout << 1, 0, s_ifmt[kind._name_] | entry.mode,
                                  inode.nlink, inode.size, 0, inode.blkaddr, inode.index + 1,
                                  entry.uid, entry.gid, 0)
        if kind is regular:
            if inode.nblocks:
                record += _write_content(output, inode, hasher, reader)
            elif inode.size:  # all inline
                assert entry.content is not None
                tail = reader.whole(entry.content)
                if len(tail) != inode.size:
                    _changed(inode, len(tail))
                record += tail
        elif kind is directory:
            data = _directory_bytes(layout.directories[inode.index], nid_of)
            record += _write_bytes(output, inode, data, hasher) if inode.nblocks else data
        elif kind is symlink:
            assert entry.target is not None
            record += (_write_bytes(output, inode, entry.target, hasher) if inode.nblocks
                       else entry.target)
        # The record (header, xattrs, inline tail) into its metadata block; records
        # within one block, nearly all, without a call.
        number, offset = divmod(inode.nid * ISLOT_SIZE, BLOCK_SIZE)
        end = offset + len(record)
        buffer = open_blocks.get(number)
        if buffer is not None and end <= BLOCK_SIZE:
            buffer[offset:end] = record
        else:
            put(number * BLOCK_SIZE + offset, record)
        if inode.index in closes:
            written(inode.index)
    return compressed


def _changed(inode: InodePlan, read: int) -> NoReturn:
    raise ImageError(f"{inode.entry.display()}: expected {inode.size} bytes, read {read}",
                     hint="do not modify the source tree during a build")


def _inode_header(inode: InodePlan) -> bytes:
    entry = inode.entry
    i_format = (inode.datalayout << 1) | int(inode.extended)
    icount = (len(inode.xattr_ibody) - 12) // 4 + 1 if inode.xattr_ibody else 0
    if entry.type in (EntryType.CHAR, EntryType.BLOCK):
        i_u = encode_dev(entry.rdev_major, entry.rdev_minor)
    elif entry.type in (EntryType.FIFO, EntryType.SOCKET):
        i_u = 0
    else:
        i_u = inode.blkaddr
    if not inode.extended:
        return EROFS_INODE_COMPACT.pack(
            i_format, icount, entry.st_mode, inode.nlink, inode.size, 0, i_u,
            inode.index + 1, entry.uid, entry.gid, 0)
    seconds, nanoseconds = divmod(entry.mtime_ns, 1_000_000_000)
    return EROFS_INODE_EXTENDED.pack(
        i_format, icount, entry.st_mode, 0, inode.size, i_u, inode.index + 1,
        entry.uid, entry.gid, seconds, nanoseconds, inode.nlink, b"")


def _directory_bytes(blocks: tuple[tuple[DirentPlan, ...], ...], nid_of: list[int]) -> bytes:
    """A directory's data: each block holds its dirents, then their names; all but the
    last block are zero-padded to the block size (a NUL ends the last name there)."""
    parts: list[bytes] = []
    for number, block in enumerate(blocks):
        nameoff = EROFS_DIRENT.size * len(block)
        for name, index, file_type in block:
            parts.append(EROFS_DIRENT.pack(nid_of[index], nameoff, file_type, 0))
            nameoff += len(name)
        parts.extend(name for name, _, _ in block)
        used = nameoff
        if number + 1 < len(blocks):
            parts.append(_ZEROS[:BLOCK_SIZE - used])
    return b"".join(parts)


def _write_bytes(output: BinaryIO, inode: InodePlan, data: bytes,
                 hasher: blake3.blake3 | None) -> bytes:
    """Write an inode's whole blocks to the data area; return its inline tail."""
    body = inode.size - inode.inline_size
    if body:
        block_bytes = data[:body] + _ZEROS[:inode.nblocks * BLOCK_SIZE - body]
        output.write(block_bytes)
        if hasher is not None:
            hasher.update(block_bytes)
    return data[body:]


def _write_content(output: BinaryIO, inode: InodePlan, hasher: blake3.blake3 | None,
                   reader: ContentStreamer) -> bytes:
    """Stream a regular file into the data area; return its inline tail."""
    content = inode.entry.content
    assert content is not None
    body = inode.size - inode.inline_size
    written = 0
    tail: list[bytes] = []
    for chunk in reader.chunks(content):
        if written + len(chunk) <= body:
            output.write(chunk)
            if hasher is not None:
                hasher.update(chunk)
        else:
            cut = max(body - written, 0)
            if cut:
                output.write(chunk[:cut])
                if hasher is not None:
                    hasher.update(chunk[:cut])
            tail.append(chunk[cut:])
        written += len(chunk)
    if written != inode.size:
        _changed(inode, written)
    pad = inode.nblocks * BLOCK_SIZE - body
    if pad:
        output.write(_ZEROS[:pad])
    return b"".join(tail)


def _write_compressed(output: BinaryIO, inode: InodePlan, first_block: int,
                      meta: MetaArea, hasher: blake3.blake3 | None,
                      reader: ContentStreamer) -> int:
    """Compress a regular file into blocks from ``first_block``; fill in its inode, xattrs
    and lcluster indexes; return the number of blocks written."""
    content = inode.entry.content
    assert content is not None

    def emit(block: bytes) -> None:
        output.write(block)
        if hasher is not None:
            hasher.update(block)

    nblocks, indexes, read = write_compressed(emit, reader.chunks(content), inode.size,
                                               first_block)
    if read != inode.size:
        _changed(inode, read)
    header = _inode_header(replace(inode, blkaddr=nblocks))
    record = header + inode.xattr_ibody
    record += bytes(-len(record) % 8) + indexes
    assert len(record) == inode.record_size
    meta.put(inode.offset, record)
    return nblocks


def _put_superblock(block0: bytearray, layout: Layout, blocks: int, volume_uuid: bytes,
                    volume_name: bytes, *, compress: bool) -> None:
    incompat = FEATURE_INCOMPAT_ZERO_PADDING | FEATURE_INCOMPAT_COMPR_CFGS if compress else 0
    superblock = EROFS_SUPER_BLOCK.pack(
        EROFS_SUPER_MAGIC, 0, FEATURE_COMPAT_SB_CHKSUM | FEATURE_COMPAT_MTIME, BLOCK_BITS, 0,
        layout.root_nid, len(layout.inodes), layout.epoch, 0, blocks, 0, 0, volume_uuid,
        volume_name, incompat, AVAILABLE_COMPR_ALGS if compress else 0, 0, 0, 0, 0, 0, 0,
        0, b"")
    if compress:
        superblock += COMPR_CFGS
    block0[EROFS_SUPER_OFFSET:EROFS_SUPER_OFFSET + len(superblock)] = superblock
    # The kernel computes crc32c(~0, block 0 from the superblock on) without the final
    # inversion, over the block with the checksum field zeroed.
    checksum = superblock_crc32c(bytes(block0[EROFS_SUPER_OFFSET:BLOCK_SIZE])) ^ 0xFFFFFFFF
    at = EROFS_SUPER_OFFSET + SB_CHECKSUM_OFFSET
    block0[at:at + 4] = checksum.to_bytes(4, "little")


def read(path: str | bytes | os.PathLike[str]) -> Tree:
    """Read an EROFS image back into a tree whose file contents stream from the image."""
    return read_image(path)


def fsverity_digest(image_path: str | bytes | os.PathLike[str]) -> str:
    """The EROFS image's fs-verity sha256 digest (4 KiB blocks, no salt), as lowercase
    hex. Not a composefs digest: a plain EROFS image holds its files' data and has no
    composefs header (:mod:`reprobuild.images.composefs` writes composefs images)."""
    return digest_file(image_path, algorithm="sha256", block_size=4096, salt=b"").hex()

