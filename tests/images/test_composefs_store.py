"""The composefs digest store filled in several processes: the same objects as in
one, kept objects not copied again, and a file that changed refused by this process
even when a child copied it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reprobuild.errors import ImageError
from reprobuild.images.composefs import shares
from reprobuild.images.composefs.digests import content_digests
from reprobuild.images.composefs.layout import object_path
from reprobuild.images.composefs.store import fill_store
from reprobuild.integrity.fsverity import digest_file
from reprobuild.trees.directory import tree_from_directory
from reprobuild.trees.tree import Content, Entry, EntryType, Tree

FILES = shares.PARALLEL_MIN_FILES + 40


def source_tree(root: Path) -> Tree:
    """Files over the inline limit, two pairs with the same content, one big file."""
    root.mkdir()
    for index in range(FILES):
        same = index % (FILES - 2)  # the last two repeat the first two
        body = f"file {same}\n".encode() * (10 + same % 300)
        (root / f"f{index:04d}").write_bytes(body)
    (root / "big").write_bytes(os.urandom(3 << 20))
    return tree_from_directory(root, epoch=0)


def objects(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes()
            for p in sorted(store.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("processes", [2, 3])
def test_processes_fill_the_same_store_as_one(tmp_path: Path, processes: int) -> None:
    tree = source_tree(tmp_path / "src")
    digests = content_digests(tree)
    added = fill_store(tree, str(tmp_path / "one"), digests, processes=1)
    assert fill_store(tree, str(tmp_path / "many"), digests, processes=processes) == added
    alone = objects(tmp_path / "one")
    assert objects(tmp_path / "many") == alone
    assert len(alone) == added == len(set(digests.values())) == FILES - 1
    path = object_path(digests[b"big"])
    assert alone[path] == (tmp_path / "src" / "big").read_bytes()
    assert digest_file(tmp_path / "one" / path) == digests[b"big"]
    assert not list((tmp_path / "many").rglob(".tmp-*"))


def test_kept_objects_are_not_copied_again(tmp_path: Path) -> None:
    tree = source_tree(tmp_path / "src")
    digests = content_digests(tree)
    store = tmp_path / "store"
    assert fill_store(tree, str(store), digests, processes=2) == FILES - 1
    (store / object_path(digests[b"big"])).unlink()
    assert fill_store(tree, str(store), digests, processes=2) == 1


def test_a_changed_file_is_refused_when_a_child_copies_it(tmp_path: Path) -> None:
    tree = source_tree(tmp_path / "src")
    digests = content_digests(tree)
    last = max(digests)  # in the last share: a child's
    digests[last] = bytes(32)
    with pytest.raises(ImageError, match="changed while it was stored"):
        fill_store(tree, str(tmp_path / "store"), digests, processes=2)
    assert not (tmp_path / "store" / object_path(bytes(32))).exists()
    assert not list((tmp_path / "store").rglob(".tmp-*"))


def test_contents_held_in_memory_are_stored_too(tmp_path: Path) -> None:
    data = b"in memory\n" * 50
    tree = Tree()
    tree.add(Entry(b"f", EntryType.REGULAR, 0o644, content=Content.from_bytes(data)))
    digests = content_digests(tree)
    assert fill_store(tree, str(tmp_path / "store"), digests) == 1
    assert (tmp_path / "store" / object_path(digests[b"f"])).read_bytes() == data
