"""Reading FAT images back (our reader, ``reprobuild diff``), and bytes that depend on
nothing but the tree: the golden digest, the derived volume id, other hosts."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest

from reprobuild.errors import ImageError
from reprobuild.images.registry import ImageOptions
from reprobuild.images.vfat import image as vfat
from reprobuild.images.vfat.layout import plan
from reprobuild.proof.diffreport import diff_paths
from reprobuild.trees.diff import diff_trees
from reprobuild.trees.tree import Content, Entry, EntryType, Tree
from tests.conftest import Unprivileged
from tests.images.hostconditions import CONDITIONS, Condition, build_under_conditions, write_tree
from tests.images.vfat_images import (
    file,
    image_of,
)
from tests.images.vfat_trees import EPOCH, fat_seconds, fat_view, vfat_tree


# -- reading --------------------------------------------------------------------------------
def test_read_gives_back_the_tree(sample_image: Path) -> None:
    back = vfat.read(sample_image)
    assert fat_view(back) == fat_view(vfat_tree())
    read_only = back.get(b"sizes/read-only")
    assert read_only is not None and read_only.mode == 0o444


def test_cross_linked_clusters_are_refused(tmp_path: Path) -> None:
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755))
    tree.add(file(b"A"))
    tree.add(file(b"B"))
    image = bytearray(image_of(tree))
    geometry = plan(tree, ImageOptions(epoch=EPOCH), fat_bits=None).geometry
    root = geometry.root_start * 512
    assert image[root:root + 11] == b"A".ljust(11)
    assert image[root + 32:root + 43] == b"B".ljust(11)
    image[root + 32 + 26:root + 32 + 28] = image[root + 26:root + 28]  # B starts where A does
    path = tmp_path / "cross.img"
    path.write_bytes(bytes(image))
    with pytest.raises(ImageError, match=r"/B uses cluster 2, which another chain"):
        vfat.read(path)


def test_times_are_utc_and_clamped(sample_image: Path) -> None:
    back = vfat.read(sample_image)
    times = {e.path: e.mtime_ns // 10**9 for e in back if e.path.startswith(b"times/")}
    assert times == {b"times/1970": 315532800, b"times/1979-12-31": 315532800,
                     b"times/future": EPOCH - 1, b"times/odd": EPOCH - 1001}
    assert fat_seconds(EPOCH * 10**9) == EPOCH - 1


def test_diff_reads_vfat_images(tmp_path: Path) -> None:
    tree = vfat_tree()
    (tmp_path / "a.img").write_bytes(image_of(tree))
    tree.replace_entry(Entry(b"readme.txt", EntryType.REGULAR, 0o644,
                             content=Content.from_bytes(b"changed")))
    (tmp_path / "b.img").write_bytes(image_of(tree))
    report = diff_paths(tmp_path / "a.img", tmp_path / "b.img")
    assert (report.kind_a, report.kind_b) == ("vfat", "vfat")
    assert [d.display() for d in report.differences] == [
        d.display() for d in diff_trees(vfat.read(tmp_path / "a.img"),
                                        vfat.read(tmp_path / "b.img"))]
    assert "/readme.txt" in report.render()


# -- determinism -------------------------------------------------------------------------
GOLDEN = "523e8dc2d082754e50210a27c77b6c9755bda4e588a9906b861a365e32e936a8"


def test_golden_digest() -> None:
    data = image_of(vfat_tree(), label="ESP")
    assert hashlib.sha256(data).hexdigest() == GOLDEN


def test_volume_id_from_content_and_seed() -> None:
    tree = vfat_tree()
    first = image_of(tree)
    assert image_of(tree) == first
    assert image_of(tree, seed="other")[39:43] != first[39:43]
    changed = vfat_tree()
    changed.remove(b"empty-dir")
    assert image_of(changed)[39:43] != first[39:43]
    given = image_of(tree, volume_id="ABCD-1234")
    assert given[39:43] == bytes.fromhex("3412cdab")
    assert image_of(tree, uuid="abcd1234")[39:43] == bytes.fromhex("3412cdab")


BUILD_SCRIPT = textwrap.dedent("""
    import sys
    from reprobuild.images.vfat import image as vfat
    from reprobuild.images.registry import ImageOptions
    from reprobuild.trees.directory import tree_from_directory
    tree = tree_from_directory(sys.argv[1], epoch=EPOCH, preserve_mtime=True)
    with open(sys.argv[2], "wb") as out:
        vfat.write(tree, out, ImageOptions(epoch=EPOCH, label="HOST"))
""").replace("EPOCH", str(EPOCH))


def make_vfat_source(root: Path, condition: Condition) -> None:
    write_tree(vfat_tree(), root, condition)


@pytest.mark.userns
def test_host_conditions_give_identical_bytes(unprivileged: Unprivileged) -> None:
    # Odd time zones (Asia/Kolkata, America/St_Johns), locales, umasks, creation order,
    # holes, tmpfs or disk, root or nobody.
    paths = build_under_conditions(unprivileged, "vfat", BUILD_SCRIPT, make_vfat_source,
                                   (CONDITIONS[0], CONDITIONS[1], CONDITIONS[2]))
    images = [path.read_bytes() for path in paths]
    assert images[0] == images[1] == images[2]
    assert fat_view(vfat.read(paths[1])) == fat_view(vfat_tree())
