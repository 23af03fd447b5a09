"""ext4 writer and reader: the plan, e2fsck, debugfs, the kernel, and determinism."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from reprobuild.trees.directory import tree_from_directory
from reprobuild.trees.tree import Content, Entry, EntryType, Tree
from tests.conftest import Unprivileged, need_tool
from tests.images.hostconditions import build_under_conditions, make_source, need_tmpfs

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


@pytest.fixture(scope="module")
def sample_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(sample_tree(big_dir=10_000), tmp_path_factory.mktemp("ext4") / "sample.img")


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


def test_reader_round_trip(sample_image: Path) -> None:
    back = ext4.read(sample_image)
    lost = back.get(b"lost+found")
    assert lost is not None and lost.mode == 0o700
    assert diff_trees(expected(sample_tree(big_dir=10_000)), without_lost_found(back)) == []


def test_user_lost_found_becomes_inode_11(tmp_path: Path) -> None:
    tree = Tree()
    tree.add(Entry(b"lost+found", EntryType.DIRECTORY, 0o755, uid=5, mtime_ns=EPOCH_NS))
    tree.add(Entry(b"lost+found/kept", EntryType.REGULAR, 0o644, mtime_ns=EPOCH_NS))
    image = build(tree, tmp_path / "lf.img")
    assert diff_trees(tree, ext4.read(image)) == []
    if shutil.which("debugfs") or os.path.exists("/usr/sbin/debugfs"):
        assert "Inode: 11 " in debugfs(image, "stat /lost+found")


# -- the reference tools ------------------------------------------------------------------
@pytest.mark.tool
def test_e2fsck_clean(sample_image: Path, tmp_path: Path) -> None:
    e2fsck_clean(sample_image)
    e2fsck_clean(build(Tree(), tmp_path / "empty.img"))
    e2fsck_clean(build(sample_tree(), tmp_path / "sized.img", size=(1 << 30) + 5 * BLOCK_SIZE))
    # A last group too small for its superblock backup (group 3) is left out, as mke2fs does.
    cut = build(sample_tree(), tmp_path / "cut.img", size=(3 * 32768 + 1) * BLOCK_SIZE)
    e2fsck_clean(cut)
    assert "Block count:              98304" in subprocess.run(
        ["dumpe2fs", "-h", str(cut)], capture_output=True, text=True).stdout


@pytest.mark.tool
def test_debugfs_spot_checks(sample_image: Path) -> None:
    ping = debugfs(sample_image, "stat /usr/bin/ping")
    assert "Mode:  04755" in ping and "Links: 3" in ping
    assert "security.capability" in debugfs(sample_image, "ea_list /usr/bin/ping")
    nvme = debugfs(sample_image, "stat /dev/nvme")
    assert re.search(r"Device major/minor number: 259:74565", nvme), nvme
    console = debugfs(sample_image, "stat /dev/console")
    assert "Device major/minor number: 05:01" in console, console
    usr = debugfs(sample_image, "stat /usr")
    assert "User: 100000   Group: 70000" in usr, usr
    frag = debugfs(sample_image, "ex /fragmented-2")
    assert re.search(r"^\s*2/\s*2\s", frag, re.M) or " 2/ 2 " in frag, frag[:500]
    shadow = debugfs(sample_image, "stat /etc/shadow")
    assert "Group:    42" in shadow and "mtime: 0x6553f0fe:ee6b27fc" in shadow, shadow
    htree = debugfs(sample_image, "htree_dump /many")
    assert "Root node dump:" in htree and "Hash Version: 1" in htree, htree[:500]
    assert "Fast link dest: \"usr/bin\"" in debugfs(sample_image, "stat /bin")
    features = debugfs(sample_image, "features")
    for feature in ("ext_attr", "dir_index", "filetype", "extent", "64bit", "flex_bg",
                    "sparse_super", "large_file", "huge_file", "dir_nlink", "extra_isize",
                    "metadata_csum"):
        assert feature in features.split(), features
    assert "has_journal" not in features


@pytest.mark.tool
def test_file_beyond_4gib(tmp_path: Path) -> None:
    size = (4 << 30) + 3 * BLOCK_SIZE + 17
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755, mtime_ns=EPOCH_NS))
    last = size // BLOCK_SIZE
    tree.add(Entry(b"huge", EntryType.REGULAR, 0o644, mtime_ns=EPOCH_NS,
                   content=pattern(size, {0, 40_000, last - 1, last})))
    image = build(tree, tmp_path / "huge.img")
    assert image.stat().st_size < 64 << 20  # holes are holes
    e2fsck_clean(image)
    assert "Size: 4294979601" in debugfs(image, "stat /huge")
    back = ext4.read(image)
    assert diff_trees(tree, without_lost_found(back)) == []


# -- the kernel -----------------------------------------------------------------------------
@pytest.mark.root
def test_kernel_mount_equals_input(sample_image: Path, mount_image: MountImage) -> None:
    mnt = mount_image(sample_image, "ext4")
    back = tree_from_directory(mnt, preserve_owner=True, preserve_mtime=True,
                               read_xattrs=True)
    lost = back.get(b"lost+found")
    assert lost is not None and lost.type is EntryType.DIRECTORY
    assert [d.display() for d in diff_trees(expected(sample_tree(big_dir=10_000)),
                                            without_lost_found(back))] == []


# -- host conditions ------------------------------------------------------------------------
BUILD_SCRIPT = textwrap.dedent("""
    import hashlib, sys
    from reprobuild.images.ext4 import image as ext4
    from reprobuild.images.registry import ImageOptions
    from reprobuild.trees.directory import tree_from_directory
    tree = tree_from_directory(sys.argv[1], epoch=EPOCH, read_xattrs=True)
    with open(sys.argv[2], "wb") as out:
        ext4.write(tree, out, ImageOptions(epoch=EPOCH))
""").replace("EPOCH", str(EPOCH))


@pytest.mark.userns
def test_host_conditions_give_identical_bytes(unprivileged: Unprivileged) -> None:
    need_tmpfs()
    images = build_under_conditions(unprivileged, "ext4", BUILD_SCRIPT, make_source)
    digests = [hashlib.sha256(image.read_bytes()).hexdigest() for image in images]
    assert digests[0] == digests[1] == digests[2]
    back = ext4.read(images[-1])
    f3 = back.get(b"d2/f3")
    assert f3 is not None and f3.content is not None
    assert f3.xattrs == ((b"user.a", b"1"), (b"user.b", b"2" * 80), (b"user.c", b"c" * 300))
    hard = back.get(b"hard")
    assert hard is not None and hard.type is EntryType.HARDLINK and hard.target == b"d1/f2"


# -- slow: 100,000 entries and a real distribution -------------------------------------------
@pytest.mark.slow
@pytest.mark.tool
def test_hundred_thousand_entry_directory(tmp_path: Path, mount_image: MountImage) -> None:
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755, mtime_ns=EPOCH_NS))
    tree.add(Entry(b"d", EntryType.DIRECTORY, 0o755, mtime_ns=EPOCH_NS))
    for i in range(100_000):  # 66,000 subdirectories: more links than an inode counts
        kind = EntryType.DIRECTORY if i < 66_000 else EntryType.REGULAR
        tree.add(Entry(b"d/file-%06d-%s" % (i, b"z" * (i % 50)), kind, 0o644,
                       mtime_ns=EPOCH_NS))
    image = build(tree, tmp_path / "wide.img")
    e2fsck_clean(image)
    assert "Links: 1 " in debugfs(image, "stat /d")  # dir_nlink
    assert "Indirect levels: 1" in debugfs(image, "htree_dump /d")[:2000]
    assert diff_trees(tree, without_lost_found(ext4.read(image))) == []
    if os.geteuid() == 0:
        mnt = mount_image(image, "ext4")
        assert len(os.listdir(mnt / "d")) == 100_000
        assert (mnt / "d" / "file-054321-zzzzzzzzzzzzzzzzzzzzz").exists()


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.tool
def test_debian_minbase(debian_minbase_tar: Path, tmp_path: Path,
                        mount_image: MountImage) -> None:
    from reprobuild.trees.load import load_tree
    from reprobuild.trees.tar_reader import Spool

    tree = load_tree(str(debian_minbase_tar), epoch=EPOCH, spool=Spool(tmp_path / "spool"))
    assert len(tree) > 5000
    image = build(tree, tmp_path / "minbase.img")
    again = build(tree, tmp_path / "again.img")
    assert image.read_bytes() == again.read_bytes()
    e2fsck_clean(image)
    assert diff_trees(tree, without_lost_found(ext4.read(image))) == []
    mnt = mount_image(image, "ext4")
    back = tree_from_directory(mnt, preserve_owner=True, preserve_mtime=True,
                               read_xattrs=True)
    assert [d.display() for d in diff_trees(tree, without_lost_found(back))] == []


@pytest.mark.tool
def test_reader_reads_mke2fs_images(tmp_path: Path) -> None:
    need_tool("mke2fs")
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    (src / "dir" / "small").write_bytes(b"small\n")
    (src / "dir" / "big").write_bytes(data(200_000, 9))
    with (src / "sparse").open("wb") as out:
        out.seek(10 * BLOCK_SIZE)
        out.write(b"end")
    for i in range(300):
        (src / "dir" / f"entry-{i:04d}").write_bytes(b"%d" % i)
    os.link(src / "dir" / "small", src / "hard")
    (src / "fast").symlink_to("dir/small")
    (src / "slow").symlink_to("d/" * 50)
    os.setxattr(src / "dir" / "small", "user.note", b"n" * 150)
    image = tmp_path / "mke2fs.img"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-d", str(src),
                    str(image), "32M"], check=True, capture_output=True,
                   env={**os.environ, "E2FSPROGS_FAKE_TIME": str(EPOCH)})
    source = tree_from_directory(src, preserve_owner=True, preserve_mtime=True,
                                 read_xattrs=True)
    back = without_lost_found(ext4.read(image))
    # mke2fs -d keeps whole seconds only.
    assert [d.display() for d in diff_trees(source, back, compare_root=False,
                                            compare_mtime=False)] == []
    for entry in back:
        if not entry.path or entry.type is EntryType.HARDLINK:
            continue  # the root gets mke2fs's own time; links carry no metadata
        original = source.get(entry.path)
        assert original is not None and entry.mtime_ns == original.mtime_ns // 10**9 * 10**9


HUGE_SCRIPT = textwrap.dedent("""
    import sys
    from reprobuild.images.ext4 import image as ext4
    from reprobuild.images.registry import ImageOptions
    from reprobuild.trees.tree import Content, Entry, EntryType, Tree
    from tests.images.test_ext4 import PatternSource
    size = (6 << 30) + 17
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755))
    # every 97th block holds data: 16,000 extents, a depth-2 extent tree, 6 GiB streamed
    blocks = frozenset(range(0, size // 4096, 97))
    tree.add(Entry(b"huge", EntryType.REGULAR, 0o644, content=Content(size,
                   PatternSource(size, blocks))))
    with open(sys.argv[1], "wb") as out:
        ext4.write(tree, out, ImageOptions(epoch=EPOCH))
    # VmHWM is this program's own peak (ru_maxrss would include the forking parent's).
    with open("/proc/self/status") as status:
        print(next(line for line in status if line.startswith("VmHWM:")).split()[1])
""").replace("EPOCH", str(EPOCH))


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_file_size(tmp_path: Path) -> None:
    image = tmp_path / "huge.img"
    result = subprocess.run([sys.executable, "-c", HUGE_SCRIPT, str(image)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    peak_kib = int(result.stdout.split()[-1])
    assert peak_kib < 300 * 1024, f"peak {peak_kib} KiB"
    assert image.stat().st_size < 100 << 20
    if shutil.which("e2fsck") or os.path.exists("/usr/sbin/e2fsck"):
        e2fsck_clean(image)
