"""squashfs images checked by unsquashfs and the kernel, and our reader on mksquashfs's
images: every compressor, corner cases, the export table, far hardlinks, 4 GiB files."""

from __future__ import annotations

import io
import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest

from reprobuild.images.squashfs import image as squashfs
from reprobuild.images.squashfs.ondisk import (
    SQUASHFS_LREG_TYPE,
    encode_rdev,
)
from reprobuild.images.squashfs.read import inspect_image
from reprobuild.trees.diff import diff_trees
from reprobuild.trees.directory import tree_from_directory
from reprobuild.trees.tree import Content, Entry, EntryType, Tree
from tests.conftest import need_tool
from tests.images.hostconditions import write_tree
from tests.images.squashfs_trees import (
    BIG_DIR_ENTRIES,
    COMPRESSORS,
    build,
    sample_tree,
    seconds,
    text,
    unsquashfs_listing,
)


@pytest.mark.tool
@pytest.mark.parametrize("compress", COMPRESSORS)
def test_unsquashfs_lists_the_tree(tmp_path: Path, compress: str) -> None:
    need_tool("unsquashfs")
    tree = sample_tree()
    listing = unsquashfs_listing(build(tree, tmp_path / "img.sqfs", compress=compress))
    assert len(listing) == len(tree)
    for entry in tree:
        perms, uid, gid, size, _ = listing[entry.path]
        inode = tree.resolve(entry)
        assert perms == stat.filemode(inode.st_mode).encode(), entry.path
        assert (uid, gid) == (inode.uid, inode.gid), entry.path
        if inode.type is EntryType.REGULAR:
            assert int(size) == inode.size
        elif inode.type in (EntryType.CHAR, EntryType.BLOCK):
            # unsquashfs lists the raw 32-bit number as (rdev >> 8, rdev & 0xff).
            rdev = encode_rdev(inode.rdev_major, inode.rdev_minor)
            assert size == f"{rdev >> 8},{rdev & 0xFF}".encode()
        elif inode.type is EntryType.SYMLINK:
            assert int(size) == len(inode.target or b"")


@pytest.mark.tool
@pytest.mark.root
@pytest.mark.parametrize("compress", ["zstd", "gzip", "none"])
def test_unsquashfs_extracts_the_tree(tmp_path: Path, compress: str) -> None:
    need_tool("unsquashfs")
    tree = sample_tree()
    image = build(tree, tmp_path / "img.sqfs", compress=compress)
    out = tmp_path / "out"
    subprocess.run(["unsquashfs", "-q", "-n", "-d", str(out), str(image)], check=True,
                   capture_output=True)
    back = tree_from_directory(out, preserve_owner=True, preserve_mtime=True, read_xattrs=True)
    # unsquashfs does not set the times of symlinks it makes.
    differences = [d for d in diff_trees(seconds(tree), back)
                   if not (d.kind == "mtime" and (tree.get(d.path) or tree.root).type
                           is EntryType.SYMLINK)]
    assert differences == []


@pytest.mark.root
@pytest.mark.parametrize("compress", COMPRESSORS)
@pytest.mark.parametrize("block_size", [4096, 131072])
def test_kernel_mounts_the_image(tmp_path: Path, mount_image: object, compress: str,
                                 block_size: int) -> None:
    tree = sample_tree(block_size)
    image = build(tree, tmp_path / "img.sqfs", compress=compress, block_size=block_size,
                  exportable=block_size == 4096)
    mnt = mount_image(image, "squashfs")  # type: ignore[operator]
    back = tree_from_directory(mnt, preserve_owner=True, preserve_mtime=True, read_xattrs=True)
    assert diff_trees(seconds(tree), back) == []
    assert (mnt / "many").stat().st_nlink == 2 + len(range(0, BIG_DIR_ENTRIES, 97))
    # Lookups by name go through the directory index of the big directory.
    for i in (0, 255, 256, 257, 511, 600, BIG_DIR_ENTRIES - 1):
        name = f"entry-{i:04d}-{'n' * (i % 50)}"
        assert os.path.lexists(mnt / "many" / name), name
        assert not os.path.lexists(mnt / "many" / (name + "x"))


def odd_trees() -> dict[str, tuple[Tree, dict[str, object]]]:
    """Corner cases: empty trees, no fragments, many ids and xattr sets, options."""
    empty = Tree()
    only_empty = Tree(Entry(b"", EntryType.DIRECTORY, 0o700, uid=5, gid=6))
    only_empty.add(Entry(b"e", EntryType.REGULAR, 0o644))
    only_empty.add(Entry(b"d", EntryType.DIRECTORY, 0o755))
    many = Tree()
    for i in range(1100):
        # > 2048 ids and > 512 xattr sets: several id and xattr id metadata blocks.
        many.add(Entry(f"f{i:04d}".encode(), EntryType.REGULAR, 0o644, uid=i,
                       gid=100_000 + i, mtime_ns=i * 10**9,
                       xattrs=((b"user.i", str(i).encode() * 20),),
                       content=Content.from_bytes(text(str(i), 3000 + i))))
    blocks = sample_tree(4096)
    return {
        "empty": (empty, {}),
        "only-empty-files": (only_empty, {"compress": "gzip"}),
        "many-ids-and-xattrs": (many, {"compress": "xz"}),
        "no-tail-fragments": (blocks, {"block_size": 4096, "tail_fragments": False}),
        "levels": (blocks, {"block_size": 4096, "compress": "gzip",
                            "compression_level": 6}),
        "zstd-level": (blocks, {"block_size": 4096, "compression_level": 3,
                                "probe": False}),
    }


@pytest.mark.tool
@pytest.mark.root
@pytest.mark.parametrize("case", sorted(odd_trees()))
def test_corner_cases_unsquashfs_kernel_reader(tmp_path: Path, mount_image: object,
                                                case: str) -> None:
    need_tool("unsquashfs")
    tree, kw = odd_trees()[case]
    image = build(tree, tmp_path / "img.sqfs", **kw)
    assert len(unsquashfs_listing(image)) == len(tree)
    out = tmp_path / "out"
    subprocess.run(["unsquashfs", "-q", "-n", "-d", str(out), str(image)], check=True,
                   capture_output=True)
    mnt = mount_image(image, "squashfs")  # type: ignore[operator]
    for where in (mnt, out):
        back = tree_from_directory(where, preserve_owner=True, preserve_mtime=True,
                                   read_xattrs=True)
        differences = [d for d in diff_trees(seconds(tree), back)
                       if not (where == out and d.kind == "mtime"
                               and (tree.get(d.path) or tree.root).type is EntryType.SYMLINK)]
        assert differences == [], where
    assert diff_trees(seconds(tree), squashfs.read(image)) == []


@pytest.mark.tool
def test_export_table_on_request(tmp_path: Path) -> None:
    need_tool("unsquashfs")
    tree = sample_tree(4096)
    for exportable, expect in ((True, b"Filesystem is exportable"),
                               (False, b"Filesystem is not exportable")):
        image = build(tree, tmp_path / f"{exportable}.sqfs", block_size=4096,
                      exportable=exportable)
        info = subprocess.run(["unsquashfs", "-s", str(image)], capture_output=True,
                              check=True).stdout
        assert expect in info


@pytest.mark.root
def test_far_hardlinks_need_new_headers(tmp_path: Path, mount_image: object) -> None:
    """Inode numbers more than 32767 apart cannot share a directory header."""
    tree = Tree()
    tree.add(Entry(b"a", EntryType.DIRECTORY, 0o755))
    tree.add(Entry(b"z", EntryType.DIRECTORY, 0o755))
    for i in range(33_000):
        tree.add(Entry(b"a/f%05d" % i, EntryType.FIFO, 0o644))
    tree.add(Entry(b"a/0target", EntryType.REGULAR, 0o644, content=Content.from_bytes(b"t")))
    tree.add(Entry(b"z/0link", EntryType.HARDLINK, 0o644, target=b"a/0target"))
    tree.add(Entry(b"z/1file", EntryType.REGULAR, 0o644, content=Content.from_bytes(b"f")))
    image = build(tree, tmp_path / "img.sqfs", compress="lz4")
    assert inspect_image(image)[b"z"][1] == 2
    assert diff_trees(tree, squashfs.read(image)) == []
    mnt = mount_image(image, "squashfs")  # type: ignore[operator]
    assert (mnt / "z" / "0link").read_bytes() == b"t"
    assert (mnt / "z" / "0link").stat().st_ino == (mnt / "a" / "0target").stat().st_ino
    assert (mnt / "z" / "1file").read_bytes() == b"f"
    assert len(os.listdir(mnt / "a")) == 33_001


class _Zeros(io.RawIOBase):
    """A stream of ``size`` zero bytes, then a short marker (for huge sparse files)."""

    def __init__(self, size: int, tail: bytes) -> None:
        self.left = size
        self.tail = tail

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self.left > 0:
            n = min(len(buffer), self.left)
            buffer[:n] = bytes(n)
            self.left -= n
            return n
        n = min(len(buffer), len(self.tail))
        buffer[:n] = self.tail[:n]
        self.tail = self.tail[n:]
        return n


@dataclass(frozen=True)
class ZerosSource:
    size: int
    tail: bytes

    def open(self) -> BinaryIO:
        return io.BufferedReader(_Zeros(self.size, self.tail), buffer_size=1 << 20)


@pytest.mark.root
@pytest.mark.tool
def test_file_larger_than_4_gib(tmp_path: Path, mount_image: object) -> None:
    need_tool("unsquashfs")
    size = (4 << 30) + 4096
    tree = Tree()
    tree.add(Entry(b"huge", EntryType.REGULAR, 0o644,
                   content=Content(size + 5, ZerosSource(size, b"hello"))))
    image = build(tree, tmp_path / "img.sqfs", compress="gzip")
    assert image.stat().st_size < 1 << 20  # every full block is sparse
    assert inspect_image(image)[b"huge"][0] == SQUASHFS_LREG_TYPE
    assert unsquashfs_listing(image)[b"huge"][3] == str(size + 5).encode()
    mnt = mount_image(image, "squashfs")  # type: ignore[operator]
    with (mnt / "huge").open("rb") as f:
        assert os.fstat(f.fileno()).st_size == size + 5
        f.seek(size - 3)
        assert f.read() == b"\0\0\0hello"


@pytest.mark.tool
@pytest.mark.root
@pytest.mark.parametrize("compress", ["gzip", "xz", "lz4", "zstd"])
def test_reader_reads_mksquashfs_images(tmp_path: Path, compress: str) -> None:
    """The reader against the reference writer: out-of-line xattr values, tail blocks."""
    need_tool("mksquashfs")
    tree = sample_tree()
    root = tmp_path / "root"
    write_tree(tree, root)
    image = tmp_path / "ref.sqfs"
    subprocess.run(["mksquashfs", str(root), str(image), "-comp", compress, "-noappend",
                    "-quiet", "-no-progress", "-processors", "1"], check=True,
                   capture_output=True)
    source = tree_from_directory(root, preserve_owner=True, preserve_mtime=True,
                                 read_xattrs=True)
    assert diff_trees(seconds(source), squashfs.read(image)) == []
