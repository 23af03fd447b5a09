"""The tree model: canonical order, hardlink groups, hostile names, normalisation."""

from __future__ import annotations

import os
from dataclasses import fields, replace
from pathlib import Path

import blake3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reprobuild.errors import ImageError
from reprobuild.trees.diff import diff_trees
from reprobuild.trees.directory import tree_from_directory
from reprobuild.trees.tree import (
    ZERO_BLAKE3,
    BytesSource,
    Content,
    Entry,
    EntryType,
    Tree,
    _with_mtime,
    canonical_relative_path,
    check_relative_path,
    path_key,
    sort_key,
)


def make(tmp: Path, order: list[str]) -> Path:
    tmp.mkdir()
    for name in order:
        (tmp / name).write_bytes(name.encode())
    (tmp / "sub").mkdir()
    (tmp / "sub" / "x").write_bytes(b"x" * 5000)
    return tmp


def test_directory_order_does_not_matter(tmp_path: Path) -> None:
    a = tree_from_directory(make(tmp_path / "a", ["b", "a", "c"]), epoch=10)
    b = tree_from_directory(make(tmp_path / "b", ["c", "b", "a"]), epoch=10)
    assert [e.path for e in a] == [b"", b"a", b"b", b"c", b"sub", b"sub/x"]
    assert diff_trees(a, b) == []
    assert a.get(b"sub/x") is not None
    assert a.root.mtime_ns == 10 * 10**9


def test_hardlink_primary_is_first_path_whatever_the_creation_order(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "z").write_bytes(b"data")
    os.link(d / "z", d / "a")
    tree = tree_from_directory(d)
    a, z = tree.get(b"a"), tree.get(b"z")
    assert a is not None and z is not None
    assert a.type is EntryType.REGULAR
    assert z.type is EntryType.HARDLINK and z.target == b"a"
    assert tree.hardlink_groups() == {b"a": [b"a", b"z"]}


def test_diff_reports_content_offset_and_mode() -> None:
    a, b = Tree(), Tree()
    a.add(Entry(b"f", EntryType.REGULAR, 0o644, content=Content.from_bytes(b"hello world")))
    b.add(Entry(b"f", EntryType.REGULAR, 0o600, content=Content.from_bytes(b"hello World")))
    kinds = {(d.kind, d.detail) for d in diff_trees(a, b)}
    assert ("mode", "0644 vs 0600") in kinds
    assert ("content", "first differing byte at offset 6") in kinds


@pytest.mark.parametrize("name", [b"/etc/passwd", b"a/../../x", b"../x"])
def test_hostile_names_are_refused(name: bytes) -> None:
    with pytest.raises(ImageError):
        check_relative_path(name, "test.tar")


def test_member_through_symlink_and_duplicates_are_refused() -> None:
    tree = Tree()
    tree.add(Entry(b"link", EntryType.SYMLINK, 0o777, target=b"/etc"))
    with pytest.raises(ImageError, match="not a directory"):
        tree.add(Entry(b"link/passwd", EntryType.REGULAR, 0o644))
    tree.add(Entry(b"f", EntryType.REGULAR, 0o644))
    with pytest.raises(ImageError, match="duplicate"):
        tree.add(Entry(b"f", EntryType.REGULAR, 0o644))
    with pytest.raises(ImageError, match="hardlink target"):
        tree.add(Entry(b"h", EntryType.HARDLINK, 0o644, target=b"missing"))


def test_normalized_clamps_mtimes_and_sorts_xattrs() -> None:
    tree = Tree()
    tree.add(Entry(b"f", EntryType.REGULAR, 0o644, mtime_ns=5 * 10**18,
                   xattrs=((b"user.b", b"2"), (b"user.a", b"1"))))
    out = tree.normalized(epoch=100)
    f = out.get(b"f")
    assert f is not None
    assert f.mtime_ns == 100 * 10**9
    assert f.xattrs == ((b"user.a", b"1"), (b"user.b", b"2"))


NAME = st.lists(st.sampled_from([b"\x01", b"-", b".", b"a", b"\xff"]), min_size=1,
                max_size=3).map(b"".join)
PATHS = st.lists(NAME, min_size=1, max_size=4).map(b"/".join)


@given(st.lists(PATHS, max_size=30))
def test_sort_key_orders_as_path_key(paths: list[bytes]) -> None:
    assert sorted(paths, key=sort_key) == sorted(paths, key=path_key)


@given(st.binary(max_size=24).map(lambda b: b.replace(b"\0", b"")))
def test_canonical_names_are_what_the_checked_path_gives(name: bytes) -> None:
    canonical = canonical_relative_path(name)
    if canonical is not None:
        assert check_relative_path(name, "test") == canonical


def test_blake3_digests_are_the_library_s() -> None:
    # Content loads the hash library on first use, and writes the empty digest out.
    assert blake3.blake3(b"").digest() == ZERO_BLAKE3
    data = b"reprobuild\n" * 100_000
    assert Content.from_bytes(data).blake3 == blake3.blake3(data).digest()
    assert Content(len(data), BytesSource(data)).blake3 == blake3.blake3(data).digest()
    assert Content(0, BytesSource(b"")).blake3 == ZERO_BLAKE3


def test_with_mtime_is_replace() -> None:
    """try_canonical's clamp copies every field but the mtime, as replace() does."""
    entry = Entry(b"a/b", EntryType.CHAR, 0o640, 1, 2, 3, ((b"user.x", b"y"),),
                  Content.from_bytes(b"c"), b"t", 4, 5)
    assert _with_mtime(entry, 9) == replace(entry, mtime_ns=9)
    assert [f.name for f in fields(Entry)] == [
        "path", "type", "mode", "uid", "gid", "mtime_ns", "xattrs", "content", "target",
        "rdev_major", "rdev_minor"]  # _with_mtime names them all
