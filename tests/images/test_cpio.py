"""The cpio newc writer: GNU cpio lists and extracts it, round trips, refusals, stability."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from reprobuild.errors import ImageError
from reprobuild.images import cpio
from reprobuild.images.registry import ImageOptions
from reprobuild.trees.diff import diff_trees
from reprobuild.trees.directory import tree_from_directory
from reprobuild.trees.load import load_tree
from reprobuild.trees.tree import BytesSource, Content, Entry, EntryType, Tree
from tests.conftest import need, need_tool
from tests.images.archive_trees import EPOCH, NS, sample_tree, whole_seconds
from tests.images.hostconditions import images_in_process

OPTIONS = ImageOptions(epoch=EPOCH)


def cpio_of(tree: Tree, options: ImageOptions = OPTIONS) -> bytes:
    out = io.BytesIO()
    cpio.write(tree, out, options)
    return out.getvalue()


def headers(data: bytes) -> list[tuple[bytes, list[int]]]:
    """(name, the 13 header fields) of every member, trailer included."""
    out = []
    offset = 0
    while True:
        assert data[offset:offset + 6] == b"070701"
        fields = [int(data[offset + 6 + 8 * i:offset + 14 + 8 * i], 16) for i in range(13)]
        name_end = offset + 110 + fields[11]
        name = data[offset + 110:name_end - 1]
        out.append((name, fields))
        if name == b"TRAILER!!!":
            return out
        offset = name_end + (-name_end % 4) + fields[6]
        offset += -offset % 4


def test_round_trip(tmp_path: Path) -> None:
    tree = sample_tree(xattrs=False)
    path = tmp_path / "t.cpio"
    path.write_bytes(cpio_of(tree))
    assert [d.display() for d in diff_trees(whole_seconds(tree), cpio.read(path))] == []


def test_layout() -> None:
    tree = sample_tree(xattrs=False)
    data = cpio_of(tree)
    assert len(data) % 512 == 0
    members = headers(data)
    names = [name for name, _ in members]
    assert names[0] == b"." and names[-1] == b"TRAILER!!!"
    assert names[1:-1] == [e.path for e in tree][1:]
    by_name = {name: fields for name, fields in members}
    # Inode numbers in canonical order; a hardlink group shares its first path's number
    # and the data travels with its last path.
    inos = [fields[0] for _, fields in members[:-1]]
    group = [b"bin/ping", b"bin/ping6", b"sbin/ping-link"]
    assert len({by_name[n][0] for n in group}) == 1
    assert [by_name[n][6] for n in group] == [0, 0, tree.get(b"bin/ping").size]  # type: ignore[union-attr]
    assert [by_name[n][4] for n in group] == [3, 3, 3]
    distinct = list(dict.fromkeys(inos))
    assert distinct == list(range(1, len(distinct) + 1))
    assert by_name[b"."][4] == 2 + 6  # nlink of a directory: 2 + subdirectories
    console = by_name[b"dev/console"]
    assert stat.S_ISCHR(console[1]) and (console[9], console[10]) == (5, 1)
    assert by_name[b"home/user/file"][5] == EPOCH - 5  # whole seconds
    assert all(fields[12] == 0 and fields[7] == fields[8] == 0 for _, fields in members)


def test_refusals() -> None:
    with pytest.raises(ImageError, match="/bin/ping: cpio newc cannot store xattrs"):
        cpio_of(sample_tree())
    cpio_of(sample_tree(), ImageOptions(epoch=EPOCH, extra=(("xattrs", "ignore"),)))
    huge = Tree()
    huge.add(Entry(b"big", EntryType.REGULAR, 0o644, content=Content(5 << 30, BytesSource(b""))))
    with pytest.raises(ImageError, match="/big: size 5368709120 does not fit"):
        cpio_of(huge)
    late = Tree()
    late.add(Entry(b"late", EntryType.REGULAR, 0o644, mtime_ns=(1 << 33) * NS))
    with pytest.raises(ImageError, match="/late: mtime"):
        cpio_of(late, ImageOptions(epoch=1 << 34))
    long = Tree()
    long.add(Entry(b"n" * 255, EntryType.DIRECTORY, 0o755))
    path = b"n" * 255
    for _ in range(16):
        path += b"/" + b"n" * 255
        long.add(Entry(path, EntryType.DIRECTORY, 0o755))
    with pytest.raises(ImageError, match="PATH_MAX"):
        cpio_of(long)
    trailer = Tree()
    trailer.add(Entry(b"TRAILER!!!", EntryType.FIFO, 0o644))
    with pytest.raises(ImageError, match="would end the archive"):
        cpio_of(trailer)
    with pytest.raises(ImageError, match="no block size"):
        cpio_of(Tree(), ImageOptions(epoch=0, block_size=4096))


@pytest.mark.parametrize("compress", ["gzip", "zstd"])
def test_compressed_output(tmp_path: Path, compress: str) -> None:
    tree = sample_tree(xattrs=False)
    options = ImageOptions(epoch=EPOCH, compress=compress)
    path = tmp_path / "initrd.img"
    path.write_bytes(cpio_of(tree, options))
    assert path.read_bytes() == cpio_of(tree, options)
    assert [d.display() for d in diff_trees(whole_seconds(tree), cpio.read(path))] == []
    assert cpio.identity(options)["compressor"].startswith(
        "zlib" if compress == "gzip" else "zstandard")
    tool = {"gzip": "gzip", "zstd": "zstd"}[compress]
    if shutil.which(tool):
        plain = subprocess.run([tool, "-dc", str(path)], check=True,
                               capture_output=True).stdout
        assert plain == cpio_of(tree)


def test_bytes_are_stable() -> None:
    digest = hashlib.sha256(cpio_of(sample_tree(xattrs=False))).hexdigest()
    assert (cpio.VERSION, digest) == ("1", GOLDEN_SHA256)


GOLDEN_SHA256 = "d7c3592f8a279fbc7a7b0387bb1b55120a35e9e08cd9618166b6478eb27476dc"


def test_host_conditions_give_identical_bytes() -> None:
    images = images_in_process("cpio", cpio_of, epoch=EPOCH)
    assert len(images) >= 3
    assert all(image == images[0] for image in images)


def gnu_cpio_listing(path: Path) -> list[list[str]]:
    with path.open("rb") as stdin:
        result = subprocess.run(["cpio", "-itv", "--numeric-uid-gid", "--quiet"], stdin=stdin,
                                check=True, capture_output=True, env={**os.environ, "TZ": "UTC"})
    return [line.split() for line in result.stdout.decode("utf-8", "replace").splitlines()]


def check_listing(tree: Tree, path: Path) -> None:
    lines = gnu_cpio_listing(path)
    entries = list(tree)
    assert len(lines) == len(entries)
    for fields, entry in zip(lines, entries, strict=True):
        inode = tree.resolve(entry)
        assert fields[0] == stat.filemode(inode.st_mode), fields
        assert (fields[2], fields[3]) == (str(inode.uid), str(inode.gid)), fields
        if entry.type in (EntryType.CHAR, EntryType.BLOCK):
            assert fields[4] == f"{entry.rdev_major}," and fields[5] == str(entry.rdev_minor)
        name_at = 9 if entry.type in (EntryType.CHAR, EntryType.BLOCK) else 8
        assert fields[name_at] == (entry.path or b".").decode("utf-8", "replace"), fields


@pytest.mark.tool
def test_gnu_cpio_lists_the_tree(tmp_path: Path) -> None:
    need_tool("cpio")
    tree = sample_tree(xattrs=False)
    path = tmp_path / "t.cpio"
    path.write_bytes(cpio_of(tree))
    check_listing(tree, path)


@pytest.mark.tool
def test_gnu_cpio_extracts_the_tree(tmp_path: Path) -> None:
    need_tool("cpio")
    need(os.geteuid() == 0, "extracting owners and devices needs root")
    tree = sample_tree(xattrs=False)
    path = tmp_path / "t.cpio"
    path.write_bytes(cpio_of(tree))
    out = tmp_path / "out"
    out.mkdir()
    with path.open("rb") as stdin:
        subprocess.run(["cpio", "-idm", "--no-absolute-filenames", "--quiet"], stdin=stdin,
                       cwd=out, check=True)
    back = tree_from_directory(out, preserve_owner=True, preserve_mtime=True)
    diffs = [d for d in diff_trees(whole_seconds(tree), back)
             # GNU cpio sets a directory's time before filling it, and no symlink times.
             if not (d.kind == "mtime" and back.get(d.path) is not None
                     and back.get(d.path).type in (EntryType.DIRECTORY,  # type: ignore[union-attr]
                                                   EntryType.SYMLINK))]
    assert [d.display() for d in diffs] == []


@pytest.mark.slow
@pytest.mark.tool
def test_debian_minbase(debian_minbase_tar: Path, tmp_path: Path) -> None:
    need_tool("cpio")
    tree = load_tree(debian_minbase_tar, epoch=EPOCH)
    path = tmp_path / "minbase.cpio"
    with path.open("wb") as f:
        cpio.write(tree, f, OPTIONS)
    assert [d.display() for d in diff_trees(whole_seconds(tree), cpio.read(path))] == []
    check_listing(tree, path)


@pytest.mark.tool
def test_reads_gnu_cpio_archives(tmp_path: Path) -> None:
    """GNU cpio defers hardlinks to the group's last path; the reader regroups them."""
    need_tool("cpio")
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "one").write_bytes(b"shared")
    os.link(src / "a" / "one", src / "two")
    os.link(src / "a" / "one", src / "a" / "zzz")
    (src / "plain").write_bytes(b"p" * 1000)
    (src / "link").symlink_to("plain")
    for path in (src, src / "a", src / "two", src / "plain"):
        os.utime(path, (1_600_000_000, 1_600_000_000), follow_symlinks=False)
    archive = tmp_path / "gnu.cpio"
    names = subprocess.run(["find", "."], cwd=src, check=True, capture_output=True).stdout
    with archive.open("wb") as out:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=names, cwd=src,
                       stdout=out, check=True)
    back = cpio.read(archive)
    expected = whole_seconds(tree_from_directory(src, preserve_owner=True,
                                                 preserve_mtime=True))
    assert [d.display() for d in diff_trees(expected, back)] == []
    one = back.get(b"a/one")
    assert one is not None and one.content is not None and one.content.read() == b"shared"
