"""ext4 under other host conditions, at scale (100,000 entries, a Debian tree) and with
a 6 GiB file in bounded memory."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from reprobuild.images.ext4 import image as ext4
from reprobuild.trees.diff import diff_trees
from reprobuild.trees.directory import tree_from_directory
from reprobuild.trees.tree import Entry, EntryType, Tree
from tests.conftest import Unprivileged
from tests.images.ext4_trees import (
    EPOCH,
    EPOCH_NS,
    REPO,
    MountImage,
    build,
    debugfs,
    e2fsck_clean,
    without_lost_found,
)
from tests.images.hostconditions import build_under_conditions, make_source, need_tmpfs

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


HUGE_SCRIPT = textwrap.dedent("""
    import sys
    from reprobuild.images.ext4 import image as ext4
    from reprobuild.images.registry import ImageOptions
    from reprobuild.trees.tree import Content, Entry, EntryType, Tree
    from tests.images.ext4_trees import PatternSource
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
