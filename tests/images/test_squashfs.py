"""squashfs writer and reader: plan, unsquashfs, kernel mount, round trip, host conditions."""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import blake3
import pytest

from reprobuild.errors import ImageError
from reprobuild.images.registry import ImageOptions
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
from reprobuild.trees.directory import tree_from_directory
from reprobuild.trees.tree import Content, Entry, EntryType, Tree
from tests.conftest import need_tool
from tests.images.hostconditions import (
    Condition,
    run_under,
    source_dir,
    tmpfs_available,
    write_tree,
)

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


def test_identity_names_compressor_and_library() -> None:
    ident = squashfs.identity(ImageOptions(epoch=0))
    assert ident["compressor"] == "zstd" and ident["library"].startswith("libzstd ")
    assert squashfs.identity(ImageOptions(epoch=0, compress="gzip"))["library"].startswith(
        "zlib ")
    assert squashfs.identity(ImageOptions(epoch=0, compress="xz"))["library"].startswith(
        "liblzma ")
    assert squashfs.identity(ImageOptions(epoch=0, compress="none")) == {"compressor": "none"}


# -- reference tool and kernel ------------------------------------------------------------
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


# -- host conditions ----------------------------------------------------------------------
def source_tree() -> Tree:
    """The sample tree without what a plain directory cannot hold for every uid."""
    return sample_tree(4096)


WRITE_FROM_DISK = f"""
import sys
from reprobuild.images.squashfs import image as squashfs
from reprobuild.images.registry import ImageOptions
from reprobuild.trees.directory import tree_from_directory
tree = tree_from_directory(sys.argv[1], preserve_owner=True, preserve_mtime=True,
                           read_xattrs=True)
with open(sys.argv[2], "wb") as out:
    squashfs.write(tree, out, ImageOptions(epoch={EPOCH}, block_size=4096))
"""


@pytest.mark.root
def test_host_conditions_give_identical_bytes(tmp_path: Path) -> None:
    tree = source_tree()
    conditions = {
        "disk": Condition(cwd=tmp_path),
        "reversed": Condition(reverse=True, cwd=Path("/"),
                              env={"TZ": "Pacific/Kiritimati", "LC_ALL": "C", "LANG": "C"}),
        "sparse": Condition(sparse=True, cwd=tmp_path,
                            env={"TZ": "America/New_York", "LC_ALL": "C.UTF-8"}),
        "xattr-order": Condition(xattr_order=1, umask=0o077, cwd=tmp_path),
    }
    if tmpfs_available():
        conditions["tmpfs"] = Condition(on_tmpfs=True, cwd=tmp_path)
    images = {}
    for name, condition in conditions.items():
        with source_dir(f"squashfs-test-{name}", condition) as root:
            write_tree(tree, root, condition)
            out = tmp_path / f"{name}.sqfs"
            result = run_under(["python", "-c", WRITE_FROM_DISK, str(root), str(out)],
                               condition, cwd=condition.cwd or tmp_path)
            assert result.returncode == 0, result.stderr
        images[name] = out.read_bytes()
    reference = images.pop("disk")
    for name, data in images.items():
        assert data == reference, name
    # And the in-memory tree gives the same image as its copy on disk.
    direct = build(tree, tmp_path / "direct.sqfs", block_size=4096).read_bytes()
    assert direct == reference


WRITE_SAMPLE = """
import sys
from tests.images.test_squashfs import build, sample_tree
from pathlib import Path
build(sample_tree(), Path(sys.argv[1]), compress=sys.argv[2])
"""


@pytest.mark.userns
def test_other_uid_gives_identical_bytes(tmp_path: Path, unprivileged: object) -> None:
    scratch = unprivileged.scratch("squashfs")  # type: ignore[attr-defined]
    tests_dir = scratch / "tests"
    shutil.copytree(Path(__file__).resolve().parent.parent, tests_dir,
                    ignore=shutil.ignore_patterns("__pycache__"))
    for dirpath, _, filenames in os.walk(scratch):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    out = scratch / "img.sqfs"
    result = unprivileged.run(  # type: ignore[attr-defined]
        ["python", "-c", WRITE_SAMPLE, str(out), "gzip"], cwd=scratch,
        env={"PYTHONPATH": f"{scratch}:{unprivileged.pythonpath}",  # type: ignore[attr-defined]
             "TZ": "Asia/Kolkata"})
    assert result.returncode == 0, result.stderr
    mine = build(sample_tree(), tmp_path / "img.sqfs", compress="gzip").read_bytes()
    assert out.read_bytes() == mine


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


# -- a real distribution tree -------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.root
@pytest.mark.tool
def test_debian_minbase(tmp_path: Path, debian_minbase_tar: Path, mount_image: object) -> None:
    need_tool("unsquashfs")
    from reprobuild.trees.load import load_tree
    from reprobuild.trees.tar_reader import Spool

    tree = load_tree(str(debian_minbase_tar), epoch=EPOCH, spool=Spool(tmp_path / "spool"))
    image = build(tree, tmp_path / "debian.sqfs")
    assert len(unsquashfs_listing(image)) == len(tree)
    mnt = mount_image(image, "squashfs")  # type: ignore[operator]
    back = tree_from_directory(mnt, preserve_owner=True, preserve_mtime=True, read_xattrs=True)
    assert diff_trees(seconds(tree), back) == []
    assert diff_trees(seconds(tree), squashfs.read(image)) == []
    # The same tree extracted by tar as root gives the same image.
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf",
                    str(debian_minbase_tar), "-C", str(root)], check=True)
    extracted = tree_from_directory(root, preserve_owner=True, preserve_mtime=True,
                                    read_xattrs=True).normalized(epoch=EPOCH)
    again = build(extracted, tmp_path / "again.sqfs")
    assert again.read_bytes() == image.read_bytes()
