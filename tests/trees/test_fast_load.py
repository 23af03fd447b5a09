"""The fast ways to load a tree give exactly the tree of the general path.

A directory source is walked once in canonical order (no TreeBuilder), and a canonical
tar goes straight to :meth:`Tree.try_canonical`; anything not canonical falls back to
the builder. Each test compares entry for entry (metadata, content source, hardlink
targets) with what the general path makes of the same input.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from reprobuild.errors import ImageError
from reprobuild.trees import directory, tar_reader
from reprobuild.trees.builder import TreeBuilder
from reprobuild.trees.directory import tree_from_directory
from reprobuild.trees.load import load_tree
from reprobuild.trees.tar_reader import iter_members, tree_from_tar
from reprobuild.trees.tree import BytesSource, Content, Entry, EntryType, FileSource, Tree
from tests.archive_helpers import M, dir_, file, hardlink, symlink, write_tar
from tests.conftest import need_tool

EPOCH = 1_700_000_000
LONG = "n" * 200


def full_view(tree: Tree) -> list[tuple[object, ...]]:
    """Every entry with what equality leaves out: where its bytes come from."""
    return [(e, getattr(e.content.source, "path", None) if e.content else None)
            for e in tree]


@pytest.fixture(params=["compiled scan", "python scan"])
def either_scan(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Walk with the compiled directory listing (when built), then without it."""
    if request.param == "python scan":
        monkeypatch.setattr(directory, "_DIRSCAN", None)


def general_directory_tree(root: Path, **kwargs: bool) -> Tree:
    """The builder's path: a file hook that changes nothing turns the fast walk off."""
    return tree_from_directory(root, epoch=EPOCH, file_hook=lambda _path, _st: None,
                               **kwargs)


def general_tar_tree(path: Path, *, epoch: int | None, implied: int = 0) -> Tree:
    """What tree_from_tar made before it had a fast path: every member through the
    builder, then normalised."""
    builder = TreeBuilder(what=str(path), implied_mtime_ns=implied)
    for member in iter_members(os.fsencode(path)):
        if member.link_target is not None:
            builder.link(member.entry.path, member.link_target, member.name,
                         replace_existing=False)
        else:
            builder.add(member.entry, member.name)
    tree = builder.build()
    return tree if epoch is None else tree.normalized(epoch=epoch)


def every_kind(top: Path) -> Path:
    """A directory with every kind of entry, made in anything but sorted order."""
    top.mkdir()
    for name in ("zeta", "b-dir", "a", "b", LONG, "\udcff-raw"):
        (top / name).mkdir()
    for name in ("z", "b.txt", "a", "B", "y" * 250):
        (top / "b" / name).write_bytes(name.encode()[:40])
    (top / "b" / "empty").write_bytes(b"")
    (top / "zeta" / "exec").write_bytes(b"#!/bin/sh\n")
    (top / "zeta" / "exec").chmod(0o4755)
    (top / LONG / "deep").write_bytes(b"deep")
    os.link(top / "zeta" / "exec", top / "a" / "exec-link")  # the later path made first
    os.link(top / "zeta" / "exec", top / "b-dir" / "exec-link")
    (top / "b" / "link").symlink_to("../zeta/exec")
    (top / "a" / "long-symlink").symlink_to("dangling/" + "t" * 300)
    os.mkfifo(top / "b-dir" / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(top / "b-dir" / "sock"))
    if os.geteuid() == 0:
        os.mknod(top / "b-dir" / "console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))
        os.mknod(top / "b-dir" / "sda", 0o660 | stat.S_IFBLK, os.makedev(8, 0))
    (top / "b" / "sticky").mkdir(mode=0o1777)
    (top / "b" / "sticky").chmod(0o1777)
    return top


def test_directory_walk_equals_the_builder_path(tmp_path: Path, either_scan: None) -> None:
    top = every_kind(tmp_path / "t")
    found: list[tuple[bytes, int]] = []
    fast = tree_from_directory(top, epoch=EPOCH,
                               found=lambda path, size: found.append((path, size)))
    general = general_directory_tree(top)
    assert full_view(fast) == full_view(general)
    assert found == found_files(fast) and len(found) == 8  # once per hardlink group
    kinds = {e.type for e in fast}
    assert {EntryType.HARDLINK, EntryType.SYMLINK, EntryType.FIFO, EntryType.SOCKET} <= kinds
    link = fast.get(b"b-dir/exec-link")
    assert link is not None and link.target == b"a/exec-link"
    assert fast.hardlink_groups() == general.hardlink_groups()
    assert [c.name for c in fast.children(b"b")] == [c.name for c in general.children(b"b")]
    assert fast.is_normal(epoch=EPOCH) and fast.is_normal(epoch=None)


def test_directory_walk_without_hardlink_detection(tmp_path: Path, either_scan: None) -> None:
    top = every_kind(tmp_path / "t")
    fast = tree_from_directory(top, epoch=EPOCH, detect_hardlinks=False)
    assert full_view(fast) == full_view(general_directory_tree(top, detect_hardlinks=False))
    assert not fast.hardlink_groups()


@pytest.mark.parametrize("kept", [{"preserve_owner": True},
                                  {"preserve_mtime": True, "detect_hardlinks": False},
                                  {"preserve_owner": True, "preserve_mtime": True,
                                   "read_xattrs": True}])
def test_directory_walk_keeping_metadata_equals_the_builder_path(
        tmp_path: Path, kept: dict[str, bool], either_scan: None) -> None:
    top = every_kind(tmp_path / "t")
    os.utime(top / "b" / "z", ns=(0, (EPOCH + 5) * 10**9 + 7))  # clamped to the epoch
    os.utime(top / "b" / "a", ns=(0, (EPOCH - 5) * 10**9 + 7))
    try:
        os.setxattr(top / "b" / "a", "user.b", b"2")
        os.setxattr(top / "b" / "a", "user.a", b"1")  # listed after user.b
        os.setxattr(top / "zeta" / "exec", "user.k", b"v")  # carried by its hardlinks
    except OSError:
        pytest.skip("the temporary directory's filesystem takes no user xattrs")
    found: list[tuple[bytes, int]] = []
    fast = tree_from_directory(top, epoch=EPOCH,
                               found=lambda path, size: found.append((path, size)), **kept)
    general = general_directory_tree(top, **kept)
    assert full_view(fast) == full_view(general)
    entry = {e.path: e for e in fast}
    if kept.get("preserve_mtime"):
        assert entry[b"b/a"].mtime_ns == (EPOCH - 5) * 10**9 + 7
        assert entry[b"b/z"].mtime_ns == EPOCH * 10**9
    if kept.get("read_xattrs"):
        assert entry[b"b/a"].xattrs == ((b"user.a", b"1"), (b"user.b", b"2"))
        assert entry[b"b-dir/exec-link"].xattrs == ((b"user.k", b"v"),)
    assert found == found_files(fast)


def found_files(tree: Tree) -> list[tuple[bytes, int]]:
    """What a walk's ``found`` is told: each regular file read from disk, in order."""
    return [(e.content.source.path, e.size) for e in tree
            if e.type is EntryType.REGULAR and e.content is not None
            and isinstance(e.content.source, FileSource)]


def test_directory_walk_of_a_deep_tree(tmp_path: Path, either_scan: None) -> None:
    """Deeper than any recursion would like; siblings after a subtree come after it."""
    top = tmp_path / "deep"
    path = top
    for _ in range(300):
        path = path / "d"
    path.mkdir(parents=True)
    (path / "f").write_bytes(b"x")
    (top / "e").write_bytes(b"after")
    fast = tree_from_directory(top, epoch=EPOCH)
    assert full_view(fast) == full_view(general_directory_tree(top))
    assert [e.path for e in fast][-1] == b"e"


def test_canonical_tar_takes_no_builder(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    need_tool("tar")
    top = every_kind(tmp_path / "t")
    os.unlink(top / "b-dir" / "sock")  # tar cannot store one
    archive = tmp_path / "t.tar"
    subprocess.run(["tar", "--sort=name", "--format=pax", "--numeric-owner",
                    f"--mtime=@{EPOCH + 5}", "-cf", str(archive), "-C", str(top), "."],
                   check=True)
    expected = general_tar_tree(archive, epoch=EPOCH)
    monkeypatch.setattr(tar_reader, "TreeBuilder", None)  # the fast path must not need it
    fast = tree_from_tar(archive, epoch=EPOCH)
    assert full_view(fast) == full_view(expected)
    assert all(e.mtime_ns == EPOCH * 10**9 for e in fast)  # clamped while loading
    assert fast.is_normal(epoch=EPOCH)
    assert fast.get(b"b-dir/exec-link") == expected.get(b"b-dir/exec-link")
    unclamped = tree_from_tar(archive)
    assert {e.mtime_ns for e in unclamped} == {(EPOCH + 5) * 10**9}


def counting_builder(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    made: list[str] = []

    class Counting(TreeBuilder):
        def __init__(self, *, what: str, implied_mtime_ns: int = 0) -> None:
            made.append(what)
            super().__init__(what=what, implied_mtime_ns=implied_mtime_ns)

    monkeypatch.setattr(tar_reader, "TreeBuilder", Counting)
    return made


CANONICAL = [dir_("./", mtime=1_500_000_000), dir_("a"),
             file("a/f", b"1", mode=0o4755, pax={"SCHILY.xattr.user.cap": "x"}),
             hardlink("a/g", "a/f"), hardlink("a/h", "a/g"), symlink("a/s", "f"),
             dir_("b", mtime=EPOCH + 100), file("b/" + LONG, b"long",
                                                 pax={"SCHILY.xattr.user.b": "2",
                                                      "SCHILY.xattr.user.a": "1"})]

OUT_OF_ORDER = {
    "unsorted": [dir_("b"), dir_("a")],
    "parent listed after": [file("a/f", b"1"), dir_("a", mode=0o700)],
    "root not first": [dir_("a"), dir_("./", mode=0o750)],
    "separator order": [dir_("a"), dir_("a-b"), file("a/f")],
    "devices before the root (mmdebstrap)": [
        dir_("dev"), M("dev/null", tarfile.CHRTYPE, major=1, minor=3), dir_("./"),
        dir_("bin"), file("bin/sh", b"sh"), hardlink("bin/sh2", "bin/sh")],
}
NOT_CANONICAL = {
    "parent implied": [file("a/f", b"1")],
    "hardlink to a symlink": [symlink("a", "x"), hardlink("b", "a")],
    "a link named before its file": [file("z", b"1"), hardlink("a", "z")],
}


@pytest.mark.parametrize("case", sorted(OUT_OF_ORDER))
def test_tar_out_of_order_is_sorted_without_the_builder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    archive = write_tar(tmp_path / "o.tar", OUT_OF_ORDER[case])
    expected = general_tar_tree(archive, epoch=EPOCH)
    made = counting_builder(monkeypatch)
    assert full_view(tree_from_tar(archive, epoch=EPOCH)) == full_view(expected)
    assert made == []


def test_tar_fast_path_on_canonical_members(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    archive = write_tar(tmp_path / "c.tar", CANONICAL)
    expected = general_tar_tree(archive, epoch=EPOCH)
    made = counting_builder(monkeypatch)
    tree = tree_from_tar(archive, epoch=EPOCH)
    assert made == []
    assert full_view(tree) == full_view(expected)
    link = tree.get(b"a/h")
    assert link is not None and link.target == b"a/f"  # a link to a link: the group's file
    assert (link.mode, link.xattrs) == (0o4755, ((b"user.cap", b"x"),))  # the file's
    long_file = tree.get(b"b/" + LONG.encode())
    assert long_file is not None and [n for n, _ in long_file.xattrs] == [b"user.a", b"user.b"]


@pytest.mark.parametrize("case", sorted(NOT_CANONICAL))
def test_tar_falls_back_to_the_builder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       case: str) -> None:
    archive = write_tar(tmp_path / "n.tar", NOT_CANONICAL[case])
    expected = general_tar_tree(archive, epoch=EPOCH, implied=EPOCH * 10**9)
    made = counting_builder(monkeypatch)
    tree = tree_from_tar(archive, epoch=EPOCH, implied_mtime_ns=EPOCH * 10**9)
    assert made == [str(archive)]
    assert full_view(tree) == full_view(expected)


@pytest.mark.parametrize(("members", "message"), [
    ([file("a", b"1"), file("a", b"2")], "appears twice"),
    ([hardlink("a", "b"), file("b", b"1")], "not an earlier member"),
    ([file("f", b"1"), file("f/x", b"2")], "not a directory"),
    ([file("f/x", b"2"), file("f", b"1")], "appears twice"),  # f implied, then a file
    ([dir_("./"), dir_("a"), dir_("./")], "root appears twice"),
])
def test_hostile_tars_still_get_the_builders_message(tmp_path: Path, members: list[M],
                                                     message: str) -> None:
    with pytest.raises(ImageError, match=message):
        tree_from_tar(write_tar(tmp_path / "h.tar", members), epoch=EPOCH)


def test_load_tree_uses_the_fast_paths(tmp_path: Path) -> None:
    top = every_kind(tmp_path / "t")
    assert full_view(load_tree(top, epoch=EPOCH)) == full_view(general_directory_tree(top))
    archive = write_tar(tmp_path / "c.tar", CANONICAL)
    assert full_view(load_tree(archive, epoch=EPOCH)) == \
        full_view(general_tar_tree(archive, epoch=EPOCH))


def entries_of(*specs: tuple[str, EntryType]) -> list[Entry]:
    return [Entry(p.encode(), kind, 0o644,
                  content=Content.from_bytes(b"x") if kind is EntryType.REGULAR else None)
            for p, kind in specs]


ROOT = Entry(b"", EntryType.DIRECTORY, 0o755)
D, R = EntryType.DIRECTORY, EntryType.REGULAR


@pytest.mark.parametrize("entries", [
    entries_of(("b", R), ("a", R)),  # out of order
    entries_of(("a", R), ("a", R)),  # twice
    entries_of(("a/b", R)),  # no parent
    entries_of(("a", R), ("a/b", R)),  # parent not a directory
    [Entry(b"a", R, 0o644)],  # a regular file without content
    [Entry(b"a", EntryType.HARDLINK, 0o644, target=b"b")],  # link to nothing
    [*entries_of(("a", D)), Entry(b"b", EntryType.HARDLINK, 0o644, target=b"a")],
    [Entry(b"a", D, 0o755, xattrs=((b"user.b", b""), (b"user.a", b"")))],  # unsorted
    [Entry(b"a", D, 0o755, xattrs=((b"user.a", b"1"), (b"user.a", b"2")))],  # twice
])
def test_try_canonical_refuses_what_is_not_canonical(entries: list[Entry]) -> None:
    assert Tree.try_canonical(ROOT, entries) is None


def test_try_canonical_gives_the_tree_add_gives() -> None:
    entries = entries_of(("a", D), ("a/f", R), ("a-b", R), ("b", D), ("b/c", D))
    entries.append(Entry(b"b/c/l", EntryType.HARDLINK, 0o644, target=b"a/f"))
    tree = Tree.try_canonical(ROOT, entries)
    assert tree is not None
    slow = Tree(ROOT)
    for entry in entries:
        slow.add(entry)
    assert list(tree) == list(slow)
    assert [c.path for c in tree.children(b"")] == [b"a", b"a-b", b"b"]
    assert tree.hardlink_groups() == {b"a/f": [b"a/f", b"b/c/l"]}
    tree.add(Entry(b"b/c/z", R, 0o600, content=Content.from_bytes(b"")))
    tree.remove(b"a-b")
    assert [e.path for e in tree][-2:] == [b"b/c/l", b"b/c/z"] and b"a-b" not in tree


def test_try_canonical_clamps_and_knows_it_is_normal() -> None:
    late = Entry(b"a", D, 0o755, mtime_ns=9 * 10**9)
    tree = Tree.try_canonical(Entry(b"", D, 0o755, mtime_ns=8 * 10**9), [late],
                              clamp_ns=5 * 10**9)
    assert tree is not None
    assert [e.mtime_ns for e in tree] == [5 * 10**9, 5 * 10**9]
    assert tree.is_normal(epoch=5) and tree.is_normal(epoch=6) and not tree.is_normal(epoch=4)
    tree.replace_entry(Entry(b"a", D, 0o755, mtime_ns=7 * 10**9))
    assert not tree.is_normal(epoch=6)  # changed since: checked again
    unclamped = Tree.try_canonical(ROOT, [late])
    assert unclamped is not None and not unclamped.is_normal(epoch=5)


def test_long_member_names_in_gnu_format(tmp_path: Path) -> None:
    """GNU long names go through tarfile, then the same fast assembly."""
    members = [dir_("./"), dir_("d" * 120), file("d" * 120 + "/" + "f" * 150, b"x")]
    archive = write_tar(tmp_path / "gnu.tar", members, fmt=tarfile.GNU_FORMAT)
    assert full_view(tree_from_tar(archive, epoch=EPOCH)) == \
        full_view(general_tar_tree(archive, epoch=EPOCH))


def test_value_classes_are_still_frozen_dataclasses() -> None:
    """Entry, Content and FileSource store their fields through the slots; they stay
    frozen, compare, hash and replace as dataclasses do."""
    content = Content(3, FileSource(b"/x"), b"k" * 32)
    entry = Entry(b"a", R, 0o644, 1, 2, 3, ((b"user.a", b""),), content, None, 0, 0)
    same = Entry(path=b"a", type=R, mode=0o644, uid=1, gid=2, mtime_ns=3,
                 xattrs=((b"user.a", b""),), content=Content(3, FileSource(b"/y")))
    assert entry == same and hash(entry) == hash(same)  # content compares by size
    assert dataclasses.replace(entry, mode=0o600).mode == 0o600
    assert (entry.target, entry.rdev_major, entry.rdev_minor) == (None, 0, 0)
    assert content.blake3 == b"k" * 32 and FileSource(b"/x") == FileSource(b"/x")
    assert Content(3, BytesSource(b"abc")).blake3 == Content.from_bytes(b"abc").blake3
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.mode = 0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        content.size = 0  # type: ignore[misc]
