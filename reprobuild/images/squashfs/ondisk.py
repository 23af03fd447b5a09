"""squashfs 4.0 on-disk structures and constants, shared by the writer and the reader.

Names and field orders follow the kernel's ``fs/squashfs/squashfs_fs.h``; the layout of the
tables follows squashfs-tools-ng ``doc/format.adoc``. Everything is little-endian.
"""

from __future__ import annotations

import struct

SQUASHFS_MAGIC = 0x73717368
SQUASHFS_MAJOR = 4
SQUASHFS_MINOR = 0
SQUASHFS_METADATA_SIZE = 8192
SQUASHFS_COMPRESSED_BIT = 1 << 15  # metadata block header: stored uncompressed
SQUASHFS_COMPRESSED_BIT_BLOCK = 1 << 24  # data/fragment block size: stored uncompressed
SQUASHFS_INVALID_FRAG = 0xFFFFFFFF
SQUASHFS_INVALID_XATTR = 0xFFFFFFFF
SQUASHFS_INVALID_BLK = 0xFFFFFFFFFFFFFFFF
SQUASHFS_DIR_COUNT = 256  # entries per directory header at most
SQUASHFS_NAME_LEN = 256
SQUASHFS_DEFAULT_BLOCK_SIZE = 128 * 1024
SQUASHFS_MIN_BLOCK_SIZE = 4096
SQUASHFS_MAX_BLOCK_SIZE = 1 << 20
SQUASHFS_IDS = 65536

# Superblock flags (squashfs_fs.h SQUASHFS_*_BIT, as masks).
SQUASHFS_NOI = 0x0001  # inodes uncompressed
SQUASHFS_NOD = 0x0002  # data uncompressed
SQUASHFS_NOF = 0x0008  # fragments uncompressed
SQUASHFS_NO_FRAG = 0x0010
SQUASHFS_ALWAYS_FRAG = 0x0020
SQUASHFS_DUPLICATE = 0x0040
SQUASHFS_EXPORT = 0x0080
SQUASHFS_NOX = 0x0100  # xattrs uncompressed
SQUASHFS_NO_XATTR = 0x0200
SQUASHFS_COMP_OPT = 0x0400
SQUASHFS_NOID = 0x0800  # id table uncompressed

# Compressor ids (squashfs_fs.h ZLIB_COMPRESSION ...).
ZLIB_COMPRESSION = 1
LZMA_COMPRESSION = 2
LZO_COMPRESSION = 3
XZ_COMPRESSION = 4
LZ4_COMPRESSION = 5
ZSTD_COMPRESSION = 6

# Inode types (squashfs_fs.h SQUASHFS_*_TYPE); the extended ("l") type is basic + 7.
SQUASHFS_DIR_TYPE = 1
SQUASHFS_REG_TYPE = 2
SQUASHFS_SYMLINK_TYPE = 3
SQUASHFS_BLKDEV_TYPE = 4
SQUASHFS_CHRDEV_TYPE = 5
SQUASHFS_FIFO_TYPE = 6
SQUASHFS_SOCKET_TYPE = 7
SQUASHFS_LDIR_TYPE = 8
SQUASHFS_LREG_TYPE = 9
SQUASHFS_LSYMLINK_TYPE = 10
SQUASHFS_LBLKDEV_TYPE = 11
SQUASHFS_LCHRDEV_TYPE = 12
SQUASHFS_LFIFO_TYPE = 13
SQUASHFS_LSOCKET_TYPE = 14
SQUASHFS_EXTENDED = 7

# Xattr name prefixes (squashfs_fs.h SQUASHFS_XATTR_USER ...), in index order.
XATTR_PREFIXES: tuple[bytes, ...] = (b"user.", b"trusted.", b"security.")
SQUASHFS_XATTR_VALUE_OOL = 0x100
SQUASHFS_XATTR_PREFIX_MASK = 0xFF

# struct squashfs_super_block (96 bytes at offset 0): s_magic, inodes, mkfs_time,
# block_size, fragments, compression, block_log, flags, no_ids, s_major, s_minor,
# root_inode, bytes_used, id_table_start, xattr_id_table_start, inode_table_start,
# directory_table_start, fragment_table_start, lookup_table_start.
SQUASHFS_SUPER_BLOCK = struct.Struct("<IIIIIHHHHHHQQQQQQQQ")
assert SQUASHFS_SUPER_BLOCK.size == 96

# struct squashfs_base_inode (16 bytes): inode_type, mode, uid, guid, mtime, inode_number.
SQUASHFS_BASE_INODE = struct.Struct("<HHHHII")
# struct squashfs_dir_inode, after the base: start_block, nlink, file_size, offset,
# parent_inode.
SQUASHFS_DIR_INODE = struct.Struct("<IIHHI")
# struct squashfs_ldir_inode, after the base: nlink, file_size, start_block,
# parent_inode, i_count, offset, xattr; followed by i_count squashfs_dir_index.
SQUASHFS_LDIR_INODE = struct.Struct("<IIIIHHI")
# struct squashfs_dir_index: index, start_block, size (name length - 1); then the name.
SQUASHFS_DIR_INDEX = struct.Struct("<III")
# struct squashfs_reg_inode, after the base: start_block, fragment, offset, file_size;
# followed by the u32 block list.
SQUASHFS_REG_INODE = struct.Struct("<IIII")
# struct squashfs_lreg_inode, after the base: start_block, file_size, sparse, nlink,
# fragment, offset, xattr; followed by the u32 block list.
SQUASHFS_LREG_INODE = struct.Struct("<QQQIIII")
# struct squashfs_symlink_inode, after the base: nlink, symlink_size; then the target
# and, for the extended type, a u32 xattr index.
SQUASHFS_SYMLINK_INODE = struct.Struct("<II")
# struct squashfs_dev_inode / squashfs_ldev_inode, after the base: nlink, rdev (, xattr).
SQUASHFS_DEV_INODE = struct.Struct("<II")
SQUASHFS_LDEV_INODE = struct.Struct("<III")
# struct squashfs_ipc_inode / squashfs_lipc_inode, after the base: nlink (, xattr).
SQUASHFS_IPC_INODE = struct.Struct("<I")
SQUASHFS_LIPC_INODE = struct.Struct("<II")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")

# struct squashfs_dir_header (12 bytes): count - 1, start_block, inode_number.
SQUASHFS_DIR_HEADER = struct.Struct("<III")
# struct squashfs_dir_entry (8 bytes): offset, inode_number (s16 delta), type,
# size (name length - 1); then the name.
SQUASHFS_DIR_ENTRY = struct.Struct("<HhHH")
# struct squashfs_fragment_entry (16 bytes): start_block, size, unused.
SQUASHFS_FRAGMENT_ENTRY = struct.Struct("<QII")
# struct squashfs_xattr_entry (4 bytes): type, size; then the name without prefix.
SQUASHFS_XATTR_ENTRY = struct.Struct("<HH")
# struct squashfs_xattr_val (4 bytes): vsize; then the value.
SQUASHFS_XATTR_VAL = struct.Struct("<I")
# struct squashfs_xattr_id (16 bytes): xattr (reference), count, size.
SQUASHFS_XATTR_ID = struct.Struct("<QII")
# struct squashfs_xattr_id_table (16 bytes): xattr_table_start, xattr_ids, unused;
# followed by the u64 locations of the xattr id metadata blocks.
SQUASHFS_XATTR_ID_TABLE = struct.Struct("<QII")
# Metadata block header: u16 length, bit 15 set when stored uncompressed.
SQUASHFS_METADATA_HEADER = struct.Struct("<H")


def encode_rdev(major: int, minor: int) -> int:
    """The kernel's new_encode_dev, as squashfs stores device numbers (32 bits)."""
    return (minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~0xFF) << 12)


def decode_rdev(rdev: int) -> tuple[int, int]:
    """The kernel's new_decode_dev: (major, minor)."""
    return (rdev & 0xFFF00) >> 8, (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)


def inode_ref(block_start: int, offset: int) -> int:
    """A metadata reference: block start (relative to its table) << 16 | offset."""
    return (block_start << 16) | offset
