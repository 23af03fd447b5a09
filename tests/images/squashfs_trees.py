"""The squashfs tests' shared trees and checks: a sample tree with every entry type,
building an image, mtimes in seconds, and unsquashfs's listing."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import blake3

from reprobuild.images.registry import ImageOptions
from reprobuild.images.squashfs import image as squashfs
from reprobuild.trees.tree import Content, Entry, EntryType, Tree

EPOCH = 1_700_000_000
COMPRESSORS = ("zstd", "gzip", "xz", "lz4", "none")
BIG_DIR_ENTRIES = 700


def pseudo_random(seed: str, size: int) -> bytes:
    return blake3.blake3(seed.encode()).digest(length=size)


def text(seed: str, size: int) -> bytes:
    line = f"{seed}: the quick brown fox jumps over the lazy dog\n".encode()
    return (line * (size // len(line) + 1))[:size]


def sample_tree(block_size: int = 131072) -> Tree:
    """Every entry type, hardlinks, xattrs, sparse content, duplicates, a big directory."""
    t = 1_650_000_000 * 10**9
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755, mtime_ns=t,
                      xattrs=((b"user.root", b"yes"),)))

    def add(path: bytes, kind: EntryType, mode: int, **kw: object) -> None:
        kw.setdefault("mtime_ns", t)
        tree.add(Entry(path, kind, mode, **kw))  # type: ignore[arg-type]

    def file(path: bytes, data: bytes, mode: int = 0o644, **kw: object) -> None:
        add(path, EntryType.REGULAR, mode, content=Content.from_bytes(data), **kw)

    add(b"bin", EntryType.DIRECTORY, 0o755)
    add(b"etc", EntryType.DIRECTORY, 0o750, uid=1000, gid=1000,
        xattrs=((b"trusted.dir", b"\x00\x01"),))
    add(b"empty-dir", EntryType.DIRECTORY, 0o700, uid=65534, gid=65534)
    file(b"empty", b"")
    file(b"small", b"hello\n", mtime_ns=t - 86400 * 10**9)
    file(b"exact", text("exact", block_size))
    file(b"tail", text("tail", 3 * block_size + 100), 0o4755)
    file(b"bin/dup", text("tail", 3 * block_size + 100), 0o755)
    file(b"random", pseudo_random("random", 2 * block_size + 77), 0o600, uid=1234567,
         gid=7654321)
    sparse = (text("head", block_size) + bytes(3 * block_size) + text("mid", block_size)
              + bytes(block_size) + b"end")
    file(b"sparse", sparse)
    file(b"zeros", bytes(2 * block_size + 10))
    file(b"xattrs", b"with xattrs\n",
         xattrs=((b"security.test", b"sec"), (b"trusted.t", b""), (b"user.a", b"1"),
                 (b"user.b", pseudo_random("x", 300))))
    file(b"bin/hl", text("hardlinked", 5000), 0o755, xattrs=((b"user.hl", b"1"),))
    add(b"etc/hl", EntryType.HARDLINK, 0o755, target=b"bin/hl")
    add(b"hl", EntryType.HARDLINK, 0o755, target=b"bin/hl")
    add(b"link", EntryType.SYMLINK, 0o777, target=b"small")
    add(b"etc/xlink", EntryType.SYMLINK, 0o777, target=b"/" + b"x" * 300,
        xattrs=((b"trusted.link", b"1"),))
    add(b"null", EntryType.CHAR, 0o666, rdev_major=1, rdev_minor=3)
    add(b"disk", EntryType.BLOCK, 0o660, gid=6, rdev_major=259, rdev_minor=300000)
    add(b"xnull", EntryType.CHAR, 0o600, rdev_major=1, rdev_minor=5,
        xattrs=((b"trusted.dev", b"x"),))
    add(b"fifo", EntryType.FIFO, 0o644)
    add(b"xfifo", EntryType.FIFO, 0o644, xattrs=((b"security.f", b"1"),))
    add(b"sock", EntryType.SOCKET, 0o755)
    add(b"xsock", EntryType.SOCKET, 0o755, xattrs=((b"trusted.s", b"1"),))
    for name in (b"\xffhigh", b"Zeta", b"a b", b"alpha", b"-dash"):
        file(b"bin/" + name, name)
    add(b"many", EntryType.DIRECTORY, 0o755)
    for i in range(BIG_DIR_ENTRIES):
        name = f"entry-{i:04d}-{'n' * (i % 50)}".encode()
        if i % 97 == 0:
            add(b"many/" + name, EntryType.DIRECTORY, 0o755)
        elif i % 13 == 0:
            add(b"many/" + name, EntryType.SYMLINK, 0o777, target=b"../small")
        else:
            file(b"many/" + name, f"{i}\n".encode())
    return tree


def build(tree: Tree, path: Path, **kw: object) -> Path:
    extra = tuple((k, v) for k, v in kw.items() if k not in ("compress", "block_size"))
    options = ImageOptions(epoch=EPOCH, compress=kw.get("compress"),  # type: ignore[arg-type]
                           block_size=kw.get("block_size"),  # type: ignore[arg-type]
                           extra=extra)  # type: ignore[arg-type]
    with path.open("wb") as output:
        squashfs.write(tree, output, options)
    return path


def seconds(tree: Tree) -> Tree:
    """The tree with mtimes truncated to seconds, as squashfs stores them."""
    out = Tree(replace(tree.root, mtime_ns=tree.root.mtime_ns // 10**9 * 10**9))
    for entry in tree:
        if entry.path:
            out.add(replace(entry, mtime_ns=entry.mtime_ns // 10**9 * 10**9))
    return out


LLN = re.compile(rb"^(\S{10}) (\d+)/(\d+) +(\d+(?:, *\d+)?) (\S+ \S+) squashfs-root(.*)$")


def unsquashfs_listing(image: Path) -> dict[bytes, tuple[bytes, int, int, bytes, bytes]]:
    result = subprocess.run(["unsquashfs", "-lln", str(image)], capture_output=True,
                            env={**os.environ, "TZ": "UTC"}, check=True)
    listing = {}
    for line in result.stdout.splitlines():
        match = LLN.match(line)
        assert match, line
        perms, uid, gid, size, when, name = match.groups()
        listing[name.split(b" -> ")[0].lstrip(b"/")] = (perms, int(uid), int(gid),
                                                        size.replace(b" ", b""), when)
    return listing
