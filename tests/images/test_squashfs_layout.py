"""squashfs writer and reader in Python: the plan, refusals, round trips, the superblock,
sizes, duplicates and zero blocks, inode kinds, threads, identity, content errors."""

from __future__ import annotations

import gc
import io
import os
import threading
import weakref
import zlib
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

import pytest

from reprobuild.errors import ImageError
from reprobuild.images.registry import ImageOptions
from reprobuild.images.squashfs import compressors
from reprobuild.images.squashfs import image as squashfs
from reprobuild.images.squashfs.ondisk import (
    SQUASHFS_DIR_COUNT,
    SQUASHFS_DIR_TYPE,
    SQUASHFS_LDIR_TYPE,
    SQUASHFS_LREG_TYPE,
    SQUASHFS_REG_TYPE,
    SQUASHFS_SUPER_BLOCK,
    SQUASHFS_SYMLINK_TYPE,
    decode_rdev,
    encode_rdev,
)
from reprobuild.images.squashfs.read import inspect_image
from reprobuild.trees.diff import diff_trees
from reprobuild.trees.tree import Content, Entry, EntryType, Tree
from tests.images.squashfs_trees import (
    BIG_DIR_ENTRIES,
    COMPRESSORS,
    EPOCH,
    build,
    pseudo_random,
    sample_tree,
    seconds,
)


# -- pure parts ---------------------------------------------------------------------------
def test_rdev_encoding_round_trips() -> None:
    for major, minor in ((1, 3), (259, 300000), (4095, 0xFFFFF), (0, 0)):
        assert decode_rdev(encode_rdev(major, minor)) == (major, minor)


def test_plan_orders_inodes_children_first_and_root_last() -> None:
    tree = sample_tree()
    plan = squashfs.plan(tree, ImageOptions(epoch=EPOCH))
    assert [i.number for i in plan.inodes] == list(range(1, len(plan.inodes) + 1))
    root = plan.inodes[plan.root_index]
    assert root.entry.path == b"" and root.parent_number == len(plan.inodes) + 1
    # One inode per hardlink group; nlink counts its paths, directories 2 + subdirs.
    assert len(plan.inodes) == len(tree) - 2
    by_path = {i.entry.path: i for i in plan.inodes}
    assert by_path[b"bin/hl"].nlink == 3
    assert by_path[b"many"].nlink == 2 + len(range(0, BIG_DIR_ENTRIES, 97))
    position = {s: n for n, s in enumerate(plan.steps)}
    for number, directory in enumerate(plan.directories):
        names = [name for name, _ in directory.children]
        assert names == sorted(names)
        for _, child in directory.children:
            assert position[("inode", child)] < position[("dir", number)]
        assert position[("dir", number)] < position[("inode", directory.inode_index)]
    assert list(plan.ids) == sorted({0, 6, 1000, 65534, 1234567, 7654321})
    sizes = {f.entry.path: f for f in plan.files}
    assert sizes[b"exact"].full_blocks == 1
    assert sizes[b"tail"].full_blocks == 3 and sizes[b"tail"].may_duplicate
    assert not sizes[b"small"].may_duplicate


def test_plan_columns_name_each_inode_and_its_parent() -> None:
    """The plan's columns (no object per entry) agree with the tree they were made of."""
    tree = sample_tree()
    plan = squashfs.plan(tree, ImageOptions(epoch=EPOCH))
    number_of = {entry.path: i + 1 for i, entry in enumerate(plan.entries)}
    listed = 0
    for n, directory in enumerate(plan.directories):
        path = plan.entries[directory.inode_index].path
        assert [name for name, _ in directory.children] == [
            child.name for child in tree.children(path)]
        for name, child in directory.children:
            entry = tree.resolve(tree.get(path + b"/" + name if path else name) or tree.root)
            assert plan.entries[child] is entry
            if entry.type is EntryType.DIRECTORY:
                assert plan.inode(child).parent_number == directory.inode_index + 1
        listed += len(directory.children)
        # The listing follows its children's inodes and precedes its own.
        assert max((c for _, c in directory.children), default=-1) < plan.listing_after[n]
        assert plan.listing_after[n] <= directory.inode_index
    assert listed == len(tree) - 1  # every path but the root, hardlinks included
    assert b"etc/hl" not in number_of and b"hl" not in number_of  # links share bin/hl's
    for index, entry in enumerate(plan.file_entries):
        inode = plan.inode(number_of[entry.path] - 1)
        assert inode.file_index == index and plan.file(index).size == entry.size
    symlink = plan.inode(number_of[b"link"] - 1)
    assert symlink.file_index is None and symlink.xattr_index is None
    assert plan.inode(number_of[b"xattrs"] - 1).xattr_index is not None


def test_rejects_what_squashfs_cannot_store(tmp_path: Path) -> None:
    tree = Tree()
    tree.add(Entry(b"f", EntryType.REGULAR, 0o644, xattrs=((b"system.posix_acl_access", b""),)))
    with pytest.raises(ImageError, match="prefix"):
        build(tree, tmp_path / "a.sqfs")
    for bad, match in (
        (Entry(b"l", EntryType.SYMLINK, 0o777, target=b"x" * 4097), "symlink target"),
        (Entry(b"c", EntryType.CHAR, 0o600, rdev_major=4096), "does not fit"),
        (Entry(b"b", EntryType.BLOCK, 0o600, rdev_minor=1 << 20), "does not fit"),
    ):
        odd = Tree()
        odd.add(bad)
        with pytest.raises(ImageError, match=match):
            build(odd, tmp_path / "odd.sqfs")
    with pytest.raises(ImageError, match="block size"):
        build(Tree(), tmp_path / "b.sqfs", block_size=3000)
    with pytest.raises(ImageError, match="compressor"):
        build(Tree(), tmp_path / "c.sqfs", compress="brotli")


@pytest.mark.parametrize("compress", COMPRESSORS)
def test_reader_round_trip(tmp_path: Path, compress: str) -> None:
    tree = sample_tree(4096)
    image = build(tree, tmp_path / "img.sqfs", compress=compress, block_size=4096)
    assert diff_trees(seconds(tree), squashfs.read(image)) == []


def test_reader_reports_corrupt_images(tmp_path: Path) -> None:
    image = build(sample_tree(4096), tmp_path / "img.sqfs", block_size=4096, compress="none")
    data = bytearray(image.read_bytes())
    bad = tmp_path / "bad.sqfs"
    bad.write_bytes(b"not squashfs" + bytes(100))
    with pytest.raises(ImageError, match="not a squashfs"):
        squashfs.read(bad)
    # The id count says more ids than the table holds.
    data[26:28] = (999).to_bytes(2, "little")
    bad.write_bytes(bytes(data))
    with pytest.raises(ImageError):
        squashfs.read(bad)


def test_superblock_and_structure(tmp_path: Path) -> None:
    tree = sample_tree()
    image = build(tree, tmp_path / "img.sqfs", compress="gzip", exportable=True)
    data = image.read_bytes()
    fields = SQUASHFS_SUPER_BLOCK.unpack_from(data)
    assert fields[0] == 0x73717368 and fields[2] == EPOCH and fields[3] == 131072
    assert fields[9:11] == (4, 0)
    assert fields[12] <= len(data) and len(data) % 4096 == 0
    assert fields[18] != 0xFFFFFFFFFFFFFFFF  # export table written on request


def test_size_pads_the_image(tmp_path: Path) -> None:
    tree = sample_tree(4096)
    plain = build(tree, tmp_path / "plain.sqfs", block_size=4096).read_bytes()
    options = ImageOptions(epoch=EPOCH, block_size=4096, size=4 << 20)
    with (tmp_path / "padded.sqfs").open("wb") as output:
        squashfs.write(tree, output, options)
    padded = (tmp_path / "padded.sqfs").read_bytes()
    assert len(padded) == 4 << 20 and padded[:len(plain)] == plain
    assert padded[len(plain):] == bytes(len(padded) - len(plain))
    with pytest.raises(ImageError, match="more than"), (tmp_path / "small").open("wb") as out:
        squashfs.write(tree, out, replace(options, size=8192))


def test_duplicates_and_zero_blocks_take_no_space(tmp_path: Path) -> None:
    data = pseudo_random("dup", 3 * 131072 + 5000)
    tree = Tree()
    for name in (b"a", b"b", b"c/d"):
        if b"/" in name:
            tree.add(Entry(b"c", EntryType.DIRECTORY, 0o755))
        tree.add(Entry(name, EntryType.REGULAR, 0o644, content=Content.from_bytes(data)))
    tree.add(Entry(b"zeros", EntryType.REGULAR, 0o644,
                   content=Content.from_bytes(bytes(64 * 131072))))
    image = build(tree, tmp_path / "img.sqfs", compress="none")
    # One copy of the data (stored uncompressed), nothing for the zeros, little metadata.
    assert len(data) < image.stat().st_size <= len(data) + 8192
    assert diff_trees(tree, squashfs.read(image)) == []


@pytest.mark.parametrize("block_size", [4096, 131072])
def test_on_disk_inode_kinds(tmp_path: Path, block_size: int) -> None:
    tree = sample_tree(block_size)
    image = build(tree, tmp_path / "img.sqfs", block_size=block_size)
    layout = inspect_image(image)
    # The big directory spans metadata blocks: extended inode with an index, and more
    # headers than 256-entry runs alone would need.
    kind, headers = layout[b"many"]
    assert kind == SQUASHFS_LDIR_TYPE
    assert headers > BIG_DIR_ENTRIES // SQUASHFS_DIR_COUNT + 1
    assert layout[b"bin"] == (SQUASHFS_DIR_TYPE, 1)
    assert layout[b"etc"][0] == SQUASHFS_LDIR_TYPE  # xattrs
    assert layout[b"small"][0] == SQUASHFS_REG_TYPE
    for extended in (b"sparse", b"xattrs", b"bin/hl", b"hl"):
        assert layout[extended][0] == SQUASHFS_LREG_TYPE, extended
    assert layout[b"etc/xlink"][0] == SQUASHFS_SYMLINK_TYPE + 7
    assert layout[b"link"][0] == SQUASHFS_SYMLINK_TYPE
    assert layout[b"xnull"][0] == layout[b"null"][0] + 7
    assert layout[b"xfifo"][0] == layout[b"fifo"][0] + 7
    assert layout[b"xsock"][0] == layout[b"sock"][0] + 7


def test_threads_do_not_change_bytes(tmp_path: Path) -> None:
    tree = sample_tree(4096)
    one = build(tree, tmp_path / "one.sqfs", block_size=4096, threads=1).read_bytes()
    four = build(tree, tmp_path / "four.sqfs", block_size=4096, threads=4).read_bytes()
    assert one == four


def test_kept_deflate_streams_give_zlib_compress_bytes(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """Each thread's kept stream, reset per block, gives zlib.compress's bytes at every
    level, after a level change, and for data larger than a squashfs block; a stream is
    freed when its thread ends. (The ctypes path: the one taken without _blockpack.)"""
    monkeypatch.setattr(compressors, "_blockpack", lambda: None)
    assert compressors._libz() is not None, "the ctypes path did not load: nothing tested"
    samples = [b"", b"a", os.urandom(5000), bytes(131072), b"squash " * 20000,
               os.urandom(70000) + b"x" * 70000, b"y" * (compressors.DEFLATE_MAX_INPUT + 9)]
    failures: list[str] = []
    made: list[weakref.ref[compressors._Deflater]] = []
    original = compressors._Deflater.__init__

    def counting(self: compressors._Deflater, *args: object) -> None:
        original(self, *args)  # type: ignore[arg-type]
        made.append(weakref.ref(self))

    def work(levels: list[int]) -> None:
        for level in levels:
            for data in samples:
                if compressors.deflate(data, level) != zlib.compress(data, level):
                    failures.append(f"level {level}, {len(data)} bytes")

    monkeypatch.setattr(compressors._Deflater, "__init__", counting)
    threads = [threading.Thread(target=work, args=(levels,))
               for levels in ([9, 9, 1, 9], [6, 9], [1])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert len(made) == 6  # one per thread and change of level: 3 + 2 + 1
    gc.collect()
    assert [ref() for ref in made] == [None] * 6  # released with their threads


def test_identity_names_compressor_and_library() -> None:
    ident = squashfs.identity(ImageOptions(epoch=0))
    assert ident["compressor"] == "zstd" and ident["library"].startswith("libzstd ")
    assert squashfs.identity(ImageOptions(epoch=0, compress="gzip"))["library"].startswith(
        "zlib ")
    assert squashfs.identity(ImageOptions(epoch=0, compress="xz"))["library"].startswith(
        "liblzma ")
    assert squashfs.identity(ImageOptions(epoch=0, compress="none")) == {"compressor": "none"}


class LyingSource:
    def open(self) -> BinaryIO:
        return io.BytesIO(b"only ten b")


@pytest.mark.parametrize("copies", [1, 2])
def test_content_that_changed_size_is_an_error(tmp_path: Path, copies: int) -> None:
    tree = Tree()
    for name in (b"a", b"b")[:copies]:  # two copies may duplicate: the hashing path
        tree.add(Entry(name, EntryType.REGULAR, 0o644, content=Content(11, LyingSource())))
    with pytest.raises(ImageError, match="expected 11"):
        build(tree, tmp_path / "img.sqfs")


@pytest.mark.parametrize("tail_fragments", [True, False])
def test_tables_built_during_the_data_are_those_built_after_it(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tail_fragments: bool) -> None:
    """The inode and directory tables are packed as files' data is written; emitting
    every step only once all the data is written gives the same image."""
    from reprobuild.images.squashfs import tables, write

    tree = sample_tree(4096)
    emitted_early: list[int] = []
    finish = tables.TableBuilder.finish

    def counting_finish(self: tables.TableBuilder) -> tuple[tables.InodeTable, bytearray]:
        emitted_early.append(self.inodes.uncompressed_position)
        return finish(self)

    monkeypatch.setattr(tables.TableBuilder, "finish", counting_finish)
    during = build(tree, tmp_path / "during.sqfs", block_size=4096,
                   tail_fragments=tail_fragments).read_bytes()
    assert emitted_early and emitted_early[0] > 0  # inodes were packed before the end
    original = write.write_data

    def at_the_end(*args: object) -> object:
        return original(*args[:-1], lambda files_written: None)  # type: ignore[arg-type]

    monkeypatch.setattr(write, "write_data", at_the_end)
    after = build(tree, tmp_path / "after.sqfs", block_size=4096,
                  tail_fragments=tail_fragments).read_bytes()
    assert during == after
