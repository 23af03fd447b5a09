"""The plan of a FAT image: the type and size chosen, clusters handed out in canonical
order, and the options, sizes and epochs that are refused."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from reprobuild.errors import ImageError
from reprobuild.images.registry import ImageOptions, OptionValue
from reprobuild.images.vfat import image as vfat
from reprobuild.images.vfat.layout import plan
from reprobuild.trees.tree import BytesSource, Content, Entry, EntryType
from tests.images.vfat_images import fat_bits_of, file, image_of, read_bytes, tree_with
from tests.images.vfat_trees import EPOCH, fat_view, vfat_tree


def test_min_size_and_fat_type() -> None:
    tree = vfat_tree()
    small = image_of(tree)
    assert len(small) % (1 << 20) == 0 and fat_bits_of(small) == 12
    assert fat_bits_of(image_of(tree, fat=16)) == 16
    fat32 = image_of(tree, fat=32)
    assert fat_bits_of(fat32) == 32 and len(fat32) >= 33 << 20
    assert fat_bits_of(image_of(tree, size=600 << 20)) == 32
    assert len(image_of(tree, size=5 << 20)) == 5 << 20


def test_plan_allocates_contiguously_in_canonical_order() -> None:
    tree = vfat_tree()
    layout = plan(tree, ImageOptions(epoch=EPOCH), fat_bits=None)
    extents = [(entry.path, layout.extents[entry.path]) for entry in tree
               if entry.path in layout.extents]
    assert extents[0][0] == b".hidden"  # the FAT12 root lies before the clusters
    next_cluster = 2
    for path, extent in extents:
        if extent.count:
            assert extent.first == next_cluster, path
            next_cluster += extent.count
        else:
            assert extent.first == 0 and tree.get(path).size == 0  # type: ignore[union-attr]
    assert next_cluster - 2 == layout.used_clusters
    assert [entry.path for entry in layout.files] == [
        entry.path for entry in tree if entry.type is EntryType.REGULAR and entry.size]


def test_content_changing_size_is_refused() -> None:
    tree = tree_with(Entry(b"grows", EntryType.REGULAR, 0o644,
                           content=Content(3, BytesSource(b"four"))))
    with pytest.raises(ImageError, match=r"/grows: content is more than 3 bytes, expected 3"):
        image_of(tree)


@pytest.mark.parametrize(("options", "message"), [
    ({"size": 1 << 20, "fat": 32}, r"no FAT32 file system fits in 1048576 bytes"),
    ({"size": 1 << 20}, r"the tree needs \d+ clusters of 2048 bytes, but 1048576 bytes hold 502"),
    ({"size": 1_000_001 * 512 + 1}, r"vfat size 512000513 is not a multiple of 512"),
    ({"fat": 12, "size": 512 << 20}, r"no FAT12 file system fits"),
    ({"label": "esp"}, r"vfat label 'esp' is not a FAT volume label"),
    ({"label": "TOO LONG NAME"}, r"is not a FAT volume label"),
    ({"label": "A.B"}, r"is not a FAT volume label"),
    ({"volume_id": "12345"}, r"vfat volume id '12345' is not 8 hex digits"),
    ({"volume_id": "XYZW-1234"}, r"is not 8 hex digits"),
    ({"volume_id": "1234-ABCD", "uuid": "1234ABCD"}, r"as uuid or as volume_id, not both"),
    ({"fat": 13}, r"vfat option fat = 13 is not 12, 16 or 32"),
])
def test_bad_options_are_refused(options: dict[str, OptionValue], message: str) -> None:
    tree = tree_with(Entry(b"big", EntryType.REGULAR, 0o644,
                           content=Content(2 << 20, BytesSource(b""))))
    with pytest.raises(ImageError, match=message):
        image_of(tree, **options)


def test_a_tree_too_big_for_fat12_is_refused() -> None:
    tree = tree_with(Entry(b"big", EntryType.REGULAR, 0o644,
                           content=Content(300 << 20, BytesSource(b""))))
    with pytest.raises(ImageError, match=r"does not fit in a FAT12 file system"):
        image_of(tree, fat=12)


def test_an_epoch_after_2107_is_refused() -> None:
    out = io.BytesIO()
    with pytest.raises(ImageError, match=r"epoch 4354819200 is after 2107-12-31"):
        vfat.write(tree_with(), out, ImageOptions(epoch=4354819200))


def test_a_root_with_more_than_512_entries(tmp_path: Path) -> None:
    tree = tree_with(*(file(b"root-file-%04d" % number) for number in range(400)))
    data = image_of(tree, fat=16)
    root_entries = int.from_bytes(data[17:19], "little")
    assert root_entries >= 400 * 3 + 1 and root_entries % 16 == 0
    assert len(fat_view(read_bytes(data))) == 402
