"""composefs on-disk constants: the header before the EROFS superblock, the overlayfs
xattr names, the xattr name filter hash, as libcomposefs 1.0.8 writes them.

Sources: libcomposefs ``lcfs-erofs.h`` (header), ``lcfs-internal.h`` (overlay xattr
names), ``lcfs-writer-erofs.c`` (prefix indexes, the xxh32 name filter); the EROFS
structures themselves are :mod:`reprobuild.images.erofs.ondisk`'s.
"""

from __future__ import annotations

import functools
import struct

# struct lcfs_erofs_header_s (32 bytes at offset 0, lcfs-erofs.h):
#   0 magic, 4 version (LCFS_EROFS_VERSION), 8 flags, 12 composefs_version, 16 unused[4]
LCFS_EROFS_HEADER = struct.Struct("<IIII16x")
LCFS_EROFS_MAGIC = 0xD078629A
LCFS_EROFS_VERSION = 1
LCFS_EROFS_FLAGS_HAS_ACL = 1 << 0

# Regular files of at most this many bytes are stored inline in the image
# (LCFS_RECOMMENDED_INLINE_CONTENT_MAX); larger ones only by reference into the store.
INLINE_CONTENT_MAX = 64
# A non-inline file's one chunk index must fit a block (LCFS_MAX_NONINLINE_CHUNKS).
MAX_NONINLINE_CHUNKS = 1024
# EROFS_FEATURE_COMPAT_XATTR_FILTER and the filter's parameters (erofs_fs.h).
FEATURE_COMPAT_XATTR_FILTER = 0x00000004
XATTR_FILTER_BITS = 32
XATTR_FILTER_SEED = 0x25BBE08F
# An inode points at no more shared xattrs than this (EROFS_XATTR_LONG_PREFIX).
MAX_SHARED_PER_INODE = 0x80
# A node's xattrs take at most this many bytes (LCFS_INODE_EXTERNAL_XATTR_MAX), counted
# as lcfs_node_set_xattr does; xattr values at most 65535 bytes.
XATTR_SPACE_MAX = 0xFFFF // 2
XATTR_HEADER_SPACE = 12

OVERLAY_PREFIX = b"trusted.overlay."
OVERLAY_ESCAPE_PREFIX = b"trusted.overlay.overlay."
METACOPY = b"trusted.overlay.metacopy"
REDIRECT = b"trusted.overlay.redirect"
OPAQUE = b"trusted.overlay.opaque"
ESCAPED_WHITEOUT = b"trusted.overlay.overlay.whiteout"
ESCAPED_WHITEOUTS = b"trusted.overlay.overlay.whiteouts"
ESCAPED_OPAQUE = b"trusted.overlay.overlay.opaque"
USERXATTR_WHITEOUT = b"user.overlay.whiteout"
USERXATTR_WHITEOUTS = b"user.overlay.whiteouts"
USERXATTR_OPAQUE = b"user.overlay.opaque"
# FS_VERITY_HASH_ALG_SHA256; the metacopy value is version 0, its length, flags 0, this.
FS_VERITY_HASH_ALG_SHA256 = 1

# xattr_erofs_entry_index(): a prefix match (so "system.posix_acl_access" has an empty
# suffix); any other name is stored whole with index 0.
_PREFIXES: tuple[tuple[bytes, int], ...] = (
    (b"user.", 1),
    (b"system.posix_acl_access", 2),
    (b"system.posix_acl_default", 3),
    (b"trusted.", 4),
    (b"security.", 6),
)


@functools.lru_cache(maxsize=4096)
def split_name(name: bytes) -> tuple[int, bytes]:
    """(EROFS name index, stored suffix) of an xattr name, as libcomposefs splits it."""
    for prefix, index in _PREFIXES:
        if name.startswith(prefix):
            return index, name[len(prefix):]
    return 0, name


def entry_size(name: bytes, value: bytes) -> int:
    """Bytes of one erofs_xattr_entry with its name suffix and value, 4-aligned."""
    return (4 + len(split_name(name)[1]) + len(value) + 3) & ~3


_PRIME1 = 2654435761
_PRIME2 = 2246822519
_PRIME3 = 3266489917
_PRIME4 = 668265263
_PRIME5 = 374761393
_M32 = 0xFFFFFFFF


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _M32


def _round(acc: int, lane: int) -> int:
    return (_rotl((acc + lane * _PRIME2) & _M32, 13) * _PRIME1) & _M32


def xxh32(data: bytes, seed: int) -> int:
    """xxHash32 of ``data`` (the kernel's lib/xxhash.c, which libcomposefs copies)."""
    n = len(data)
    p = 0
    if n >= 16:
        v1 = (seed + _PRIME1 + _PRIME2) & _M32
        v2 = (seed + _PRIME2) & _M32
        v3 = seed & _M32
        v4 = (seed - _PRIME1) & _M32
        while p <= n - 16:
            a, b, c, d = struct.unpack_from("<4I", data, p)
            v1, v2, v3, v4 = _round(v1, a), _round(v2, b), _round(v3, c), _round(v4, d)
            p += 16
        h = (_rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)) & _M32
    else:
        h = (seed + _PRIME5) & _M32
    h = (h + n) & _M32
    while p + 4 <= n:
        (lane,) = struct.unpack_from("<I", data, p)
        h = (_rotl((h + lane * _PRIME3) & _M32, 17) * _PRIME4) & _M32
        p += 4
    while p < n:
        h = (_rotl((h + data[p] * _PRIME5) & _M32, 11) * _PRIME1) & _M32
        p += 1
    h ^= h >> 15
    h = (h * _PRIME2) & _M32
    h ^= h >> 13
    h = (h * _PRIME3) & _M32
    h ^= h >> 16
    return h


@functools.lru_cache(maxsize=4096)
def filter_bit(name: bytes) -> int:
    """The bit an xattr name sets in an inode's name filter."""
    index, suffix = split_name(name)
    return 1 << (xxh32(suffix, XATTR_FILTER_SEED + index) & (XATTR_FILTER_BITS - 1))


def encode_rdev(major: int, minor: int) -> int:
    """glibc's makedev() truncated to 32 bits, as libcomposefs stores st_rdev."""
    return ((minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~0xFF) << 12)) & _M32
