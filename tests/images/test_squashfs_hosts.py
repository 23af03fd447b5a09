"""squashfs bytes under other host conditions and another uid, and a Debian tree from a
tar and from its extracted copy."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from reprobuild.images.squashfs import image as squashfs
from reprobuild.trees.diff import diff_trees
from reprobuild.trees.directory import tree_from_directory
from reprobuild.trees.tree import Tree
from tests.conftest import need_tool
from tests.images.hostconditions import (
    Condition,
    run_under,
    source_dir,
    tmpfs_available,
    write_tree,
)
from tests.images.squashfs_trees import (
    EPOCH,
    build,
    sample_tree,
    seconds,
    unsquashfs_listing,
)


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
from tests.images.squashfs_trees import build, sample_tree
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
