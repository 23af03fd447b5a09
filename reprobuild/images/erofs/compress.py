"""LZ4-compressed EROFS regular files (``compress = "lz4"``).

A simple layout the kernel reads: COMPRESSED_FULL inodes (one 8-byte
``z_erofs_lcluster_index`` per 4 KiB logical cluster after a ``z_erofs_map_header``),
4 KiB logical clusters, big physical clusters (BIG_PCLUSTER with the lz4 config after
the superblock) and LZ4_0PADDING (compressed data right-aligned in its blocks, leading
zeros). A file is cut into extents of 16 logical clusters (64 KiB, the last one
shorter); an extent whose LZ4 block saves at least one block is stored compressed in as
many blocks as it needs, any other is stored PLAIN, cluster by cluster. Extents start at
cluster boundaries, so every ``di_clusterofs`` is 0. The bytes depend only on the data.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable, Iterable, Iterator

import lz4
import lz4.block

from reprobuild.errors import ImageError
from reprobuild.images.erofs.ondisk import BLOCK_SIZE

COMPRESSED_FULL = 1  # EROFS_INODE_COMPRESSED_FULL
FEATURE_INCOMPAT_ZERO_PADDING = 0x00000001  # LZ4_0PADDING
FEATURE_INCOMPAT_COMPR_CFGS = 0x00000002  # also BIG_PCLUSTER
ADVISE_BIG_PCLUSTER_1 = 0x0002  # Z_EROFS_ADVISE_BIG_PCLUSTER_1
D0_CBLKCNT = 1 << 11  # Z_EROFS_LI_D0_CBLKCNT: delta[0] of the first NONHEAD holds the
# pcluster's block count
MAX_EXTENT_CLUSTERS = 16
AVAILABLE_COMPR_ALGS = 1 << 0  # lz4

# After the superblock (COMPR_CFGS): __le16 length, then struct z_erofs_lz4_cfgs
# (14 bytes): 0 max_distance (0: the 64 KiB default), 2 max_pclusterblks, 4 reserved[10]
Z_EROFS_LZ4_CFGS = struct.Struct("<HHH10s")
COMPR_CFGS = Z_EROFS_LZ4_CFGS.pack(Z_EROFS_LZ4_CFGS.size - 2, 0, MAX_EXTENT_CLUSTERS, b"")

# Z_EROFS_LCLUSTER_TYPE_*: the low two bits of di_advise.
LCLUSTER_PLAIN = 0
LCLUSTER_HEAD1 = 1
LCLUSTER_NONHEAD = 2

# struct z_erofs_map_header (8 bytes): 0 h_reserved1, 2 h_idata_size, 4 h_advise,
# 6 h_algorithmtype (bits 0-3: head1 algorithm, 0 = lz4), 7 h_clusterbits (lcluster
# size = 4096 << h_clusterbits)
Z_EROFS_MAP_HEADER = struct.Struct("<HHHBB")

# struct z_erofs_lcluster_index (8 bytes): 0 di_advise, 2 di_clusterofs,
# 4 di_u (blkaddr for PLAIN/HEAD, delta[0] and delta[1] for NONHEAD)
Z_EROFS_LCLUSTER_INDEX = struct.Struct("<HHI")


def index_area_size(inode_and_xattrs: int, size: int) -> int:
    """Bytes after an inode's header and xattrs: padding to 8, the map header, 8 reserved
    bytes (Z_EROFS_FULL_INDEX_ALIGN), then one index per logical cluster."""
    pad = -inode_and_xattrs % 8
    return pad + Z_EROFS_MAP_HEADER.size + 8 + Z_EROFS_LCLUSTER_INDEX.size * clusters(size)


def clusters(size: int) -> int:
    return -(-size // BLOCK_SIZE)


def identity() -> dict[str, str]:
    return {"erofs.compressor": "lz4", "lz4.python": lz4.__version__,
            "lz4.library": lz4.library_version_string()}


def _pieces(chunks: Iterable[bytes]) -> Iterator[bytearray]:
    """Re-cut a stream into pieces of MAX_EXTENT_CLUSTERS clusters (the last shorter)."""
    piece = MAX_EXTENT_CLUSTERS * BLOCK_SIZE
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        while len(buffer) >= 2 * piece:
            yield buffer[:piece]
            del buffer[:piece]
    while buffer:
        yield buffer[:piece]
        del buffer[:piece]


def write_compressed(emit: Callable[[bytes], None], chunks: Iterable[bytes], size: int,
                     first_block: int) -> tuple[int, bytes, int]:
    """Compress one file into blocks, passed to ``emit``, stored from ``first_block`` on.

    Returns (blocks written, the map header and lcluster indexes, bytes read).
    """
    indexes: list[bytes] = []
    block = first_block
    read = 0
    for piece in _pieces(chunks):
        read += len(piece)
        count = clusters(len(piece))
        packed = lz4.block.compress(bytes(piece), store_size=False) if count > 1 else b""
        used = clusters(len(packed))
        if count > 1 and used < count:
            # Right-aligned in its blocks (LZ4_0PADDING): the zeros come first.
            emit(bytes(used * BLOCK_SIZE - len(packed)) + packed)
            indexes.append(Z_EROFS_LCLUSTER_INDEX.pack(LCLUSTER_HEAD1, 0, block))
            indexes.append(Z_EROFS_LCLUSTER_INDEX.pack(
                LCLUSTER_NONHEAD, 0, (D0_CBLKCNT | used) | (count - 1) << 16))
            indexes.extend(Z_EROFS_LCLUSTER_INDEX.pack(LCLUSTER_NONHEAD, 0, i | (count - i) << 16)
                           for i in range(2, count))
            block += used
        else:
            emit(bytes(piece) + bytes(count * BLOCK_SIZE - len(piece)))
            indexes.extend(Z_EROFS_LCLUSTER_INDEX.pack(LCLUSTER_PLAIN, 0, block + i)
                           for i in range(count))
            block += count
    header = Z_EROFS_MAP_HEADER.pack(0, 0, ADVISE_BIG_PCLUSTER_1, 0, 0) + bytes(8)
    return block - first_block, header + b"".join(indexes), read


def read_compressed(image: bytes | bytearray | memoryview | mmap.mmap, index_base: int,
                    size: int) -> bytes:
    """Decompress a COMPRESSED_FULL inode written as above (used by the reader)."""
    out = bytearray()
    total = clusters(size)
    lcn = 0
    while lcn < total:
        advise, _, blkaddr = Z_EROFS_LCLUSTER_INDEX.unpack_from(
            image, index_base + lcn * Z_EROFS_LCLUSTER_INDEX.size)
        kind = advise & 3
        count = 1
        while lcn + count < total:
            next_advise = Z_EROFS_LCLUSTER_INDEX.unpack_from(
                image, index_base + (lcn + count) * Z_EROFS_LCLUSTER_INDEX.size)[0]
            if next_advise & 3 != LCLUSTER_NONHEAD:
                break
            count += 1
        length = min(count * BLOCK_SIZE, size - lcn * BLOCK_SIZE)
        used = 1
        if kind == LCLUSTER_HEAD1 and count > 1:
            delta0 = Z_EROFS_LCLUSTER_INDEX.unpack_from(
                image, index_base + (lcn + 1) * Z_EROFS_LCLUSTER_INDEX.size)[2] & 0xFFFF
            if delta0 & D0_CBLKCNT:
                used = delta0 & ~D0_CBLKCNT
        block = bytes(image[blkaddr * BLOCK_SIZE:(blkaddr + used) * BLOCK_SIZE])
        if kind == LCLUSTER_PLAIN:
            out += block[:length]
        elif kind == LCLUSTER_HEAD1:
            try:
                out += lz4.block.decompress(block.lstrip(b"\0"), uncompressed_size=length)
            except lz4.block.LZ4BlockError as exc:
                raise ImageError(f"EROFS: bad LZ4 data in block {blkaddr} ({exc})") from None
        else:
            raise ImageError(f"EROFS lcluster type {kind} is not supported",
                             hint="reprobuild reads the LZ4 layout it writes")
        lcn += count
    return bytes(out)
