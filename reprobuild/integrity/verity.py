"""dm-verity hash trees in veritysetup's on-disk format (hash type 1, superblock version 1).

Specs: the kernel's Documentation/admin-guide/device-mapper/verity.rst and cryptsetup's
"DMVerity" format description. The data is ``data_blocks`` blocks of ``data_block_size``.
Every block is hashed as H(salt || block); each digest sits in a slot of the next power
of two bytes (sha1's 20 bytes take 32), ``hash_block_size / slot`` slots to a hash block,
the rest of the block zero. The slots of one level, block by block, are the blocks of the
next level, up to a level of one block; the root hash is H(salt || that block). A single
data block has no tree: its hash is the root hash.

The hash area starts at ``hash_offset`` (a multiple of 512) with the 512-byte superblock;
the tree starts at the next multiple of ``hash_block_size`` after the superblock, top
level first and the leaf level last. With the same salt and UUID, ``format`` writes the
bytes ``veritysetup format --salt S --uuid U`` writes, and ``verify`` checks what
``veritysetup verify`` checks, naming the first bad block from the root down.

When no salt or UUID is given they are derived from the data (keyed blake3 of the data's
blake3), so the same data always gets the same hash tree.
"""

from __future__ import annotations

import os
import struct
import uuid as uuidlib
from dataclasses import dataclass

import blake3

from reprobuild.errors import ImageError, VerifyError
from reprobuild.integrity.blockhash import (
    ALGORITHMS,
    SEGMENT_SIZE,
    digest_size,
    hash_blocks,
    hash_file_blocks,
    hasher,
)

# struct verity_sb (cryptsetup lib/verity/verity.c), 512 bytes, little endian:
#   0 u8 signature[8] "verity\0\0"  8 le32 version (1)  12 le32 hash_type (1)
#  16 u8 uuid[16]  32 char algorithm[32]  64 le32 data_block_size  68 le32 hash_block_size
#  72 le64 data_blocks  80 le16 salt_size  82 u8 _pad1[6]  88 u8 salt[256]  344 u8 _pad2[168]
VERITY_SB = struct.Struct("<8sII16s32sIIQH6x256s168x")
VERITY_SIGNATURE = b"verity\0\0"
MAX_SALT_SIZE = 256
MAX_LEVELS = 63
_SALT_CONTEXT = "reprobuild 2026-11 dm-verity salt"
_UUID_CONTEXT = "reprobuild 2026-11 dm-verity uuid"


@dataclass(frozen=True)
class VerityLayout:
    """Where each level of the tree lives, as data (no bytes): the plan of ``format``."""

    algorithm: str
    data_block_size: int
    hash_block_size: int
    data_blocks: int
    hash_offset: int  # byte offset of the superblock
    digest_size: int
    slot_size: int  # digest padded to a power of two
    level_blocks: tuple[int, ...]  # blocks per level, leaf level (0) first
    level_start: tuple[int, ...]  # first hash block (in hash_block_size units) per level

    @property
    def tree_offset(self) -> int:
        """Byte offset of the first tree block (top level)."""
        return _round_up(self.hash_offset + VERITY_SB.size, self.hash_block_size)

    @property
    def hash_blocks(self) -> int:
        return sum(self.level_blocks)

    @property
    def hash_end(self) -> int:
        """Byte offset just past the hash area: the hash file's size when it is alone."""
        return self.tree_offset + self.hash_blocks * self.hash_block_size


@dataclass(frozen=True)
class VerityResult:
    """What a format produced; the hex forms are what veritysetup prints."""

    root_hash: bytes
    salt: bytes
    uuid: str
    algorithm: str
    data_block_size: int
    hash_block_size: int
    data_blocks: int
    hash_offset: int
    hash_size: int  # bytes from hash_offset to the end of the tree

    @property
    def root_hash_hex(self) -> str:
        return self.root_hash.hex()

    def as_json(self) -> dict[str, str | int]:
        return {"root_hash": self.root_hash.hex(), "salt": self.salt.hex(), "uuid": self.uuid,
                "hash_algorithm": self.algorithm, "data_block_size": self.data_block_size,
                "hash_block_size": self.hash_block_size, "data_blocks": self.data_blocks,
                "hash_offset": self.hash_offset, "hash_size": self.hash_size}


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def _check_block_size(name: str, size: int) -> None:
    if size < 512 or size > (512 << 10) or size & (size - 1):
        raise ImageError(f"invalid dm-verity {name} {size}",
                         hint="use a power of two from 512 to 524288 (4096 is usual)")


def plan(*, algorithm: str, data_block_size: int, hash_block_size: int, data_blocks: int,
         hash_offset: int = 0) -> VerityLayout:
    """The layout of the hash area, computed as veritysetup does."""
    if algorithm not in ALGORITHMS:
        raise ImageError(f"unsupported dm-verity hash algorithm {algorithm!r}",
                         hint=f"use one of {', '.join(ALGORITHMS)}")
    _check_block_size("data block size", data_block_size)
    _check_block_size("hash block size", hash_block_size)
    if data_blocks < 1:
        raise ImageError("dm-verity needs at least one data block",
                         hint=f"the data must hold {data_block_size} bytes or more")
    if hash_offset < 0 or hash_offset % 512:
        raise ImageError(f"dm-verity hash offset {hash_offset} is not a multiple of 512",
                         hint="align the hash offset (a multiple of the hash block size)")
    size = digest_size(algorithm)
    slot = 1 << (size - 1).bit_length()
    bits = (hash_block_size // size).bit_length() - 1
    levels = 0
    while bits * levels < 64 and (data_blocks - 1) >> (bits * levels):
        levels += 1
    if levels > MAX_LEVELS:
        raise ImageError("dm-verity hash tree would be too deep",
                         hint="use a bigger hash block size")
    counts = tuple(-(-data_blocks // (1 << ((i + 1) * bits))) for i in range(levels))
    first = _round_up(hash_offset + VERITY_SB.size, hash_block_size) // hash_block_size
    starts = [0] * levels
    position = first
    for i in reversed(range(levels)):
        starts[i] = position
        position += counts[i]
    return VerityLayout(algorithm, data_block_size, hash_block_size, data_blocks, hash_offset,
                        size, slot, counts, tuple(starts))


def superblock(layout: VerityLayout, salt: bytes, uuid: str) -> bytes:
    """The 512-byte verity superblock."""
    return VERITY_SB.pack(VERITY_SIGNATURE, 1, 1, uuidlib.UUID(uuid).bytes,
                          layout.algorithm.encode(), layout.data_block_size,
                          layout.hash_block_size, layout.data_blocks, len(salt), salt)


@dataclass(frozen=True)
class VeritySuperblock:
    """A superblock read back from a hash device."""

    uuid: str
    algorithm: str
    data_block_size: int
    hash_block_size: int
    data_blocks: int
    salt: bytes


def parse_superblock(raw: bytes, where: str) -> VeritySuperblock:
    if len(raw) < VERITY_SB.size:
        raise VerifyError(f"{where}: too short for a dm-verity superblock",
                          hint="is the hash offset right?")
    (signature, version, hash_type, uuid_bytes, algorithm, data_block_size, hash_block_size,
     data_blocks, salt_size, salt) = VERITY_SB.unpack(raw[:VERITY_SB.size])
    if signature != VERITY_SIGNATURE:
        raise VerifyError(f"{where}: no dm-verity superblock (signature {signature!r})",
                          hint="is this the hash device, and is the hash offset right?")
    if version != 1 or hash_type != 1:
        raise VerifyError(f"{where}: unsupported dm-verity superblock version {version} "
                          f"hash type {hash_type}", hint="only format 1 is supported")
    if salt_size > MAX_SALT_SIZE:
        raise VerifyError(f"{where}: corrupt dm-verity superblock (salt size {salt_size})")
    return VeritySuperblock(str(uuidlib.UUID(bytes=uuid_bytes)),
                            algorithm.rstrip(b"\0").decode("ascii", "replace"),
                            data_block_size, hash_block_size, data_blocks, salt[:salt_size])


def read_superblock(hash_path: str | os.PathLike[str], hash_offset: int = 0
                    ) -> VeritySuperblock:
    with open(hash_path, "rb") as f:
        f.seek(hash_offset)
        raw = f.read(VERITY_SB.size)
    return parse_superblock(raw, f"{os.fspath(hash_path)} at offset {hash_offset}")


def derive_salt_and_uuid(content_digest: bytes) -> tuple[bytes, str]:
    """The salt (32 bytes) and UUID (random-variant form) derived from the data's blake3."""
    salt = blake3.blake3(content_digest, derive_key_context=_SALT_CONTEXT).digest(32)
    raw = bytearray(blake3.blake3(content_digest, derive_key_context=_UUID_CONTEXT).digest(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    return salt, str(uuidlib.UUID(bytes=bytes(raw)))


def content_digest_of(fd: int, length: int) -> bytes:
    """blake3 of the first ``length`` bytes of ``fd``."""
    state = blake3.blake3()  # one thread: memory-bound, and rayon threads cost more on a busy host
    offset = 0
    while offset < length:
        chunk = os.pread(fd, min(SEGMENT_SIZE, length - offset), offset)
        if not chunk:
            raise ImageError(f"data ended at {offset} of {length} bytes")
        state.update(chunk)
        offset += len(chunk)
    return state.digest()


def _tree_levels(leaves: bytes, layout: VerityLayout, salt: bytes) -> list[bytes]:
    """Every level's bytes (whole hash blocks), leaf level first, from the leaf digests."""
    levels: list[bytes] = []
    current = leaves
    for _ in layout.level_blocks:
        padded = current.ljust(_round_up(len(current), layout.hash_block_size), b"\0")
        levels.append(padded)
        current = hash_blocks(padded, layout.hash_block_size, layout.algorithm, salt,
                              slot=layout.slot_size)
    return levels


def _root(levels: list[bytes], leaves: bytes, layout: VerityLayout, salt: bytes) -> bytes:
    top = levels[-1] if levels else None
    if top is None:  # one data block: its hash is the root
        return leaves[:layout.digest_size]
    return hasher(layout.algorithm, salt)(top).digest()


def _normalise_uuid(value: str) -> str:
    try:
        return str(uuidlib.UUID(value))
    except ValueError:
        raise ImageError(f"invalid dm-verity UUID {value!r}",
                         hint="write it as 8-4-4-4-12 hex digits") from None


def format(data_path: str | os.PathLike[str], hash_path: str | os.PathLike[str], *,
           algorithm: str = "sha256", data_block_size: int = 4096,
           hash_block_size: int = 4096, salt: bytes | None = None, uuid: str | None = None,
           hash_offset: int = 0, data_blocks: int | None = None,
           content_digest: bytes | None = None, threads: int | None = None) -> VerityResult:
    """Write the superblock and hash tree of ``data_path`` into ``hash_path``.

    ``hash_path`` may be ``data_path`` itself (the tree appended at ``hash_offset``, which
    must then lie past the data). A separate hash file is created or truncated when
    ``hash_offset`` is 0; otherwise bytes before ``hash_offset`` are kept. ``data_blocks``
    defaults to the data's size, which must then be a whole number of blocks.
    ``content_digest``, the blake3 of the data blocks when the caller knows it, saves a
    pass over the data when the salt or UUID is derived.
    """
    if salt is not None and len(salt) > MAX_SALT_SIZE:
        raise ImageError(f"dm-verity salt is {len(salt)} bytes",
                         hint=f"a salt has at most {MAX_SALT_SIZE} bytes")
    fd = os.open(data_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if data_blocks is None:
            if size % data_block_size:
                raise ImageError(
                    f"{os.fspath(data_path)}: size {size} is not a multiple of the data "
                    f"block size {data_block_size}",
                    hint="pad the image to whole blocks or give data_blocks explicitly")
            data_blocks = size // data_block_size
        data_length = data_blocks * data_block_size
        if data_length > size:
            raise ImageError(f"{os.fspath(data_path)}: {size} bytes hold fewer than "
                             f"{data_blocks} blocks of {data_block_size}")
        layout = plan(algorithm=algorithm, data_block_size=data_block_size,
                      hash_block_size=hash_block_size, data_blocks=data_blocks,
                      hash_offset=hash_offset)
        same = os.path.exists(hash_path) and os.path.samefile(data_path, hash_path)
        if same and hash_offset < data_length:
            raise ImageError(f"hash offset {hash_offset} overlaps the {data_length} bytes of "
                             f"data in {os.fspath(data_path)}",
                             hint=f"use a hash offset of at least {data_length}")
        if salt is None or uuid is None:
            if content_digest is None:
                content_digest = content_digest_of(fd, data_length)
            derived_salt, derived_uuid = derive_salt_and_uuid(content_digest)
            salt = derived_salt if salt is None else salt
            uuid = derived_uuid if uuid is None else uuid
        uuid = _normalise_uuid(uuid)
        leaves = hash_file_blocks(fd, 0, data_length, data_block_size, algorithm, salt,
                                  slot=layout.slot_size, threads=threads)
    finally:
        os.close(fd)
    levels = _tree_levels(leaves, layout, salt)
    root = _root(levels, leaves, layout, salt)
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
    if hash_offset == 0 and not same:
        flags |= os.O_TRUNC
    out = os.open(hash_path, flags, 0o644)
    try:
        header = superblock(layout, salt, uuid).ljust(layout.tree_offset - hash_offset, b"\0")
        os.pwrite(out, header, hash_offset)
        position = layout.tree_offset
        for level in reversed(levels):
            view = memoryview(level)
            while view:
                written = os.pwrite(out, view, position)
                view = view[written:]
                position += written
    finally:
        os.close(out)
    return VerityResult(root, salt, uuid, algorithm, data_block_size, hash_block_size,
                        data_blocks, hash_offset, layout.hash_end - hash_offset)


def _first_difference(stored: bytes, computed: bytes, slot: int) -> int | None:
    """Index of the first slot where ``stored`` and ``computed`` differ, or None."""
    if stored == computed:
        return None
    limit = min(len(stored), len(computed))
    low, high = 0, limit  # binary search on prefix equality: C-speed comparisons
    while high - low > 4096:
        mid = (low + high) // 2
        if stored[low:mid] == computed[low:mid]:
            low = mid
        else:
            high = mid
    for i in range(low, limit):
        if stored[i] != computed[i]:
            return i // slot
    return limit // slot


def verify(data_path: str | os.PathLike[str], hash_path: str | os.PathLike[str],
           root_hash: bytes | str, *, hash_offset: int = 0,
           threads: int | None = None) -> None:
    """Check data and hash tree against ``root_hash``; raise VerifyError naming the first
    bad block, checked from the root down (so a bad hash block is named, not the data
    blocks under it)."""
    expected = bytes.fromhex(root_hash) if isinstance(root_hash, str) else root_hash
    sb = read_superblock(hash_path, hash_offset)
    try:
        layout = plan(algorithm=sb.algorithm, data_block_size=sb.data_block_size,
                      hash_block_size=sb.hash_block_size, data_blocks=sb.data_blocks,
                      hash_offset=hash_offset)
    except ImageError as exc:
        raise VerifyError(f"{os.fspath(hash_path)}: {exc.message}", hint=exc.hint) from None
    if len(expected) != layout.digest_size:
        raise VerifyError(f"root hash has {len(expected)} bytes, {sb.algorithm} has "
                          f"{layout.digest_size}", hint="pass the root hash in hex")
    bs = layout.hash_block_size
    stored: list[bytes] = []
    with open(hash_path, "rb") as f:
        for count, start in zip(layout.level_blocks, layout.level_start, strict=True):
            f.seek(start * bs)
            level_bytes = f.read(count * bs)
            if len(level_bytes) != count * bs:
                raise VerifyError(f"{os.fspath(hash_path)}: hash tree is truncated",
                                  hint=f"expected {layout.hash_end} bytes")
            stored.append(level_bytes)
    salt = sb.salt
    hash_name = os.fspath(hash_path)
    if stored:
        top_start = layout.level_start[-1]
        if hasher(sb.algorithm, salt)(stored[-1]).digest() != expected:
            raise VerifyError(
                f"{hash_name}: hash block {top_start} (top level {len(stored) - 1}) does "
                "not match the root hash",
                hint="the hash device or the root hash is wrong")
        for level in reversed(range(1, len(stored))):
            computed = hash_blocks(stored[level - 1], bs, sb.algorithm, salt,
                                   slot=layout.slot_size).ljust(len(stored[level]), b"\0")
            bad = _first_difference(stored[level], computed, layout.slot_size)
            if bad is not None:
                if bad >= layout.level_blocks[level - 1]:
                    block = layout.level_start[level] + bad * layout.slot_size // bs
                    raise VerifyError(f"{hash_name}: spare area of hash block {block} is "
                                      "not zeroed")
                block = layout.level_start[level - 1] + bad
                raise VerifyError(f"{hash_name}: hash block {block} (level {level - 1}) "
                                  "does not match its hash")
    fd = os.open(data_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        length = sb.data_blocks * sb.data_block_size
        if os.fstat(fd).st_size < length:
            raise VerifyError(f"{os.fspath(data_path)}: shorter than {sb.data_blocks} blocks",
                              hint="is this the right data device?")
        leaves = hash_file_blocks(fd, 0, length, sb.data_block_size, sb.algorithm, salt,
                                  slot=layout.slot_size, threads=threads)
    finally:
        os.close(fd)
    if not stored:
        bad = None if leaves[:layout.digest_size] == expected else 0
    else:
        bad = _first_difference(stored[0], leaves.ljust(len(stored[0]), b"\0"),
                                layout.slot_size)
        if bad is not None and bad >= sb.data_blocks:
            block = layout.level_start[0] + bad * layout.slot_size // bs
            raise VerifyError(f"{hash_name}: spare area of hash block {block} is not zeroed")
    if bad is not None:
        offset = bad * sb.data_block_size
        raise VerifyError(f"{os.fspath(data_path)}: data block {bad} (bytes {offset}.."
                          f"{offset + sb.data_block_size - 1}) does not match its hash",
                          hint="the data was modified after the hash tree was made")
