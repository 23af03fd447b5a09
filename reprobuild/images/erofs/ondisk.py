"""EROFS on-disk structures and constants (kernel fs/erofs/erofs_fs.h), shared by the
writer and the reader. Only the uncompressed subset reprobuild writes is described.
"""

from __future__ import annotations

import struct

from reprobuild.errors import ImageError
from reprobuild.trees.tree import EntryType

EROFS_SUPER_MAGIC = 0xE0F5E1E2
EROFS_SUPER_OFFSET = 1024
BLOCK_SIZE = 4096
BLOCK_BITS = 12
ISLOT_SIZE = 32  # nid = byte offset from the metadata start / 32
NULL_ADDR = 0xFFFFFFFF  # raw_blkaddr of an inode whose data is all inline
NAME_LEN = 255  # EROFS_NAME_LEN

FEATURE_COMPAT_SB_CHKSUM = 0x00000001
FEATURE_COMPAT_MTIME = 0x00000002  # inodes carry mtime (not ctime), as mkfs.erofs sets

# i_format: bit 0 the inode version, bits 1-3 the data layout.
INODE_LAYOUT_COMPACT = 0
INODE_LAYOUT_EXTENDED = 1
INODE_FLAT_PLAIN = 0
INODE_FLAT_INLINE = 2
INODE_CHUNK_BASED = 4

# struct erofs_super_block (128 bytes at EROFS_SUPER_OFFSET):
#   0 magic, 4 checksum, 8 feature_compat, 12 blkszbits, 13 sb_extslots, 14 root_nid,
#  16 inos, 24 build_time, 32 build_time_nsec, 36 blocks, 40 meta_blkaddr,
#  44 xattr_blkaddr, 48 uuid[16], 64 volume_name[16], 80 feature_incompat,
#  84 u1 (available_compr_algs), 86 extra_devices, 88 devt_slotoff, 90 dirblkbits,
#  91 xattr_prefix_count, 92 xattr_prefix_start, 96 packed_nid,
# 104 xattr_filter_reserved, 105 reserved2[23]
EROFS_SUPER_BLOCK = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23s")
SB_CHECKSUM_OFFSET = 4

# struct erofs_inode_compact (32 bytes):
#   0 i_format, 2 i_xattr_icount, 4 i_mode, 6 i_nlink, 8 i_size, 12 i_reserved
#   (i_mtime offset from build_time in kernels >= 6.15; always 0 here), 16 i_u,
#  20 i_ino, 24 i_uid, 26 i_gid, 28 i_reserved2
EROFS_INODE_COMPACT = struct.Struct("<HHHHIIIIHHI")

# struct erofs_inode_extended (64 bytes):
#   0 i_format, 2 i_xattr_icount, 4 i_mode, 6 i_reserved, 8 i_size, 16 i_u, 20 i_ino,
#  24 i_uid, 28 i_gid, 32 i_mtime, 40 i_mtime_nsec, 44 i_nlink, 48 i_reserved2[16]
EROFS_INODE_EXTENDED = struct.Struct("<HHHHQIIIIqII16s")

# struct erofs_xattr_ibody_header (12 bytes), then h_shared_count __le32 shared ids:
#   0 h_name_filter (reserved unless COMPAT_XATTR_FILTER), 4 h_shared_count,
#   5 h_reserved2[7]
EROFS_XATTR_IBODY_HEADER = struct.Struct("<IB7s")

# struct erofs_xattr_entry (4 bytes), then the name suffix and the value, 4-aligned:
#   0 e_name_len, 1 e_name_index, 2 e_value_size
EROFS_XATTR_ENTRY = struct.Struct("<BBH")

# struct erofs_dirent (12 bytes): 0 nid, 8 nameoff, 10 file_type, 11 reserved
EROFS_DIRENT = struct.Struct("<QHBB")

# Name indexes (EROFS_XATTR_INDEX_*): the prefix is stored as one byte. Longest first
# where one prefix extends another; the POSIX ACL names are whole names (empty suffix).
XATTR_PREFIXES: tuple[tuple[bytes, int], ...] = (
    (b"system.posix_acl_access", 2),
    (b"system.posix_acl_default", 3),
    (b"user.", 1),
    (b"trusted.", 4),
    (b"security.", 6),
)
XATTR_PREFIX_OF_INDEX: dict[int, bytes] = {index: prefix for prefix, index in XATTR_PREFIXES}

# EROFS_FT_* (the generic FT_* values) by entry type.
FILE_TYPE: dict[EntryType, int] = {
    EntryType.REGULAR: 1,
    EntryType.HARDLINK: 1,
    EntryType.DIRECTORY: 2,
    EntryType.CHAR: 3,
    EntryType.BLOCK: 4,
    EntryType.FIFO: 5,
    EntryType.SOCKET: 6,
    EntryType.SYMLINK: 7,
}


def split_xattr_name(name: bytes, where: str) -> tuple[int, bytes]:
    """The (name index, suffix) an xattr name is stored as; unknown namespaces are refused."""
    for prefix, index in XATTR_PREFIXES:
        if name.startswith(prefix):
            suffix = name[len(prefix):]
            if index in (2, 3) and suffix:
                break
            if len(suffix) > 255:
                raise ImageError(f"{where}: xattr name {name!r} is longer than EROFS allows",
                                 hint="EROFS stores at most 255 bytes after the prefix")
            return index, suffix
    raise ImageError(
        f"{where}: xattr {name!r} is in a namespace EROFS cannot store",
        hint="EROFS stores user.*, trusted.*, security.* and the POSIX ACLs",
    )


def encode_dev(major: int, minor: int) -> int:
    """The kernel's new_encode_dev(): 12-bit major, 20-bit minor in one 32-bit word."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def decode_dev(rdev: int) -> tuple[int, int]:
    """The kernel's new_decode_dev()."""
    return (rdev & 0xFFF00) >> 8, (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def superblock_crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected, initial and final value ~0) of ``data``, as the
    ``crc32c`` package computes it: for the superblock's 3 KiB only. Computed here
    because importing that package (it loads importlib.metadata) takes longer than
    checksumming one block in Python."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def xattr_align(size: int) -> int:
    return (size + 3) & ~3
