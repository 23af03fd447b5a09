"""The ext4 tests' shared trees and checks: a sample tree with every entry type and
feature, pattern contents with holes, building an image, e2fsck and debugfs."""

from __future__ import annotations

import io
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reprobuild.images.ext4 import image as ext4
from reprobuild.images.ext4.ondisk import BLOCK_SIZE
from reprobuild.images.registry import ImageOptions
from reprobuild.trees.tree import Content, Entry, EntryType, Tree
from tests.conftest import need_tool

EPOCH = 1_700_000_000
EPOCH_NS = EPOCH * 1_000_000_000
UUID = "6a7e0c52-61d4-4f0e-9c3b-2f0a8f5d1e42"
REPO = Path(__file__).resolve().parents[2]
MountImage = Callable[[Path, str], Path]

# A valid POSIX ACL (version 2): user::rw-, user:1000:r--, group::r--, mask::r--, other::r--
ACL = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, ident)
    for tag, perm, ident in ((1, 6, 0xFFFFFFFF), (2, 4, 1000), (4, 4, 0xFFFFFFFF),
                             (0x10, 4, 0xFFFFFFFF), (0x20, 4, 0xFFFFFFFF)))


class _PatternReader(io.RawIOBase):
    def __init__(self, size: int, data_blocks: frozenset[int], read_size: int) -> None:
        super().__init__()
        self.size, self.data_blocks, self.read_size, self.pos = size, data_blocks, \
            read_size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.read_size, self.size - self.pos)
        if n <= 0:
            return 0
        view = memoryview(buffer).cast("B")
        view[:n] = bytes(n)
        first, last = self.pos // BLOCK_SIZE, (self.pos + n - 1) // BLOCK_SIZE
        for block in range(first, last + 1):
            if block in self.data_blocks:
                start = max(block * BLOCK_SIZE, self.pos)
                end = min((block + 1) * BLOCK_SIZE, self.pos + n)
                view[start - self.pos: end - self.pos] = \
                    ((block + 1).to_bytes(8, "little") * 512)[start % BLOCK_SIZE:][: end - start]
        self.pos += n
        return n


@dataclass(frozen=True)
class PatternSource:
    """A file of ``size`` bytes, zero except ``data_blocks``; read ``read_size`` at a time."""

    size: int
    data_blocks: frozenset[int]
    read_size: int = 1 << 20

    def open(self) -> Any:
        # Unbuffered: each read returns at most read_size bytes, so chunk boundaries vary.
        return _PatternReader(self.size, self.data_blocks, self.read_size)


def pattern(size: int, data_blocks: set[int] | range, read_size: int = 1 << 20) -> Content:
    return Content(size, PatternSource(size, frozenset(data_blocks), read_size))


def data(n: int, seed: int) -> bytes:
    return bytes((i * 131 + seed * 7 + (i >> 8)) & 0xFF for i in range(n)) if n < 70000 \
        else (bytes(range(256)) * (n // 256 + 1))[:n]


def sample_tree(*, big_dir: int = 0) -> Tree:
    """Every entry type and feature: hardlinks, in-inode, block and shared xattrs, ACLs,
    fast and slow symlinks, both device encodings, holes, extent index levels."""
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755, mtime_ns=EPOCH_NS - 7,
                      xattrs=((b"user.root", b"r"),)))

    def add(path: bytes, kind: EntryType, mode: int = 0o644, **kw: Any) -> None:
        kw.setdefault("mtime_ns", EPOCH_NS - 1_000_000_001)
        tree.add(Entry(path, kind, mode, **kw))

    def file(path: bytes, content: bytes | Content, **kw: Any) -> None:
        if isinstance(content, bytes):
            content = Content.from_bytes(content)
        add(path, EntryType.REGULAR, content=content, **kw)

    big_xattrs = ((b"user.big", b"B" * 300), (b"user.more", b"M" * 200))
    add(b"etc", EntryType.DIRECTORY, 0o755)
    file(b"etc/shadow", b"root:*:19000:0:99999:7:::\n", mode=0o640, gid=42)
    file(b"etc/empty", b"")
    file(b"etc/block", data(BLOCK_SIZE, 1))
    file(b"etc/block-and-one", data(BLOCK_SIZE + 1, 2))
    file(b"etc/acl", b"acl\n", xattrs=((b"system.posix_acl_access", ACL),))
    add(b"usr", EntryType.DIRECTORY, 0o755, uid=100_000, gid=70_000)
    add(b"usr/bin", EntryType.DIRECTORY, 0o755)
    file(b"usr/bin/ping", data(30_000, 3), mode=0o4755,
         xattrs=((b"security.capability", bytes.fromhex("0100000200200000" + "00" * 12)),))
    add(b"usr/bin/ping6", EntryType.HARDLINK, target=b"usr/bin/ping")
    add(b"usr/sbin", EntryType.DIRECTORY, 0o755)
    add(b"usr/sbin/ping", EntryType.HARDLINK, target=b"usr/bin/ping")
    file(b"usr/xattr-block-1", b"one", xattrs=big_xattrs)
    file(b"usr/xattr-block-2", b"two", xattrs=(*big_xattrs, (b"trusted.t", b"x")))
    file(b"usr/xattr-block-3", b"three", xattrs=big_xattrs)  # shares block 1's
    file(b"usr/xattr-mixed", b"m", xattrs=((b"user.a", b"1"), (b"user.b", b""),
                                           (b"user.c", b"C" * 1000)))
    file(b"var-old", b"before 1970\n", mtime_ns=-86_400 * 365 * 10**9 + 5)
    file(b"var-nanos", b"\n", mtime_ns=EPOCH_NS - 999_999_999)
    file(b"var-future", b"clamped to the epoch\n", mtime_ns=EPOCH_NS + 10**12)
    file(b"holes", pattern(20 * BLOCK_SIZE + 100, {0, 1, 5, 19, 20}))
    file(b"all-zero", pattern(3 * BLOCK_SIZE, set()))
    file(b"odd-reads", pattern(9 * BLOCK_SIZE + 7, {0, 2, 3, 8, 9}, read_size=1000))
    file(b"fragmented-1", pattern(2000 * BLOCK_SIZE, range(0, 2000, 2)))  # depth 1
    file(b"fragmented-2", pattern(3000 * BLOCK_SIZE + 1, range(1, 3001, 2)))  # depth 2
    add(b"dev", EntryType.DIRECTORY, 0o755)
    add(b"dev/console", EntryType.CHAR, 0o600, rdev_major=5, rdev_minor=1)
    add(b"dev/sda", EntryType.BLOCK, 0o660, gid=6, rdev_major=8, rdev_minor=0)
    add(b"dev/nvme", EntryType.BLOCK, 0o660, rdev_major=259, rdev_minor=0x12345)
    add(b"dev/fifo", EntryType.FIFO, 0o644)
    add(b"dev/socket", EntryType.SOCKET, 0o755)
    add(b"bin", EntryType.SYMLINK, 0o777, target=b"usr/bin")
    add(b"link-59", EntryType.SYMLINK, 0o777, target=b"t" * 59)
    add(b"link-60", EntryType.SYMLINK, 0o777, target=b"t" * 60)
    add(b"link-long", EntryType.SYMLINK, 0o777, target=b"a/" * 1000 + b"end",
        xattrs=((b"trusted.s", b"v"),))
    add(b"many", EntryType.DIRECTORY, 0o755)
    for i in range(big_dir):
        file(b"many/entry-%06d-%s" % (i, b"x" * (i % 40)), b"")
    return tree


def build(tree: Tree, path: Path, **options: Any) -> Path:
    options.setdefault("epoch", EPOCH)
    with path.open("wb") as out:
        ext4.write(tree, out, ImageOptions(**options))
    return path


def e2fsck_clean(image: Path) -> None:
    need_tool("e2fsck")
    result = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Fix?" not in result.stdout and "Clear?" not in result.stdout, result.stdout


def debugfs(image: Path, request: str) -> str:
    need_tool("debugfs")
    result = subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def without_lost_found(tree: Tree) -> Tree:
    if b"lost+found" in tree:
        tree.remove(b"lost+found")
    return tree


def expected(tree: Tree) -> Tree:
    return tree.normalized(epoch=EPOCH)
