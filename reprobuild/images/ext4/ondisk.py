"""ext4 on-disk structures, constants, checksums and hashes (no I/O, no layout policy).

Offsets and field names follow the kernel's ``fs/ext4/ext4.h``, ``fs/ext4/xattr.h``,
``fs/ext4/hash.c`` and e2fsprogs' ``lib/ext2fs/ext2_fs.h``.
"""

from __future__ import annotations

import re
import struct

import crc32c as _crc32c

BLOCK_SIZE = 4096
INODE_SIZE = 256
EXTRA_ISIZE = 32
BLOCKS_PER_GROUP = 8 * BLOCK_SIZE
DESC_SIZE = 64
FIRST_INO = 11
ROOT_INO = 2
LOST_FOUND_INO = 11
SUPERBLOCK_OFFSET = 1024
MAX_LINKS = 65000
MAX_NAME = 255
MAX_EXTENT_LEN = 32768  # longest initialised extent
FAST_SYMLINK_MAX = 59  # a target shorter than the 60 bytes of i_block is stored inline

# Feature bits (ext2_fs.h)
COMPAT_EXT_ATTR = 0x0008
COMPAT_DIR_INDEX = 0x0020
INCOMPAT_FILETYPE = 0x0002
INCOMPAT_EXTENTS = 0x0040
INCOMPAT_64BIT = 0x0080
INCOMPAT_FLEX_BG = 0x0200
RO_COMPAT_SPARSE_SUPER = 0x0001
RO_COMPAT_LARGE_FILE = 0x0002
RO_COMPAT_HUGE_FILE = 0x0008
RO_COMPAT_DIR_NLINK = 0x0020
RO_COMPAT_EXTRA_ISIZE = 0x0040
RO_COMPAT_METADATA_CSUM = 0x0400

FEATURE_COMPAT = COMPAT_EXT_ATTR | COMPAT_DIR_INDEX
FEATURE_INCOMPAT = INCOMPAT_FILETYPE | INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG
FEATURE_RO_COMPAT = (RO_COMPAT_SPARSE_SUPER | RO_COMPAT_LARGE_FILE | RO_COMPAT_HUGE_FILE
                     | RO_COMPAT_DIR_NLINK | RO_COMPAT_EXTRA_ISIZE | RO_COMPAT_METADATA_CSUM)

SB_FLAGS_UNSIGNED_HASH = 0x0002
DEFAULT_MOUNT_OPTS = 0x0004 | 0x0008  # user_xattr, acl (as mke2fs)
BG_INODE_ZEROED = 0x0004  # EXT4_BG_INODE_ZEROED: we write every inode table byte

# Inode flags
EXTENTS_FL = 0x00080000
INDEX_FL = 0x00001000

# Directory entry file types (EXT4_FT_*)
FT_REG, FT_DIR, FT_CHRDEV, FT_BLKDEV, FT_FIFO, FT_SOCK, FT_SYMLINK = 1, 2, 3, 4, 5, 6, 7
DIRENT_TAIL_TYPE = 0xDE

DX_HASH_TEA = 2
DX_HASH_HALF_MD4 = 1
HASH_VERSIONS = {"half_md4": DX_HASH_HALF_MD4, "tea": DX_HASH_TEA}

EXT4_SUPER_MAGIC = 0xEF53
EXTENT_MAGIC = 0xF30A
XATTR_MAGIC = 0xEA020000

# struct ext4_super_block (ext4.h), the fields we set; offsets in comments.
# 0 inodes_count, blocks_count_lo, r_blocks_count_lo, free_blocks_count_lo,
# 16 free_inodes_count, first_data_block, log_block_size, log_cluster_size,
# 32 blocks_per_group, clusters_per_group, inodes_per_group, mtime, 48 wtime,
# 52 mnt_count(H), max_mnt_count(H), magic(H), state(H), errors(H), minor_rev_level(H),
# 64 lastcheck, checkinterval, creator_os, rev_level, 80 def_resuid(H), def_resgid(H),
# 84 first_ino, 88 inode_size(H), block_group_nr(H), 92 feature_compat, feature_incompat,
# 100 feature_ro_compat, 104 uuid[16], 120 volume_name[16], 136 last_mounted[64],
# 200 algorithm_usage_bitmap, 204 prealloc_blocks(B), prealloc_dir_blocks(B),
# 206 reserved_gdt_blocks(H), 208 journal_uuid[16], 224 journal_inum, journal_dev,
# 232 last_orphan, 236 hash_seed[16], 252 def_hash_version(B), jnl_backup_type(B),
# 254 desc_size(H), 256 default_mount_opts, first_meta_bg, mkfs_time, 268 jnl_blocks[68],
# 336 blocks_count_hi, r_blocks_count_hi, free_blocks_count_hi, 348 min_extra_isize(H),
# want_extra_isize(H), 352 flags, 356 raid_stride(H), mmp_interval(H), 360 mmp_block(Q),
# 368 raid_stripe_width, 372 log_groups_per_flex(B), checksum_type(B)
EXT4_SUPER_BLOCK = struct.Struct(
    "<IIIIIIIIIIIII HHHHHH IIII HH I HH III 16s 16s 64s I BB H 16s III 16s BB H"
    " III 68s III HH I HH Q I BB"
)
SUPER_BLOCK_FIELDS = (
    "inodes_count", "blocks_count_lo", "r_blocks_count_lo", "free_blocks_count_lo",
    "free_inodes_count", "first_data_block", "log_block_size", "log_cluster_size",
    "blocks_per_group", "clusters_per_group", "inodes_per_group", "mtime", "wtime",
    "mnt_count", "max_mnt_count", "magic", "state", "errors", "minor_rev_level",
    "lastcheck", "checkinterval", "creator_os", "rev_level", "def_resuid", "def_resgid",
    "first_ino", "inode_size", "block_group_nr", "feature_compat", "feature_incompat",
    "feature_ro_compat", "uuid", "volume_name", "last_mounted", "algorithm_usage_bitmap",
    "prealloc_blocks", "prealloc_dir_blocks", "reserved_gdt_blocks", "journal_uuid",
    "journal_inum", "journal_dev", "last_orphan", "hash_seed", "def_hash_version",
    "jnl_backup_type", "desc_size", "default_mount_opts", "first_meta_bg", "mkfs_time",
    "jnl_blocks", "blocks_count_hi", "r_blocks_count_hi", "free_blocks_count_hi",
    "min_extra_isize", "want_extra_isize", "flags", "raid_stride", "mmp_interval",
    "mmp_block", "raid_stripe_width", "log_groups_per_flex", "checksum_type",
)
SB_CHECKSUM_OFFSET = 0x3FC

# struct ext4_group_desc (64-byte form, ext4.h):
# 0 block_bitmap_lo, inode_bitmap_lo, inode_table_lo, 12 free_blocks_count_lo(H),
# free_inodes_count_lo(H), used_dirs_count_lo(H), flags(H), 20 exclude_bitmap_lo,
# 24 block_bitmap_csum_lo(H), inode_bitmap_csum_lo(H), itable_unused_lo(H), checksum(H),
# 32 block_bitmap_hi, inode_bitmap_hi, inode_table_hi, 44 free_blocks_count_hi(H),
# free_inodes_count_hi(H), used_dirs_count_hi(H), itable_unused_hi(H), 52 exclude_bitmap_hi,
# 56 block_bitmap_csum_hi(H), inode_bitmap_csum_hi(H), 60 reserved
EXT4_GROUP_DESC = struct.Struct("<III HHHH I HHHH III HHHH I HH I")
GROUP_DESC_FIELDS = (
    "block_bitmap_lo", "inode_bitmap_lo", "inode_table_lo", "free_blocks_count_lo",
    "free_inodes_count_lo", "used_dirs_count_lo", "flags", "exclude_bitmap_lo",
    "block_bitmap_csum_lo", "inode_bitmap_csum_lo", "itable_unused_lo", "checksum",
    "block_bitmap_hi", "inode_bitmap_hi", "inode_table_hi", "free_blocks_count_hi",
    "free_inodes_count_hi", "used_dirs_count_hi", "itable_unused_hi", "exclude_bitmap_hi",
    "block_bitmap_csum_hi", "inode_bitmap_csum_hi", "reserved",
)
GD_CHECKSUM_OFFSET = 30

# struct ext4_inode (ext4.h), 160 bytes with i_extra_isize = 32:
# 0 mode(H) uid(H) size_lo atime ctime mtime dtime 24 gid(H) links_count(H) blocks_lo
# 32 flags osd1 40 block[60] 100 generation file_acl_lo size_high obso_faddr
# 116 blocks_high(H) file_acl_high(H) uid_high(H) gid_high(H) checksum_lo(H) reserved(H)
# 128 extra_isize(H) checksum_hi(H) ctime_extra mtime_extra atime_extra crtime crtime_extra
# 152 version_hi projid
EXT4_INODE = struct.Struct("<HHIIIIIHHIII60sIIII HHHHHH HHIIIIIII")
INODE_CHECKSUM_LO_OFFSET = 124
INODE_CHECKSUM_HI_OFFSET = 130

# struct ext4_extent_header / ext4_extent / ext4_extent_idx (ext4_extents.h)
EXT4_EXTENT_HEADER = struct.Struct("<HHHHI")  # magic, entries, max, depth, generation
EXT4_EXTENT = struct.Struct("<IHHI")  # ee_block, ee_len, ee_start_hi, ee_start_lo
EXT4_EXTENT_IDX = struct.Struct("<IIHH")  # ei_block, ei_leaf_lo, ei_leaf_hi, ei_unused
EXTENTS_PER_BLOCK = (BLOCK_SIZE - 12 - 4) // 12  # 340: header and ext4_extent_tail

# struct ext4_dir_entry_2: inode, rec_len(H), name_len(B), file_type(B), name
EXT4_DIR_ENTRY_2 = struct.Struct("<IHBB")
DIRENT_TAIL_SIZE = 12
# struct dx_root_info (after the "." and ".." entries at offset 24): reserved_zero,
# hash_version(B), info_length(B)=8, indirect_levels(B), unused_flags(B)
DX_ROOT_INFO = struct.Struct("<IBBBB")
DX_COUNTLIMIT = struct.Struct("<HHI")  # limit, count, block (the first dx_entry)
DX_ENTRY = struct.Struct("<II")  # hash, block
DX_ROOT_LIMIT = (BLOCK_SIZE - 32 - 8) // 8  # 507 with the dx_tail
DX_NODE_LIMIT = (BLOCK_SIZE - 8 - 8) // 8  # 510 with the dx_tail

# struct ext4_xattr_header (block): magic, refcount, blocks, hash, checksum, reserved[3]
EXT4_XATTR_HEADER = struct.Struct("<IIIII12s")
# struct ext4_xattr_entry: name_len(B) name_index(B) value_offs(H) value_inum value_size hash
EXT4_XATTR_ENTRY = struct.Struct("<BBHIII")
IBODY_XATTR_START = 128 + EXTRA_ISIZE  # magic at 160, first entry at 164

XATTR_PREFIXES: tuple[tuple[int, bytes], ...] = (
    (2, b"system.posix_acl_access"),
    (3, b"system.posix_acl_default"),
    (1, b"user."),
    (4, b"trusted."),
    (6, b"security."),
    (8, b"system.richacl"),
    (7, b"system."),
)
XATTR_PREFIX_OF_INDEX = {index: prefix for index, prefix in XATTR_PREFIXES}


def pack_fields(layout: struct.Struct, names: tuple[str, ...],
                values: dict[str, int | bytes]) -> bytes:
    """Pack a struct from named values; fields not named are zero."""
    unknown = set(values) - set(names)
    assert not unknown, f"unknown fields {sorted(unknown)}"
    fmt = layout.format.replace("<", "").replace(" ", "")
    codes = re.findall(r"\d*[a-zA-Z]", fmt)
    assert len(codes) == len(names), (len(codes), len(names))
    return layout.pack(*(values.get(name, b"" if code.endswith("s") else 0)
                         for name, code in zip(names, codes, strict=True)))


# -- crc32c as ext4 uses it ----------------------------------------------------------------
def crc32c_raw(seed: int, data: bytes | bytearray | memoryview) -> int:
    """ext2fs_crc32c_le: CRC32C with the given seed and no final inversion.

    The ``crc32c`` package computes the standard (inverted in and out) CRC32C, so the
    raw form is the standard one continued from ``~seed`` and inverted back.
    """
    return int(_crc32c.crc32c(data, seed ^ 0xFFFFFFFF)) ^ 0xFFFFFFFF


def fs_checksum_seed(uuid: bytes) -> int:
    return crc32c_raw(0xFFFFFFFF, uuid)


def inode_checksum_seed(fs_seed: int, ino: int, generation: int = 0) -> int:
    seed = crc32c_raw(fs_seed, ino.to_bytes(4, "little"))
    return crc32c_raw(seed, generation.to_bytes(4, "little"))


# -- times ---------------------------------------------------------------------------------
def encode_time(ns: int) -> tuple[int, int]:
    """(i_xtime, i_xtime_extra) for nanoseconds since 1970, as ext4_encode_extra_time."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    low = seconds & 0xFFFFFFFF
    signed_low = low - (1 << 32) if low & 0x80000000 else low
    epoch_bits = ((seconds - signed_low) >> 32) & 3
    return low, (nanos << 2) | epoch_bits


def decode_time(low: int, extra: int) -> int:
    signed_low = low - (1 << 32) if low & 0x80000000 else low
    seconds = signed_low + ((extra & 3) << 32)
    return seconds * 1_000_000_000 + (extra >> 2)


# -- device numbers ------------------------------------------------------------------------
def encode_device(major: int, minor: int) -> tuple[int, int]:
    """(i_block[0], i_block[1]) as the kernel writes them: old encoding when it fits."""
    if major < 256 and minor < 256:
        return (major << 8) | minor, 0
    return 0, (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def decode_device(block0: int, block1: int) -> tuple[int, int]:
    if block0:
        return (block0 >> 8) & 0xFF, block0 & 0xFF
    return (block1 & 0xFFF00) >> 8, (block1 & 0xFF) | ((block1 >> 12) & 0xFFF00)


# -- directory hashes (fs/ext4/hash.c), the unsigned variants -------------------------------
_M = 0xFFFFFFFF


def _str2hashbuf(msg: bytes, num: int) -> list[int]:
    length = len(msg)
    pad = (length | (length << 8)) & _M
    pad = (pad | (pad << 16)) & _M
    val = pad
    out: list[int] = []
    msg = msg[: num * 4]
    for i, byte in enumerate(msg):
        val = (byte + (val << 8)) & _M
        if i % 4 == 3:
            out.append(val)
            val = pad
    if len(out) < num:
        out.append(val)
    while len(out) < num:
        out.append(pad)
    return out


def _rol(x: int, s: int) -> int:
    return ((x << s) | (x >> (32 - s))) & _M


_K2 = 0o13240474631
_K3 = 0o15666365641


def _half_md4_transform(buf: list[int], words: list[int]) -> None:
    a, b, c, d = buf

    def f(x: int, y: int, z: int) -> int:
        return z ^ (x & (y ^ z))

    def g(x: int, y: int, z: int) -> int:
        return ((x & y) + ((x ^ y) & z)) & _M

    def h(x: int, y: int, z: int) -> int:
        return x ^ y ^ z

    w = words
    for i, s in ((0, 3), (1, 7), (2, 11), (3, 19), (4, 3), (5, 7), (6, 11), (7, 19)):
        r = i % 4
        if r == 0:
            a = _rol((a + f(b, c, d) + w[i]) & _M, s)
        elif r == 1:
            d = _rol((d + f(a, b, c) + w[i]) & _M, s)
        elif r == 2:
            c = _rol((c + f(d, a, b) + w[i]) & _M, s)
        else:
            b = _rol((b + f(c, d, a) + w[i]) & _M, s)
    for n, (i, s) in enumerate(((1, 3), (3, 5), (5, 9), (7, 13),
                                (0, 3), (2, 5), (4, 9), (6, 13))):
        r = n % 4
        x = (w[i] + _K2) & _M
        if r == 0:
            a = _rol((a + g(b, c, d) + x) & _M, s)
        elif r == 1:
            d = _rol((d + g(a, b, c) + x) & _M, s)
        elif r == 2:
            c = _rol((c + g(d, a, b) + x) & _M, s)
        else:
            b = _rol((b + g(c, d, a) + x) & _M, s)
    for n, (i, s) in enumerate(((3, 3), (7, 9), (2, 11), (6, 15),
                                (1, 3), (5, 9), (0, 11), (4, 15))):
        r = n % 4
        x = (w[i] + _K3) & _M
        if r == 0:
            a = _rol((a + h(b, c, d) + x) & _M, s)
        elif r == 1:
            d = _rol((d + h(a, b, c) + x) & _M, s)
        elif r == 2:
            c = _rol((c + h(d, a, b) + x) & _M, s)
        else:
            b = _rol((b + h(c, d, a) + x) & _M, s)
    buf[0] = (buf[0] + a) & _M
    buf[1] = (buf[1] + b) & _M
    buf[2] = (buf[2] + c) & _M
    buf[3] = (buf[3] + d) & _M


def _tea_transform(buf: list[int], words: list[int]) -> None:
    total = 0
    b0, b1 = buf[0], buf[1]
    a, b, c, d = words
    for _ in range(16):
        total = (total + 0x9E3779B9) & _M
        b0 = (b0 + ((((b1 << 4) + a) & _M) ^ ((b1 + total) & _M) ^ (((b1 >> 5) + b) & _M))) & _M
        b1 = (b1 + ((((b0 << 4) + c) & _M) ^ ((b0 + total) & _M) ^ (((b0 >> 5) + d) & _M))) & _M
    buf[0] = (buf[0] + b0) & _M
    buf[1] = (buf[1] + b1) & _M


def dir_hash(name: bytes, version: int, seed: tuple[int, int, int, int]) -> tuple[int, int]:
    """(major, minor) htree hash of ``name`` with the unsigned variant of ``version``."""
    buf = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476]
    if any(seed):
        buf = list(seed)
    if version == DX_HASH_HALF_MD4:
        for p in range(0, len(name), 32):
            _half_md4_transform(buf, _str2hashbuf(name[p:], 8))
        major, minor = buf[1], buf[2]
    elif version == DX_HASH_TEA:
        for p in range(0, len(name), 16):
            _tea_transform(buf, _str2hashbuf(name[p:], 4))
        major, minor = buf[0], buf[1]
    else:
        raise ValueError(f"unsupported htree hash version {version}")
    major &= ~1 & _M
    if major == (0x7FFFFFFF << 1):
        major = (0x7FFFFFFF - 1) << 1
    return major, minor


# -- xattr hashes (fs/ext4/xattr.c) ----------------------------------------------------------
def xattr_entry_hash(name: bytes, value: bytes) -> int:
    h = 0
    for byte in name:
        h = ((h << 5) & _M) ^ (h >> 27) ^ byte
    if value:
        padded = value + b"\0" * (-len(value) % 4)
        for (word,) in struct.iter_unpack("<I", padded):
            h = ((h << 16) & _M) ^ (h >> 16) ^ word
    return h


def xattr_block_hash(entry_hashes: list[int]) -> int:
    h = 0
    for eh in entry_hashes:
        if eh == 0:
            return 0
        h = ((h << 16) & _M) ^ (h >> 16) ^ eh
    return h


def split_xattr_name(name: bytes) -> tuple[int, bytes]:
    """(e_name_index, suffix) for a full xattr name, as ext4_xattr_set picks them."""
    for index, prefix in XATTR_PREFIXES:
        if index in (2, 3, 8):
            if name == prefix:
                return index, b""
            continue
        if name.startswith(prefix) and len(name) > len(prefix):
            return index, name[len(prefix):]
    return 0, name


# -- POSIX ACLs: the VFS xattr form <-> ext4's on-disk form (fs/ext4/acl.h) ------------------
_ACL_SHORT_TAGS = (0x01, 0x04, 0x10, 0x20)  # USER_OBJ, GROUP_OBJ, MASK, OTHER


def acl_to_disk(value: bytes) -> bytes:
    """posix_acl_xattr (version 2, 8-byte entries) -> ext4_acl (version 1, 4/8-byte)."""
    if len(value) < 4 or (len(value) - 4) % 8 or struct.unpack_from("<I", value)[0] != 2:
        raise ValueError("not a POSIX ACL xattr value (version 2)")
    out = bytearray(struct.pack("<I", 1))
    for tag, perm, ident in struct.iter_unpack("<HHI", value[4:]):
        if tag in _ACL_SHORT_TAGS:
            out += struct.pack("<HH", tag, perm)
        else:
            out += struct.pack("<HHI", tag, perm, ident)
    return bytes(out)


def acl_from_disk(value: bytes) -> bytes:
    out = bytearray(struct.pack("<I", 2))
    pos = 4
    while pos < len(value):
        tag, perm = struct.unpack_from("<HH", value, pos)
        if tag in _ACL_SHORT_TAGS:
            out += struct.pack("<HHI", tag, perm, 0xFFFFFFFF)
            pos += 4
        else:
            (ident,) = struct.unpack_from("<I", value, pos + 4)
            out += struct.pack("<HHI", tag, perm, ident)
            pos += 8
    return bytes(out)


def has_super_backup(group: int) -> bool:
    """sparse_super: groups 0, 1 and powers of 3, 5 and 7 hold a superblock copy."""
    if group <= 1:
        return True
    for base in (3, 5, 7):
        n = base
        while n < group:
            n *= base
        if n == group:
            return True
    return False
