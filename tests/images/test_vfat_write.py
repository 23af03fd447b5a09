"""How the FAT writer moves bytes: the data area in batches (``pwritev`` to a file, one
``write`` to anything else), small files read whole and large ones streamed, the volume
id hashed inline or on a second thread. Every way gives the same image; a source that
changes or vanishes under the writer is refused with its path."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from reprobuild.errors import ImageError
from reprobuild.images.registry import ImageOptions
from reprobuild.images.vfat import image as vfat
from reprobuild.images.vfat import volume_id, write
from reprobuild.trees.directory import tree_from_directory
from reprobuild.trees.tree import Content, Entry, EntryType, Tree
from tests.images.hostconditions import write_tree
from tests.images.vfat_images import image_of
from tests.images.vfat_trees import EPOCH, vfat_tree


def many_files_tree() -> Tree:
    """Files of every size class for small batches: empty, under a cluster, whole
    clusters, several clusters, and 1,100 small files (more pieces than one batch)."""
    tree = Tree(Entry(b"", EntryType.DIRECTORY, 0o755))
    tree.add(Entry(b"big", EntryType.DIRECTORY, 0o755))
    for size in (0, 1, 2047, 2048, 2049, 10_000, 70_001, 300_000):
        data = bytes((size * 7 + i) % 251 for i in range(size))
        tree.add(Entry(b"big/f%d" % size, EntryType.REGULAR, 0o644,
                       content=Content.from_bytes(data)))
    tree.add(Entry(b"many", EntryType.DIRECTORY, 0o755))
    for number in range(1100):
        tree.add(Entry(b"many/n%04d" % number, EntryType.REGULAR, 0o644,
                       content=Content.from_bytes(b"%d\n" % number)))
    return tree


def to_file(tree: Tree, path: Path, **extra: str) -> bytes:
    with path.open("wb") as output:
        vfat.write(tree, output, ImageOptions(epoch=EPOCH, label="ESP",
                                              extra=tuple(sorted(extra.items()))))
    return path.read_bytes()


def small_batches(monkeypatch: pytest.MonkeyPatch, *, threaded: bool) -> None:
    """Batches of a few KiB and pieces, files over 4 KiB streamed, and the volume id
    hashed on the thread (or inline) whatever the tree's size."""
    monkeypatch.setattr(write, "WHOLE_FILE", 4096)
    monkeypatch.setattr(write, "BATCH", 8192)
    monkeypatch.setattr(write, "BATCH_PIECES", 7)
    monkeypatch.setattr(write, "THREAD_BYTES", 0 if threaded else 1 << 62)
    monkeypatch.setattr(volume_id, "BATCH", 3000)
    monkeypatch.setattr(volume_id, "QUEUED_BATCHES", 1)


@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "thread"])
def test_batches_threads_and_outputs_give_the_golden_bytes(
        threaded: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    golden = image_of(vfat_tree(), label="ESP")  # in memory, defaults: the golden digest
    small_batches(monkeypatch, threaded=threaded)
    assert to_file(vfat_tree(), tmp_path / "small.img") == golden
    assert image_of(vfat_tree(), label="ESP") == golden  # joined batches, one write each


@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "thread"])
def test_files_on_disk_in_small_batches(threaded: bool, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "source"
    write_tree(many_files_tree(), source)
    tree = tree_from_directory(source, epoch=EPOCH)
    expected = image_of(tree, label="ESP")
    given = image_of(tree, label="ESP", volume_id="ABCD-1234")
    small_batches(monkeypatch, threaded=threaded)
    assert to_file(tree, tmp_path / "derived.img") == expected
    assert to_file(tree, tmp_path / "given.img", volume_id="ABCD-1234") == given
    assert expected[:39] == given[:39] and expected[43:512] == given[43:512]
    assert expected[39:43] != given[39:43]  # the derived id is not the given one


def test_a_short_write_is_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = image_of(many_files_tree(), label="ESP")
    real = os.pwritev

    def first_piece_only(fd: int, pieces: list[bytes], offset: int) -> int:
        return real(fd, pieces[:1], offset)

    monkeypatch.setattr(os, "pwritev", first_piece_only)
    assert to_file(many_files_tree(), tmp_path / "short.img") == expected


@pytest.mark.parametrize("whole_file", [1 << 20, 16], ids=["read-whole", "streamed"])
@pytest.mark.parametrize("change", [b"more bytes than before\n", b""], ids=["grew", "shrank"])
def test_a_file_changed_after_the_walk_is_refused(
        whole_file: int, change: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        ) -> None:
    monkeypatch.setattr(write, "WHOLE_FILE", whole_file)
    source = tmp_path / "source"
    write_tree(many_files_tree(), source)
    tree = tree_from_directory(source, epoch=EPOCH)
    changed = source / "big" / "f10000"
    if change:
        with changed.open("ab") as stream:
            stream.write(change)
    else:
        changed.write_bytes(b"short")
    got = "more than 10000" if change else "5"
    with pytest.raises(ImageError, match=rf"/big/f10000: content is {got} bytes, expected "
                                         r"10000") as caught:
        to_file(tree, tmp_path / "out.img")
    assert caught.value.hint == "do not modify the source tree during a build"


@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "thread"])
def test_a_vanished_file_is_refused_and_the_thread_stops(
        threaded: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small_batches(monkeypatch, threaded=threaded)
    source = tmp_path / "source"
    write_tree(many_files_tree(), source)
    tree = tree_from_directory(source, epoch=EPOCH)
    (source / "many" / "n0700").unlink()
    with pytest.raises(ImageError, match=r"/many/n0700: cannot read its content: No such "
                                         r"file") as caught:
        to_file(tree, tmp_path / "out.img")
    assert caught.value.hint == "check that the source tree is readable"
    assert not [thread for thread in threading.enumerate()
                if thread.name == "vfat volume id"]
