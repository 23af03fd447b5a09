"""fs-verity file digests, equal to what ``fsverity digest`` prints and the kernel measures.

Spec: the kernel's Documentation/filesystems/fsverity.rst. The file is cut into blocks
(4 KiB by default, the last one zero-padded); each block is hashed as H(salt' || block),
where salt' is the salt zero-padded to a multiple of the hash's input block size (nothing
when there is no salt). The digests of one level, zero-padded to a whole block, are the
blocks of the next level, up to a level of one block; its hash is the root hash. An empty
file has an all-zero root hash; a one-block file's root hash is its block's hash. The file
digest is H(fsverity_descriptor). ``digest_file(image)`` with the defaults (sha256,
4 KiB, no salt) is an image's fs-verity digest; for a composefs image (and only there)
that is its composefs digest.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from reprobuild.errors import ImageError
from reprobuild.integrity.blockhash import hash_blocks, hash_file_blocks, hasher

# struct fsverity_descriptor (fs/verity/fsverity_private.h), 256 bytes, little endian:
#   0 u8 version (1)  1 u8 hash_algorithm  2 u8 log_blocksize  3 u8 salt_size
#   4 le32 sig_size (0 when measured)  8 le64 data_size  16 u8 root_hash[64]
#  80 u8 salt[32]  112 u8 __reserved[144]
FSVERITY_DESCRIPTOR = struct.Struct("<BBBBIQ64s32s144x")


@dataclass(frozen=True)
class FsVerityAlgorithm:
    name: str
    number: int  # FS_VERITY_HASH_ALG_* in include/uapi/linux/fsverity.h
    digest_size: int
    input_block_size: int  # the salt is padded to a multiple of this


FSVERITY_ALGORITHMS: dict[str, FsVerityAlgorithm] = {
    "sha256": FsVerityAlgorithm("sha256", 1, 32, 64),
    "sha512": FsVerityAlgorithm("sha512", 2, 64, 128),
}
MAX_SALT_SIZE = 32
# How many bytes the streaming variant buffers before hashing a batch of blocks.
_BATCH = 1 << 20


@dataclass(frozen=True)
class FsVerityParams:
    """The parameters of one digest, validated."""

    algorithm: FsVerityAlgorithm
    block_size: int
    salt: bytes

    @property
    def padded_salt(self) -> bytes:
        if not self.salt:
            return b""
        unit = self.algorithm.input_block_size
        return self.salt.ljust(-(-len(self.salt) // unit) * unit, b"\0")


def params(algorithm: str = "sha256", block_size: int = 4096,
           salt: bytes = b"") -> FsVerityParams:
    """Validate the digest parameters the way ``fsverity digest`` does."""
    alg = FSVERITY_ALGORITHMS.get(algorithm)
    if alg is None:
        raise ImageError(f"unsupported fs-verity hash algorithm {algorithm!r}",
                         hint=f"use one of {', '.join(sorted(FSVERITY_ALGORITHMS))}")
    if block_size < 1024 or block_size > 65536 or block_size & (block_size - 1):
        raise ImageError(f"invalid fs-verity block size {block_size}",
                         hint="use a power of two from 1024 to 65536")
    if len(salt) > MAX_SALT_SIZE:
        raise ImageError(f"fs-verity salt is {len(salt)} bytes",
                         hint=f"a salt has at most {MAX_SALT_SIZE} bytes")
    return FsVerityParams(alg, block_size, bytes(salt))


def root_hash_from_leaves(leaf_digests: bytes, p: FsVerityParams) -> bytes:
    """The Merkle root over the data blocks whose digests are ``leaf_digests``."""
    size = p.algorithm.digest_size
    if not leaf_digests:
        return b"\0" * size
    level = leaf_digests
    salt = p.padded_salt
    while len(level) > size:
        level = hash_blocks(level, p.block_size, p.algorithm.name, salt)
    return level


def descriptor(data_size: int, root_hash: bytes, p: FsVerityParams) -> bytes:
    """The 256-byte fsverity_descriptor whose hash is the file digest."""
    return FSVERITY_DESCRIPTOR.pack(
        1, p.algorithm.number, p.block_size.bit_length() - 1, len(p.salt), 0, data_size,
        root_hash, p.salt)


def _digest(data_size: int, leaf_digests: bytes, p: FsVerityParams) -> bytes:
    root = root_hash_from_leaves(leaf_digests, p)
    return hasher(p.algorithm.name)(descriptor(data_size, root, p)).digest()


def digest_file(path: str | bytes | os.PathLike[str], *, algorithm: str = "sha256",
                block_size: int = 4096, salt: bytes = b"",
                threads: int | None = None) -> bytes:
    """The fs-verity digest of the file at ``path`` (raw bytes, as ``fsverity digest``)."""
    p = params(algorithm, block_size, salt)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        leaves = hash_file_blocks(fd, 0, size, block_size, algorithm, p.padded_salt,
                                  threads=threads)
    finally:
        os.close(fd)
    return _digest(size, leaves, p)


def digest_bytes(data: bytes | bytearray | memoryview, *, algorithm: str = "sha256",
                 block_size: int = 4096, salt: bytes = b"") -> bytes:
    """The fs-verity digest of a file whose content is ``data``."""
    p = params(algorithm, block_size, salt)
    view = memoryview(data).cast("B")
    return _digest(len(view), hash_blocks(view, block_size, algorithm, p.padded_salt), p)


def digest_chunks(chunks: Iterable[bytes | bytearray | memoryview], *,
                  algorithm: str = "sha256", block_size: int = 4096,
                  salt: bytes = b"") -> bytes:
    """The fs-verity digest of the concatenation of ``chunks`` (e.g. ``Content.chunks()``)."""
    p = params(algorithm, block_size, salt)
    salt_prefix = p.padded_salt
    leaves: list[bytes] = []
    pending = bytearray()
    size = 0
    for chunk in chunks:
        size += len(chunk)
        pending += chunk
        if len(pending) >= _BATCH:
            whole = len(pending) - len(pending) % block_size
            with memoryview(pending) as view:
                leaves.append(hash_blocks(view[:whole], block_size, algorithm, salt_prefix))
            del pending[:whole]
    if pending:
        leaves.append(hash_blocks(pending, block_size, algorithm, salt_prefix))
    return _digest(size, b"".join(leaves), p)


def format_digest(digest: bytes, algorithm: str = "sha256") -> str:
    """``sha256:<hex>``, as ``fsverity digest`` prints it before the file name."""
    return f"{algorithm}:{digest.hex()}"
