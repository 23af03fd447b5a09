"""ext4 units and the plan: checksums, encodings, inode numbering, sizes, determinism,
holes and refusals."""

from __future__ import annotations

import os
import re
import shutil
import struct
import uuid
from pathlib import Path

import pytest

from reprobuild.errors import ImageError
from reprobuild.images.ext4 import image as ext4
from reprobuild.images.ext4.layout import plan
from reprobuild.images.ext4.ondisk import (
    BLOCK_SIZE,
    DX_HASH_HALF_MD4,
    DX_HASH_TEA,
    EXTENTS_FL,
    INDEX_FL,
    LOST_FOUND_INO,
    crc32c_raw,
    decode_device,
    decode_time,
    dir_hash,
    encode_device,
    encode_time,
)
from reprobuild.images.registry import ImageOptions
from reprobuild.trees.diff import diff_trees
from reprobuild.trees.tree import Content, Entry, EntryType, Tree
from tests.images.ext4_trees import (
    EPOCH,
    EPOCH_NS,
    UUID,
    PatternSource,
    build,
    debugfs,
    expected,
    pattern,
    sample_tree,
    without_lost_found,
)


# -- units and the plan ---------------------------------------------------------------------
def test_crc32c_follows_ext4_conventions() -> None:
    # ext2fs_crc32c_le(~0, "123456789") without the final inversion: ~0xE3069283.
    assert crc32c_raw(0xFFFFFFFF, b"123456789") == 0xE3069283 ^ 0xFFFFFFFF


def test_time_and_device_encodings_round_trip() -> None:
    for ns in (0, 1, EPOCH_NS + 999_999_999, -1, -(2**31) * 10**9, (2**33 + 5) * 10**9 + 3):
        assert decode_time(*encode_time(ns)) == ns
    assert encode_device(5, 1) == (0x501, 0)
    assert encode_device(259, 0x12345)[0] == 0
    for major, minor in ((5, 1), (259, 0x12345), (4095, 0xFFFFF), (0, 256)):
        assert decode_device(*encode_device(major, minor)) == (major, minor)


@pytest.mark.tool
def test_dir_hash_matches_debugfs(tmp_path: Path) -> None:
    image = build(sample_tree(), tmp_path / "h.img")
    seed = uuid.UUID(UUID).bytes
    words = struct.unpack("<4I", seed)
    for name in ("hello", "a", "x" * 70, "entry-000123-xxxxx", "\u00e9t\u00e9"):
        # debugfs takes the unsigned variants by number: half_md4_unsigned 4, tea_unsigned 5.
        for version, label in ((DX_HASH_HALF_MD4, "4"), (DX_HASH_TEA, "5")):
            out = debugfs(image, f"dx_hash -h {label} -s {UUID} {name}")
            found = re.search(r"is 0x([0-9a-f]+) \(minor 0x([0-9a-f]+)\)", out)
            assert found, out
            major, minor = dir_hash(name.encode(), version, words)
            assert (major, minor) == (int(found[1], 16), int(found[2], 16)), (name, label)


def test_plan_numbers_inodes_in_canonical_order_and_maps_holes() -> None:
    tree = sample_tree(big_dir=600)
    layout = plan(tree, ImageOptions(epoch=EPOCH))
    inos = {node.entry.path: node.ino for node in layout.inodes}
    assert inos[b""] == 2 and inos[b"lost+found"] == LOST_FOUND_INO
    ordered = [e.path for e in tree if e.path and e.type is not EntryType.HARDLINK]
    assert [inos[p] for p in ordered] == list(range(12, 12 + len(ordered)))
    by_path = {node.entry.path: node for node in layout.inodes}
    assert by_path[b"usr/bin/ping"].links == 3
    assert by_path[b"many"].flags == EXTENTS_FL | INDEX_FL
    assert by_path[b"etc"].flags == EXTENTS_FL and by_path[b"etc"].links == 2
    assert by_path[b""].links == 2 + 5  # etc usr dev many lost+found
    assert by_path[b"usr"].links == 2 + 2
    assert by_path[b"bin"].flags == 0 and by_path[b"bin"].i_block.startswith(b"usr/bin\0")
    assert by_path[b"link-59"].flags == 0 and by_path[b"link-60"].flags == EXTENTS_FL
    files = {ino: extents for ino, _, extents in layout.files}
    holes = files[by_path[b"holes"].ino]
    assert [(e.logical, e.length) for e in holes] == [(0, 2), (5, 1), (19, 2)]
    assert files[by_path[b"all-zero"].ino] == ()
    assert by_path[b"all-zero"].blocks == 0
    assert len(files[by_path[b"fragmented-2"].ino]) == 1500
    # 1500 extents: 5 leaves of <= 340, then one index block: depth 2.
    assert struct.unpack_from("<HHHH", by_path[b"fragmented-2"].i_block) == (0xF30A, 1, 4, 2)
    assert by_path[b"fragmented-2"].blocks == 1500 + 5 + 1
    assert struct.unpack_from("<HHHH", by_path[b"fragmented-1"].i_block) == (0xF30A, 3, 4, 1)


def test_minimum_size_and_given_sizes(tmp_path: Path) -> None:
    tree = sample_tree()
    minimal = build(tree, tmp_path / "min.img")
    size = minimal.stat().st_size
    assert size % BLOCK_SIZE == 0
    same = build(tree, tmp_path / "same.img", size=size)
    assert same.read_bytes() == minimal.read_bytes()
    with pytest.raises(ImageError, match=rf"at least {size} bytes"):
        build(tree, tmp_path / "small.img", size=size - BLOCK_SIZE)
    bigger = build(tree, tmp_path / "big.img", size=300 << 20)
    assert bigger.stat().st_size == 300 << 20
    odd = build(tree, tmp_path / "odd.img", size=(200 << 20) + 1000)
    assert odd.stat().st_size == (200 << 20) + 1000
    for image in (minimal, bigger, odd):
        assert without_lost_found(ext4.read(image)) is not None
        assert diff_trees(expected(tree), without_lost_found(ext4.read(image))) == []


def test_deterministic_and_ids_from_content(tmp_path: Path) -> None:
    a = build(sample_tree(), tmp_path / "a.img").read_bytes()
    b = build(sample_tree(), tmp_path / "b.img").read_bytes()
    assert a == b
    changed = sample_tree()
    changed.replace_entry(Entry(b"etc/empty", EntryType.REGULAR, 0o644,
                                mtime_ns=EPOCH_NS - 1_000_000_001,
                                content=Content.from_bytes(b"!")))
    c = build(changed, tmp_path / "c.img").read_bytes()

    def uuid_of(img: bytes) -> bytes:
        return img[1024 + 104: 1024 + 120]

    def seed_of(img: bytes) -> bytes:
        return img[1024 + 236: 1024 + 252]

    assert uuid_of(a) != uuid_of(c) and seed_of(a) != seed_of(c)
    given = build(sample_tree(), tmp_path / "d.img", uuid=UUID, label="root",
                  extra=(("hash_seed", UUID), ("hash_version", "tea")))
    raw = given.read_bytes()
    assert uuid_of(raw) == uuid.UUID(UUID).bytes == seed_of(raw)
    assert raw[1024 + 120: 1024 + 124] == b"root" and raw[1024 + 252] == DX_HASH_TEA
    assert struct.unpack_from("<I", raw, 1024 + 352)[0] & 2  # unsigned hash, explicitly
    assert struct.unpack_from("<I", raw, 1024 + 48)[0] == EPOCH  # s_wtime from the epoch


def test_holes_do_not_depend_on_how_content_is_chunked(tmp_path: Path) -> None:
    images = []
    for read_size in (1 << 20, BLOCK_SIZE, 1000, 3 * BLOCK_SIZE + 1):
        tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755))
        # data, a hole, data, then a zero short last block: a hole too
        tree.add(Entry(b"f", EntryType.REGULAR, 0o644,
                       content=pattern(5 * BLOCK_SIZE + 100, {0, 1, 3}, read_size)))
        tree.add(Entry(b"g", EntryType.REGULAR, 0o644,
                       content=pattern(2 * BLOCK_SIZE + 100, {0, 1}, read_size)))
        images.append(build(tree, tmp_path / f"{read_size}.img").read_bytes())
    assert len(set(images)) == 1
    layout = plan(tree, ImageOptions(epoch=EPOCH))
    extents = {ino: [(e.logical, e.length) for e in ext] for ino, _, ext in layout.files}
    assert list(extents.values()) == [[(0, 2), (3, 1)], [(0, 2)]]


def test_refusals(tmp_path: Path) -> None:
    tree = Tree()
    tree.add(Entry(b"lost+found", EntryType.REGULAR, 0o644))
    with pytest.raises(ImageError, match="lost\\+found"):
        build(tree, tmp_path / "x.img")
    tree = Tree()
    tree.add(Entry(b"f", EntryType.REGULAR, 0o644, xattrs=((b"user.x", b"v" * 5000),)))
    with pytest.raises(ImageError, match="xattrs need"):
        build(tree, tmp_path / "y.img")
    with pytest.raises(ImageError, match="block size"):
        build(Tree(), tmp_path / "z.img", block_size=1024)
    tree = Tree()
    tree.add(Entry(b"f", EntryType.REGULAR, 0o644, content=Content(10, PatternSource(9,
                                                                                    frozenset()))))
    with pytest.raises(ImageError, match="content is 9 bytes"):
        build(tree, tmp_path / "w.img")


def test_user_lost_found_becomes_inode_11(tmp_path: Path) -> None:
    tree = Tree()
    tree.add(Entry(b"lost+found", EntryType.DIRECTORY, 0o755, uid=5, mtime_ns=EPOCH_NS))
    tree.add(Entry(b"lost+found/kept", EntryType.REGULAR, 0o644, mtime_ns=EPOCH_NS))
    image = build(tree, tmp_path / "lf.img")
    assert diff_trees(tree, ext4.read(image)) == []
    if shutil.which("debugfs") or os.path.exists("/usr/sbin/debugfs"):
        assert "Inode: 11 " in debugfs(image, "stat /lost+found")
