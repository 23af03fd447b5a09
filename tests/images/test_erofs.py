"""EROFS writer and reader: the plan, fsck.erofs, dump.erofs, the kernel, and determinism."""

from __future__ import annotations

import io
import os
import re
import shutil
import struct
import subprocess
import textwrap
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reprobuild.errors import ImageError
from reprobuild.images.erofs import image as erofs
from reprobuild.images.erofs.layout import SHARE_THRESHOLD, dir_blocks, plan
from reprobuild.images.erofs.ondisk import BLOCK_SIZE, INODE_FLAT_INLINE, INODE_FLAT_PLAIN
from reprobuild.images.registry import ImageOptions
from reprobuild.trees.diff import diff_trees
from reprobuild.trees.directory import tree_from_directory
from reprobuild.trees.tree import Content, Entry, EntryType, Tree
from tests.conftest import Unprivileged, need_tool
from tests.images.hostconditions import (
    CONDITIONS,
    Condition,
    build_under_conditions,
    make_source,
    need_tmpfs,
)

EPOCH = 1_700_000_000
EPOCH_NS = EPOCH * 1_000_000_000
UUID = "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"
MountImage = Callable[[Path, str], Path]

# A valid POSIX ACL (version 2): user::rw-, user:1000:r--, group::r--, mask::r--, other::r--
ACL = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, ident)
    for tag, perm, ident in ((1, 6, 0xFFFFFFFF), (2, 4, 1000), (4, 4, 0xFFFFFFFF),
                             (0x10, 4, 0xFFFFFFFF), (0x20, 4, 0xFFFFFFFF)))


def data(n: int, seed: int) -> bytes:
    return bytes((i * 131 + seed * 7 + (i >> 8)) & 0xFF for i in range(n))


def sample_tree() -> Tree:
    """Every entry type, hardlinks, inline and shared xattrs, a directory spanning many
    blocks, tails that fit inline and tails that do not, extended inodes."""
    shared = ((b"trusted.shared", b"same value for many inodes"),)
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755, mtime_ns=EPOCH_NS,
                      xattrs=((b"user.root", b"r"),)))

    def add(path: bytes, kind: EntryType, mode: int = 0o644, **kw: Any) -> None:
        kw.setdefault("mtime_ns", EPOCH_NS)
        tree.add(Entry(path, kind, mode, **kw))

    def file(path: bytes, content: bytes, **kw: Any) -> None:
        add(path, EntryType.REGULAR, content=Content.from_bytes(content), **kw)

    add(b"dir", EntryType.DIRECTORY, 0o755, xattrs=shared)
    file(b"dir/empty", b"")
    file(b"dir/small", b"hello\n", xattrs=(*shared, (b"user.note", b"inline")))
    file(b"dir/block", data(BLOCK_SIZE, 1), xattrs=shared)
    file(b"dir/tail-inline", data(3 * BLOCK_SIZE + 100, 2))
    file(b"dir/tail-plain", data(2 * BLOCK_SIZE + 4000, 3),
         xattrs=((b"user.big", b"x" * 200),))
    file(b"dir/exactly-fits", data(BLOCK_SIZE - 32, 4))
    file(b"dir/big", data(300_000, 5), mode=0o4755)
    file(b"dir/text", b"lorem ipsum dolor sit amet\n" * 9000 + b"end")  # compresses well
    file(b"dir/noise", blake3.blake3(b"noise").digest(length=70_000))  # does not
    file(b"dir/huge-xattrs", data(5000, 6),  # an inode record larger than a block
         xattrs=((b"user.big", b"v" * 65535), (b"user.more", b"m" * 3000)))
    file(b"dir/acl", b"acl\n", xattrs=((b"system.posix_acl_access", ACL),))
    file(b"owners", b"high ids\n", uid=100_000, gid=200_000)
    file(b"old", b"old mtime\n", mtime_ns=EPOCH_NS - 1_234_567_890)
    file(b"nanos", b"\n", mtime_ns=EPOCH_NS - 5)
    file(b"link-primary", b"linked content\n", mode=0o600, uid=7, gid=8)
    add(b"link-second", EntryType.HARDLINK, target=b"link-primary")
    add(b"dir/link-third", EntryType.HARDLINK, target=b"link-primary")
    add(b"sym", EntryType.SYMLINK, 0o777, target=b"dir/small")
    add(b"sym-long", EntryType.SYMLINK, 0o777, target=b"a/" * 1990 + b"end")
    add(b"chr", EntryType.CHAR, 0o600, rdev_major=1, rdev_minor=3,
        xattrs=((b"trusted.dev", b"chr"),))
    add(b"blk", EntryType.BLOCK, 0o660, rdev_major=259, rdev_minor=0x12345)
    add(b"fifo", EntryType.FIFO, 0o644, xattrs=shared)
    add(b"sock", EntryType.SOCKET, 0o755)
    add(b"-dash", EntryType.DIRECTORY, 0o700)  # sorts before "." and ".."
    file(b"-dash/\xff\xfe", b"non-utf8 name\n", xattrs=((b"security.test", b"s"),))
    add(b"many", EntryType.DIRECTORY, 0o755, uid=70_000)
    for i in range(700):
        name = b"entry-%04d-" % i + b"n" * (i % 60)
        if i % 7 == 0:
            add(b"many/" + name, EntryType.DIRECTORY, 0o755)
        else:
            file(b"many/" + name, b"%d\n" % i, xattrs=shared if i % 5 == 0 else ())
    return tree


def build(tree: Tree, path: Path, **options: object) -> Path:
    options.setdefault("epoch", EPOCH)
    with path.open("wb") as out:
        erofs.write(tree, out, ImageOptions(**options))  # type: ignore[arg-type]
    return path


@pytest.fixture(scope="module")
def lz4_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(sample_tree(), tmp_path_factory.mktemp("erofs") / "lz4.img", uuid=UUID,
                 compress="lz4")


@pytest.fixture(scope="module")
def sample_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(sample_tree(), tmp_path_factory.mktemp("erofs") / "sample.img", uuid=UUID,
                 label="sample")


# -- the plan ----------------------------------------------------------------------------
def test_plan_places_inline_records_inside_one_block() -> None:
    layout = plan(sample_tree(), EPOCH)
    offsets = set()
    for inode in layout.inodes:
        assert inode.offset % 32 == 0
        assert inode.offset not in offsets
        offsets.add(inode.offset)
        if inode.datalayout == INODE_FLAT_INLINE:
            start = inode.offset % BLOCK_SIZE
            assert start + inode.record_size <= BLOCK_SIZE, inode.entry.path
        assert inode.offset + inode.record_size <= layout.data_blkaddr * BLOCK_SIZE
    assert layout.inodes[0].entry.path == b"" and layout.root_nid == 1152 // 32


def test_plan_shapes() -> None:
    layout = plan(sample_tree(), EPOCH)
    by_path = {inode.entry.path: inode for inode in layout.inodes}
    assert by_path[b"dir/tail-inline"].datalayout == INODE_FLAT_INLINE
    assert by_path[b"dir/tail-inline"].inline_size == 100
    assert by_path[b"dir/tail-plain"].datalayout == INODE_FLAT_PLAIN
    assert by_path[b"dir/tail-plain"].nblocks == 3
    assert by_path[b"dir/block"].datalayout == INODE_FLAT_PLAIN
    for path in (b"owners", b"old", b"nanos", b"many"):
        assert by_path[path].extended, path
    assert not by_path[b"dir/small"].extended
    assert by_path[b"link-primary"].nlink == 3
    assert b"link-second" not in by_path
    assert by_path[b"many"].nlink == 2 + 100
    assert len(layout.directories[by_path[b"many"].index]) > 5
    assert len(layout.shared_xattrs) > 0 and SHARE_THRESHOLD >= 2


def test_dirents_sorted_across_blocks() -> None:
    names = sorted([b".", b"..", b"-a", b"+", b"z" * 200] + [b"f%04d" % i for i in range(900)])
    blocks = dir_blocks([(n, 0, 1) for n in names])
    assert len(blocks) > 1
    flat = [d[0] for block in blocks for d in block]
    assert flat == names
    for block in blocks:
        assert sum(12 + len(d[0]) for d in block) <= BLOCK_SIZE


names = st.binary(min_size=1, max_size=40).filter(
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b".."))


@st.composite
def random_trees(draw: st.DrawFn) -> Tree:
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755, mtime_ns=EPOCH_NS))
    dirs = [b""]
    regular: list[bytes] = []
    for _ in range(draw(st.integers(0, 60))):
        parent = draw(st.sampled_from(dirs))
        name = draw(names)
        path = parent + b"/" + name if parent else name
        if path in tree:
            continue
        kind = draw(st.sampled_from(["file", "dir", "link", "sym", "fifo"]))
        xattrs = tuple(sorted(draw(st.dictionaries(
            st.sampled_from([b"trusted.a", b"trusted.b", b"user.c", b"security.d"]),
            st.sampled_from([b"", b"v", b"w" * 300]), max_size=3)).items()))
        mtime = draw(st.sampled_from([EPOCH_NS, EPOCH_NS - 1, 0]))
        uid = draw(st.sampled_from([0, 1000, 70_000]))
        if kind == "dir":
            tree.add(Entry(path, EntryType.DIRECTORY, 0o755, uid=uid, mtime_ns=mtime,
                           xattrs=xattrs))
            dirs.append(path)
        elif kind == "link" and regular:
            tree.add(Entry(path, EntryType.HARDLINK, 0o644,
                           target=draw(st.sampled_from(regular))))
        elif kind == "sym":
            tree.add(Entry(path, EntryType.SYMLINK, 0o777, mtime_ns=mtime,
                           target=draw(st.binary(min_size=1, max_size=4095)) or b"x"))
        elif kind == "fifo":
            tree.add(Entry(path, EntryType.FIFO, 0o644, uid=uid, mtime_ns=mtime))
        else:
            size = draw(st.sampled_from([0, 1, 4095, 4096, 4097, 8191, 70_000]))
            tree.add(Entry(path, EntryType.REGULAR, 0o644, uid=uid, mtime_ns=mtime,
                           xattrs=xattrs, content=Content.from_bytes(data(size, len(path)))))
            regular.append(path)
    return tree


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(tree=random_trees(), compress=st.sampled_from([None, "lz4"]))
def test_random_trees_round_trip(tree: Tree, compress: str | None, tmp_path: Path) -> None:
    image = build(tree, tmp_path / "random.img", compress=compress)
    assert [d.display() for d in diff_trees(tree, erofs.read(image))] == []
    if shutil.which("fsck.erofs"):
        result = subprocess.run(["fsck.erofs", str(image)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


# -- serialised bytes ---------------------------------------------------------------------
def test_superblock_checksum_and_fields(sample_image: Path) -> None:
    raw = sample_image.read_bytes()
    assert len(raw) % BLOCK_SIZE == 0
    magic, checksum = struct.unpack_from("<II", raw, 1024)
    assert magic == 0xE0F5E1E2
    import crc32c

    block = bytearray(raw[1024:BLOCK_SIZE])
    block[4:8] = bytes(4)
    assert crc32c.crc32c(bytes(block)) ^ 0xFFFFFFFF == checksum
    assert raw[1024 + 48:1024 + 64].hex() == UUID.replace("-", "")
    assert raw[1024 + 64:1024 + 80] == b"sample".ljust(16, b"\0")
    assert struct.unpack_from("<Q", raw, 1024 + 24)[0] == EPOCH


def test_reader_round_trip(sample_image: Path) -> None:
    assert diff_trees(sample_tree(), erofs.read(sample_image)) == []


def test_deterministic_and_uuid_from_content(tmp_path: Path) -> None:
    a = build(sample_tree(), tmp_path / "a.img").read_bytes()
    b = build(sample_tree(), tmp_path / "b.img").read_bytes()
    assert a == b
    tree = sample_tree()
    tree.replace_entry(Entry(b"dir/small", EntryType.REGULAR, 0o644, mtime_ns=EPOCH_NS,
                             content=Content.from_bytes(b"hellO\n"),
                             xattrs=((b"trusted.shared", b"same value for many inodes"),
                                     (b"user.note", b"inline"))))
    c = build(tree, tmp_path / "c.img").read_bytes()
    assert a[1024 + 48:1024 + 64] != c[1024 + 48:1024 + 64]


def test_options(tmp_path: Path) -> None:
    tree = Tree()
    image = build(tree, tmp_path / "sized.img", size=1 << 20)
    assert image.stat().st_size == 1 << 20
    assert struct.unpack_from("<I", image.read_bytes(), 1024 + 36)[0] == 256
    out = io.BytesIO()
    for bad in (ImageOptions(epoch=0, block_size=1024), ImageOptions(epoch=0, compress="xz"),
                ImageOptions(epoch=0, label="x" * 17), ImageOptions(epoch=0, uuid="nope"),
                ImageOptions(epoch=0, size=5000)):
        with pytest.raises(ImageError):
            erofs.write(tree, out, bad)
    bad_xattr = Tree(Entry(b"", EntryType.DIRECTORY, 0o755, xattrs=((b"system.x", b"1"),)))
    with pytest.raises(ImageError, match="namespace"):
        erofs.write(bad_xattr, io.BytesIO(), ImageOptions(epoch=0))
    assert erofs.identity(ImageOptions(epoch=0)) == {}


def test_damaged_images_are_refused(sample_image: Path, tmp_path: Path) -> None:
    raw = bytearray(sample_image.read_bytes())
    raw[1024 + 64] ^= 0xFF  # volume name: the checksum no longer matches
    (tmp_path / "sum.img").write_bytes(raw)
    with pytest.raises(ImageError, match="checksum"):
        erofs.read(tmp_path / "sum.img")
    (tmp_path / "short.img").write_bytes(sample_image.read_bytes()[:BLOCK_SIZE + 100])
    with pytest.raises(ImageError):
        erofs.read(tmp_path / "short.img")
    (tmp_path / "zero.img").write_bytes(bytes(8192))
    with pytest.raises(ImageError, match="not an EROFS"):
        erofs.read(tmp_path / "zero.img")


def test_content_changing_size_is_refused() -> None:
    tree = Tree()
    tree.add(Entry(b"f", EntryType.REGULAR, 0o644, content=Content(10, Content.from_bytes(
        b"short").source)))
    with pytest.raises(ImageError, match="expected 10 bytes"):
        erofs.write(tree, io.BytesIO(), ImageOptions(epoch=0))


# -- reference tools ----------------------------------------------------------------------
@pytest.mark.tool
def test_fsck_erofs_clean_and_extract(sample_image: Path, tmp_path: Path) -> None:
    need_tool("fsck.erofs")
    result = subprocess.run(["fsck.erofs", str(sample_image)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "extract"
    result = subprocess.run(["fsck.erofs", f"--extract={out}", str(sample_image)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    extracted = tree_from_directory(out)
    expected = sample_tree()
    for entry in expected:
        got = extracted.get(entry.path)
        assert got is not None, entry.path
        if entry.type is EntryType.REGULAR:
            assert got.content is not None and entry.content is not None
            assert got.content.read() == entry.content.read(), entry.path
        elif entry.type is EntryType.SYMLINK:
            assert got.target == entry.target


@pytest.mark.tool
def test_dump_erofs_spot_checks(sample_image: Path) -> None:
    need_tool("dump.erofs")

    def dump(*args: str) -> str:
        result = subprocess.run(["dump.erofs", *args, str(sample_image)], capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stderr
        return result.stdout

    superblock = dump("-s")
    assert "root nid:                          36" in superblock
    assert UUID in superblock
    assert "sb_csum" in superblock
    assert re.search(rf"inode count:\s+{len(plan(sample_tree(), EPOCH).inodes)}", superblock)
    owners = dump("--path=/owners")
    assert "Inode size: 64" in owners and "Uid: 100000" in owners and "Gid: 200000" in owners
    small = dump("--path=/dir/small")
    assert "Inode size: 32" in small and "Layout: 2" in small and "Size: 6" in small
    assert "Links: 3" in dump("--path=/link-second")
    assert "Layout: 0" in dump("--path=/dir/tail-plain")


@pytest.mark.root
def test_kernel_mount_equals_input(sample_image: Path, mount_image: MountImage) -> None:
    mnt = mount_image(sample_image, "erofs")
    back = tree_from_directory(mnt, preserve_owner=True, preserve_mtime=True, read_xattrs=True)
    assert [d.display() for d in diff_trees(sample_tree(), back)] == []


@pytest.mark.tool
def test_fsverity_digest_matches_fsverity_tool(sample_image: Path) -> None:
    need_tool("fsverity")
    result = subprocess.run(["fsverity", "digest", str(sample_image)], capture_output=True,
                            text=True, check=True)
    assert result.stdout.split()[0] == "sha256:" + erofs.fsverity_digest(sample_image)


@pytest.mark.tool
def test_reader_reads_mkfs_erofs_images(tmp_path: Path) -> None:
    need_tool("mkfs.erofs")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(300):
        (src / "sub" / f"file-{i:03d}-{'x' * (i % 40)}").write_bytes(data(i * 61, i))
    (src / "big").write_bytes(data(3 * BLOCK_SIZE + 17, 9))
    os.link(src / "big", src / "big-link")
    (src / "sym").symlink_to("sub/file-001-x")
    os.mkfifo(src / "fifo")
    image = tmp_path / "mkfs.img"
    subprocess.run(["mkfs.erofs", "-T", str(EPOCH), "--all-root", "-x", "-1", "--quiet",
                    str(image), str(src)], check=True, capture_output=True)
    expected = tree_from_directory(src, epoch=EPOCH)
    assert [d.display() for d in diff_trees(expected, erofs.read(image))] == []


# -- LZ4 -----------------------------------------------------------------------------------
def test_lz4_round_trip_and_identity(lz4_image: Path, sample_image: Path) -> None:
    assert diff_trees(sample_tree(), erofs.read(lz4_image)) == []
    assert lz4_image.stat().st_size < sample_image.stat().st_size - 200_000
    ident = erofs.identity(ImageOptions(epoch=0, compress="lz4"))
    assert ident["erofs.compressor"] == "lz4" and ident["lz4.library"]


def test_lz4_deterministic(lz4_image: Path, tmp_path: Path) -> None:
    again = build(sample_tree(), tmp_path / "again.img", uuid=UUID, compress="lz4")
    assert again.read_bytes() == lz4_image.read_bytes()


@pytest.mark.tool
def test_lz4_fsck_and_dump(lz4_image: Path, tmp_path: Path) -> None:
    need_tool("fsck.erofs", "dump.erofs")
    out = tmp_path / "extract"
    result = subprocess.run(["fsck.erofs", f"--extract={out}", str(lz4_image)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for path in (b"dir/text", b"dir/noise", b"dir/big", b"dir/tail-plain"):
        entry = sample_tree().get(path)
        assert entry is not None and entry.content is not None
        assert (out / path.decode()).read_bytes() == entry.content.read()
    text = subprocess.run(["dump.erofs", "--path=/dir/text", str(lz4_image)],
                          capture_output=True, text=True, check=True).stdout
    assert "Layout: 1" in text


@pytest.mark.root
def test_lz4_kernel_mount_equals_input(lz4_image: Path, mount_image: MountImage) -> None:
    mnt = mount_image(lz4_image, "erofs")
    back = tree_from_directory(mnt, preserve_owner=True, preserve_mtime=True, read_xattrs=True)
    assert [d.display() for d in diff_trees(sample_tree(), back)] == []


# -- host conditions ------------------------------------------------------------------------
BUILD_SCRIPT = textwrap.dedent("""
    import sys
    from reprobuild.images.erofs import image as erofs
    from reprobuild.images.registry import ImageOptions
    from reprobuild.trees.directory import tree_from_directory
    tree = tree_from_directory(sys.argv[1], epoch=EPOCH, read_xattrs=True)
    with open(sys.argv[2], "wb") as out:
        erofs.write(tree, out, ImageOptions(epoch=EPOCH, label="host"))
""").replace("EPOCH", str(EPOCH))


def make_erofs_source(root: Path, condition: Condition) -> None:
    make_source(root, condition, per_dir=30, wide=0,
                xattrs=((b"user.a", b"1"), (b"user.b", b"2"), (b"user.shared", b"s")))


@pytest.mark.userns
def test_host_conditions_give_identical_bytes(unprivileged: Unprivileged) -> None:
    need_tmpfs()
    # The third host builds a plain (not sparse) source as nobody.
    conditions = (*CONDITIONS[:2], replace(CONDITIONS[2], sparse=False, as_nobody=True))
    paths = build_under_conditions(unprivileged, "erofs", BUILD_SCRIPT, make_erofs_source,
                                   conditions)
    images = [path.read_bytes() for path in paths]
    assert images[0] == images[1] == images[2]
    back = erofs.read(paths[-1])
    assert sum(e.type is EntryType.REGULAR for e in back) == 120
    sparse_file = back.get(b"d1/f3")
    assert sparse_file is not None and sparse_file.xattrs[0] == (b"user.a", b"1")


# -- the Debian minbase tree ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.root
@pytest.mark.tool
def test_debian_minbase(debian_minbase_tar: Path, tmp_path: Path,
                        mount_image: MountImage) -> None:
    need_tool("fsck.erofs")
    from reprobuild.trees.load import load_tree
    from reprobuild.trees.tar_reader import Spool

    tree = load_tree(str(debian_minbase_tar), epoch=EPOCH, spool=Spool(tmp_path / "spool"))
    assert len(tree) > 5000
    image = build(tree, tmp_path / "minbase.img")
    again = build(tree, tmp_path / "again.img")
    assert image.read_bytes() == again.read_bytes()
    result = subprocess.run(["fsck.erofs", str(image)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert diff_trees(tree, erofs.read(image)) == []
    mnt = mount_image(image, "erofs")
    back = tree_from_directory(mnt, preserve_owner=True, preserve_mtime=True,
                               read_xattrs=True)
    assert [d.display() for d in diff_trees(tree, back)] == []
