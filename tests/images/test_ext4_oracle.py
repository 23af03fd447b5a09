"""ext4 images checked by the reference tools (e2fsck, debugfs, mke2fs), the kernel and
our reader."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from reprobuild.images.ext4 import image as ext4
from reprobuild.images.ext4.ondisk import BLOCK_SIZE
from reprobuild.trees.diff import diff_trees
from reprobuild.trees.directory import tree_from_directory
from reprobuild.trees.tree import Entry, EntryType, Tree
from tests.conftest import need_tool
from tests.images.ext4_trees import (
    EPOCH,
    EPOCH_NS,
    MountImage,
    build,
    data,
    debugfs,
    e2fsck_clean,
    expected,
    pattern,
    sample_tree,
    without_lost_found,
)


@pytest.fixture(scope="module")
def sample_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(sample_tree(big_dir=10_000), tmp_path_factory.mktemp("ext4") / "sample.img")


def test_reader_round_trip(sample_image: Path) -> None:
    back = ext4.read(sample_image)
    lost = back.get(b"lost+found")
    assert lost is not None and lost.mode == 0o700
    assert diff_trees(expected(sample_tree(big_dir=10_000)), without_lost_found(back)) == []


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
