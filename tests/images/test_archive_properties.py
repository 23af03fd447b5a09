"""Property tests: any tree survives tar and cpio round trips, and tar input of our tar."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from types import ModuleType

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reprobuild.images import cpio, tar
from reprobuild.images.registry import ImageOptions
from reprobuild.trees.diff import diff_trees
from reprobuild.trees.tree import Content, Entry, EntryType, Tree, path_key
from tests.images.archive_trees import EPOCH, NS, whole_seconds

names = st.binary(min_size=1, max_size=120).filter(
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b"..", b"TRAILER!!!"))
kinds = st.sampled_from([EntryType.REGULAR, EntryType.DIRECTORY, EntryType.SYMLINK,
                         EntryType.CHAR, EntryType.BLOCK, EntryType.FIFO,
                         EntryType.HARDLINK])


@st.composite
def trees(draw: st.DrawFn, *, xattrs: bool) -> Tree:
    tree = Tree(Entry(b"", EntryType.DIRECTORY, draw(st.integers(0, 0o7777)),
                      mtime_ns=draw(st.integers(0, EPOCH * NS))))
    dirs = [b""]
    regular: list[bytes] = []
    for _ in range(draw(st.integers(0, 25))):
        parent = draw(st.sampled_from(dirs))
        path = (parent + b"/" if parent else b"") + draw(names)
        if path in tree:
            continue
        kind = draw(kinds)
        # A hardlink group's primary is its first path in canonical order.
        earlier = [r for r in regular if path_key(r) < path_key(path)]
        if kind is EntryType.HARDLINK and not earlier:
            kind = EntryType.REGULAR
        fields = {
            "mode": draw(st.integers(0, 0o7777)),
            "uid": draw(st.integers(0, (1 << 32) - 1)),
            "gid": draw(st.integers(0, (1 << 32) - 1)),
            "mtime_ns": draw(st.integers(0, (EPOCH + 10) * NS)),
            "xattrs": tuple(sorted(draw(st.dictionaries(
                st.binary(min_size=1, max_size=20).filter(
                    lambda n: b"=" not in n and b"\0" not in n and b"\n" not in n)
                .map(lambda n: b"user." + n),
                st.binary(max_size=40), max_size=3)).items())) if xattrs else (),
        }
        if kind is EntryType.REGULAR:
            data = draw(st.binary(max_size=1500))
            tree.add(Entry(path, kind, content=Content.from_bytes(data), **fields))
            regular.append(path)
        elif kind is EntryType.HARDLINK:
            target = draw(st.sampled_from(earlier))
            primary = tree.get(target)
            assert primary is not None
            tree.add(Entry(path, kind, primary.mode, primary.uid, primary.gid,
                           primary.mtime_ns, primary.xattrs, target=target))
        elif kind is EntryType.SYMLINK:
            tree.add(Entry(path, kind, target=draw(st.binary(min_size=1, max_size=300).filter(
                lambda t: b"\0" not in t)), **fields))
        elif kind in (EntryType.CHAR, EntryType.BLOCK):
            tree.add(Entry(path, kind, rdev_major=draw(st.integers(0, 4095)),
                           rdev_minor=draw(st.integers(0, (1 << 20) - 1)), **fields))
        else:
            tree.add(Entry(path, kind, **fields))
            if kind is EntryType.DIRECTORY:
                dirs.append(path)
    return tree.normalized(epoch=EPOCH)


def assert_round_trips(writer: ModuleType, tree: Tree, expected: Tree) -> None:
    """``tree`` written by the image module ``writer`` reads back as ``expected``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "archive"
        out = io.BytesIO()
        writer.write(tree, out, ImageOptions(epoch=EPOCH))
        path.write_bytes(out.getvalue())
        assert [d.display() for d in diff_trees(expected, writer.read(path))] == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees(xattrs=True))
def test_tar_round_trip(tree: Tree) -> None:
    assert_round_trips(tar, tree, tree)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees(xattrs=False))
def test_cpio_round_trip(tree: Tree) -> None:
    assert_round_trips(cpio, tree, whole_seconds(tree))
