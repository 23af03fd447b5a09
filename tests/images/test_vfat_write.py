"""How the FAT writer moves bytes: the data area through reused buffers (files on disk
read straight into them, other contents copied in), written a buffer at a time to a file
or to anything else. Every way gives the same image; a source that changes or vanishes
under the writer is refused with its path."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from reprobuild.errors import ImageError
from reprobuild.images.registry import ImageOptions
from reprobuild.images.vfat import data
from reprobuild.images.vfat import image as vfat
from reprobuild.trees.directory import tree_from_directory
from reprobuild.trees.tree import Content, Entry, EntryType, Tree
from tests.images.hostconditions import write_tree
from tests.images.vfat_images import image_of
from tests.images.vfat_trees import EPOCH, vfat_tree


def many_files_tree(small_files: int = 1100) -> Tree:
    """Files of every size class for small buffers: empty, under a cluster, whole
    clusters, several clusters and buffers, and many small files."""
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755))
    tree.add(Entry(b"big", EntryType.DIRECTORY, 0o755))
    for size in (0, 1, 2047, 2048, 2049, 10_000, 70_001, 300_000):
        data = bytes((size * 7 + i) % 251 for i in range(size))
        tree.add(Entry(b"big/f%d" % size, EntryType.REGULAR, 0o644,
                       content=Content.from_bytes(data)))
    tree.add(Entry(b"many", EntryType.DIRECTORY, 0o755))
    for number in range(small_files):
        tree.add(Entry(b"many/n%04d" % number, EntryType.REGULAR, 0o644,
                       content=Content.from_bytes(b"%d\n" % number)))
    return tree


def to_file(tree: Tree, path: Path, **extra: str) -> bytes:
    with path.open("wb") as output:
        vfat.write(tree, output, ImageOptions(epoch=EPOCH, label="ESP",
                                              extra=tuple(sorted(extra.items()))))
    return path.read_bytes()


BUFFERS = [4 << 20, 3000, 511]
BUFFER_IDS = ["4MiB", "3000", "511"]  # 3000 and 511: less than files, clusters, sectors


@pytest.mark.parametrize("buffer", BUFFERS, ids=BUFFER_IDS)
def test_buffers_and_outputs_give_the_golden_bytes(
        buffer: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    golden = image_of(vfat_tree(), label="ESP")  # in memory, defaults: the golden digest
    monkeypatch.setattr(data, "BATCH", buffer)
    assert to_file(vfat_tree(), tmp_path / "small.img") == golden
    assert image_of(vfat_tree(), label="ESP") == golden


@pytest.mark.parametrize("buffer", BUFFERS, ids=BUFFER_IDS)
def test_files_on_disk_through_buffers_of_any_size(buffer: int, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "source"
    write_tree(many_files_tree(), source)
    tree = tree_from_directory(source, epoch=EPOCH)
    expected = image_of(tree, label="ESP")
    given = image_of(tree, label="ESP", volume_id="ABCD-1234")
    monkeypatch.setattr(data, "BATCH", buffer)
    assert to_file(tree, tmp_path / "derived.img") == expected
    assert to_file(tree, tmp_path / "given.img", volume_id="ABCD-1234") == given
    assert expected[:39] == given[:39] and expected[43:512] == given[43:512]
    assert expected[39:43] != given[39:43]  # the derived id is not the given one


def test_a_short_write_is_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = image_of(many_files_tree(), label="ESP")
    real = os.pwrite

    def at_most_1000_bytes(fd: int, piece: memoryview, offset: int) -> int:
        return real(fd, piece[:1000], offset)

    monkeypatch.setattr(os, "pwrite", at_most_1000_bytes)
    assert to_file(many_files_tree(), tmp_path / "short.img") == expected


@pytest.mark.parametrize("buffer", [1 << 20, 3000], ids=["one-read", "across-buffers"])
@pytest.mark.parametrize("change", [b"more bytes than before\n", b""], ids=["grew", "shrank"])
def test_a_file_changed_after_the_walk_is_refused(
        buffer: int, change: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        ) -> None:
    monkeypatch.setattr(data, "BATCH", buffer)
    source = tmp_path / "source"
    write_tree(many_files_tree(small_files=20), source)
    tree = tree_from_directory(source, epoch=EPOCH)
    changed = source / "big" / "f10000"
    if change:
        with changed.open("ab") as stream:
            stream.write(change)
    else:
        changed.write_bytes(b"short")
    threads = threading.active_count()
    got = "more than 10000" if change else "5"
    with pytest.raises(ImageError, match=rf"/big/f10000: content is {got} bytes, expected "
                                         r"10000") as caught:
        to_file(tree, tmp_path / "out.img")
    assert caught.value.hint == "do not modify the source tree during a build"
    assert threading.active_count() == threads  # the writer thread was stopped


@pytest.mark.parametrize("volume_id", [None, "ABCD-1234"], ids=["derived", "given"])
def test_a_failed_write_is_raised_and_stops_the_writer(
        volume_id: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "BATCH", 3000)  # many buffers: the writer thread runs
    real = os.pwrite
    calls = []

    def full_after_five(fd: int, piece: memoryview, offset: int) -> int:
        calls.append(offset)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, piece, offset)

    monkeypatch.setattr(os, "pwrite", full_after_five)
    threads = threading.active_count()
    extra = {"volume_id": volume_id} if volume_id else {}
    with pytest.raises(OSError) as caught:
        to_file(many_files_tree(), tmp_path / "full.img", **extra)
    assert caught.value.errno == errno.ENOSPC
    assert len(calls) == 6  # nothing more was tried after the failure
    assert threading.active_count() == threads


def test_a_vanished_file_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "source"
    write_tree(many_files_tree(small_files=20), source)
    tree = tree_from_directory(source, epoch=EPOCH)
    (source / "many" / "n0007").unlink()
    with pytest.raises(ImageError, match=r"/many/n0007: cannot read its content: No such "
                                         r"file") as caught:
        to_file(tree, tmp_path / "out.img")
    assert caught.value.hint == "check that the source tree is readable"
